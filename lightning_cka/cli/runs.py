"""Runs as the command line reads them: every probe file of one or more folders (a resumed run), ordered by step."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning_cka.cli.errors import CLIError, NoProbesHere
from lightning_cka.cli.text import few
from lightning_cka.result import CKAResult


@dataclass
class Run:
    """The probes of one run.

    Attributes:
        spec: the run as given on the command line.
        folders: the folders holding its ``.npz`` files.
        probes: the probes by ``step`` (``-1`` for ``lightning-cka analyze``), later folders winning a shared step.
        single_file: the run was given as one ``.npz`` file.
        skipped: files that could not be read, with the reason.
    """

    spec: str
    folders: list[Path]
    probes: dict[int, CKAResult] = field(default_factory=dict)
    single_file: bool = False
    skipped: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        """The probed steps in increasing order."""
        return sorted(self.probes)

    @property
    def label(self) -> str:
        """A short name: the log directory (with its parent for Lightning's ``version_N``)."""
        folder = self.folders[-1]
        folder = folder.parent if folder.name == "cka" else folder
        folder = folder.resolve()
        if folder.name.startswith("version_"):
            return f"{folder.parent.name}/{folder.name}"
        return folder.name

    def probe(self, step: int | str) -> CKAResult:
        """The probe at ``step`` (``"last"``: the last one); a single file is its one probe whatever the step."""
        if self.single_file:
            return next(iter(self.probes.values()))
        if step == "last":
            return self.probes[self.steps[-1]]
        if step not in self.probes:
            raise CLIError(f"step {step} is not in {self.spec} (its steps: {few(self.steps)}).")
        return self.probes[step]


def read_run(spec: str | Path) -> Run:
    """Load every probe of a run: one or more comma-joined folders (log directory or ``cka/`` folder), or a file.

    Files that cannot be read (cut short by a kill, empty) are skipped with one warning on stderr naming them; the
    others are read.

    Raises:
        CLIError: a missing path, no probe files (with the runs found below a parent folder), or nothing readable.
    """
    spec = str(spec)
    parts = [Path(p) for p in spec.split(",") if p] if not Path(spec).exists() else [Path(spec)]
    run = Run(spec=spec, folders=[], single_file=len(parts) == 1 and parts[0].is_file())
    for part in parts:
        files, folder = probe_files(part)
        run.folders.append(folder)
        for file in files:
            try:
                result = CKAResult.load(file)
            except ValueError as err:  # the message names the file and what is wrong with it
                run.skipped.append(str(err))
                continue
            run.probes[result.step] = result
    if not run.probes:
        raise CLIError(f"{spec} holds no readable probe files: {'; '.join(run.skipped)}.")
    for skipped in run.skipped:
        print(f"lightning-cka: warning: skipped {skipped}", file=sys.stderr)
    for line in run.probes[run.steps[-1]].unresolved():
        print(
            f"lightning-cka: note: the analysis {line}; its fields are read, but its figures and numbers need its "
            "module importable here (PYTHONPATH).",
            file=sys.stderr,
        )
    return run


def probe_files(path: Path) -> tuple[list[Path], Path]:
    """The probe files of one folder or file, and the folder; a parent of runs is an error that lists them."""
    if path.is_file():
        if path.suffix != ".npz":
            raise CLIError(f"{path} is not a .npz file of probe arrays.")
        return [path], path.parent
    if not path.is_dir():
        raise CLIError(f"{path} does not exist.")
    folder = path / "cka" if (path / "cka").is_dir() else path
    files = _steps(folder)
    if files:
        return files, folder
    # Named monitors write cka/<name>/step_*.npz: one of them is unambiguous.
    named = sorted(p for p in folder.iterdir() if p.is_dir() and _steps(p))
    if len(named) == 1:
        return _steps(named[0]), named[0]
    if named:
        names = ", ".join(p.name for p in named)
        raise CLIError(f"{folder} holds the arrays of several named monitors ({names}); pass one of those folders.")
    below = runs_below(path)
    if below:
        listing = ", ".join(f"{run} ({count} probes)" for run, count in below[:8])
        more = f" and {len(below) - 8} more" if len(below) > 8 else ""
        raise NoProbesHere(f"{path} holds no probe arrays itself; the runs below it are: {listing}{more}.", below)
    raise CLIError(f"{path} holds no probe arrays (CKAMonitor writes them as <log dir>/cka/step_<step>.npz).")


def runs_below(path: Path) -> list[tuple[Path, int]]:
    """The run folders under ``path`` that hold probe files, with their number of probes."""
    found = []
    for folder in sorted({p.parent for p in path.glob("**/step_*.npz")}):
        run = folder.parent if folder.name == "cka" else folder
        found.append((run, len(_steps(folder))))
    return found


def _steps(folder: Path) -> list[Path]:
    """The probe files of a folder: ``step_*.npz`` and ``analysis.npz`` (not temporary files, not probe images)."""
    return sorted(p for p in folder.glob("*.npz") if p.name != "probe.npz" and not p.name.startswith("."))
