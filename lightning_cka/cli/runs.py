"""Runs as the command line reads them: every probe's arrays in a log directory, its ``cka/`` folder or one file."""

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_cka.cli.errors import CLIError
from lightning_cka.result import CKAResult


@dataclass
class Run:
    """The probes of one run.

    Attributes:
        path: the path given on the command line.
        folder: the folder holding the ``.npz`` files.
        probes: the probes by ``step`` (``-1`` for ``lightning-cka analyze``).
        single_file: the run was given as one ``.npz`` file.
    """

    path: Path
    folder: Path
    probes: dict[int, CKAResult] = field(default_factory=dict)
    single_file: bool = False

    @property
    def steps(self) -> list[int]:
        """The probed steps in increasing order."""
        return sorted(self.probes)


def read_run(path: str | Path) -> Run:
    """Load every probe of a run directory, its ``cka/`` folder or one ``.npz`` file.

    Args:
        path: a Lightning log directory holding ``cka/step_<step>.npz``, that ``cka/`` folder (or the folder of a
            named monitor inside it), or one ``.npz`` file.

    Raises:
        CLIError: a missing path, no arrays, an unreadable file, or two files for one step.
    """
    path = Path(path)
    files, folder = _probe_files(path)
    run = Run(path=path, folder=folder, single_file=path.is_file())
    for file in files:
        result = _load(file)
        if result.step in run.probes:
            raise CLIError(f"{folder} holds two probes of step {result.step}; keep one of them.")
        run.probes[result.step] = result
    return run


def _probe_files(path: Path) -> tuple[list[Path], Path]:
    if path.is_file():
        if path.suffix != ".npz":
            raise CLIError(f"{path} is not a .npz file of probe arrays.")
        return [path], path.parent
    if not path.is_dir():
        raise CLIError(f"{path} does not exist.")
    folder = path / "cka" if (path / "cka").is_dir() else path
    files = sorted(folder.glob("*.npz"))
    if not files:
        # Named monitors write cka/<name>/step_*.npz: one of them is unambiguous.
        named = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.npz")))
        if len(named) == 1:
            return sorted(named[0].glob("*.npz")), named[0]
        if named:
            names = ", ".join(p.name for p in named)
            raise CLIError(f"{folder} holds the arrays of several named monitors ({names}); pass one of those folders.")
        raise CLIError(f"{path} holds no probe arrays (CKAMonitor writes them as <log dir>/cka/step_<step>.npz).")
    return files, folder


def _load(file: Path) -> CKAResult:
    try:
        return CKAResult.load(file)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise CLIError(f"cannot read {file} as lightning-cka probe arrays: {err}") from err


def local_threshold(result: CKAResult, fraction: float, reference: bool = False) -> float | None:
    """Pixels below which a head of the probe counts as local: ``fraction`` of the uniform-attention distance.

    ``None`` for a probe without attention layers, or arrays written without that distance.
    """
    uniform = result.reference_uniform_attention_distance if reference else result.uniform_attention_distance
    return None if np.isnan(uniform) else fraction * uniform
