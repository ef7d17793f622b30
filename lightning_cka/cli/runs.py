"""Runs as the command line reads them: every probe file of one or more folders (a resumed run), ordered by step."""

import re
import sys
from collections.abc import Iterator, Mapping
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
        if step == "last":  # the last readable one (a lazy run finds out only now which files it can read)
            readable = next((s for s in reversed(self.steps) if s in self.probes), None)
            if readable is None:
                raise CLIError(f"{self.spec} holds no readable probe files: {'; '.join(self.skipped)}.")
            return self.probes[readable]
        if step not in self.probes:
            raise CLIError(f"step {step} is not in {self.spec} (its steps: {few(self.steps)}).")
        return self.probes[step]


_STEP_FILE = re.compile(r"step_(\d+)\.npz")  # CKAMonitor's step_<step:07d>.npz: the step is in the name


class LazyProbes(Mapping[int, CKAResult]):
    """Probes by step, each read from its file the first time it is asked for (``read_run(..., lazy=True)``).

    A file that cannot be read is skipped with one warning on stderr, as :func:`read_run` skips it, and its step is
    then missing.
    """

    def __init__(self, files: dict[int, Path], run: Run) -> None:
        self.files, self._run, self._read = files, run, {}

    def __getitem__(self, step: int) -> CKAResult:
        if step not in self._read:
            path = self.files[step]  # KeyError for a step no file holds
            try:
                self._read[step] = CKAResult.load(path)
            except ValueError as err:
                self._run.skipped.append(str(err))
                print(f"lightning-cka: warning: skipped {err}", file=sys.stderr)
                self._read[step] = None
        if self._read[step] is None:
            raise KeyError(step)
        return self._read[step]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.files))

    def __len__(self) -> int:
        return len(self.files)


def read_run(spec: str | Path, lazy: bool = False) -> Run:
    """Load every probe of a run: one or more comma-joined folders (log directory or ``cka/`` folder), or a file.

    Files that cannot be read (cut short by a kill, empty) are skipped with one warning on stderr naming them; the
    others are read.

    Args:
        spec: the run.
        lazy: read no probe yet: ``run.probes`` reads each one when it is first asked for, taking the steps from the
            file names (``step_<step>.npz``; other files are read at once). For commands that draw one or two probes.

    Raises:
        CLIError: a missing path, no probe files (with the runs found below a parent folder), or nothing readable.
    """
    spec = str(spec)
    parts = [Path(p) for p in spec.split(",") if p] if not Path(spec).exists() else [Path(spec)]
    run = Run(spec=spec, folders=[], single_file=len(parts) == 1 and parts[0].is_file())
    if lazy:
        return _lazy_run(run, parts)
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


def _lazy_run(run: Run, parts: list[Path]) -> Run:
    """``run`` with its probes by step from the file names, none read yet (what the others are named is read)."""
    files: dict[int, Path] = {}
    for part in parts:
        found, folder = probe_files(part)
        run.folders.append(folder)
        for file in found:
            named = _STEP_FILE.fullmatch(file.name)
            if named and not run.single_file:
                files[int(named.group(1))] = file
                continue
            try:  # analysis.npz and other names: the step is inside
                files[CKAResult.load(file).step] = file
            except ValueError as err:
                run.skipped.append(str(err))
    if not files:
        raise CLIError(f"{run.spec} holds no readable probe files: {'; '.join(run.skipped)}.")
    for skipped in run.skipped:
        print(f"lightning-cka: warning: skipped {skipped}", file=sys.stderr)
    run.probes = LazyProbes(files, run)  # type: ignore[assignment]
    return run


def check_unread(run: Run) -> None:
    """Warn about the files of a lazily read run that were not read and could not be: their headers are checked.

    A command that draws one probe reads only that file and the one before it in full; this still tells the user,
    as reading every file would, which files of the run are damaged (at a fraction of the cost: no array is decoded).
    """
    probes = run.probes
    if not isinstance(probes, LazyProbes):
        return
    for step, path in probes.files.items():
        if step in probes._read:
            continue
        try:
            CKAResult.check(path)
        except ValueError as err:
            run.skipped.append(str(err))
            print(f"lightning-cka: warning: skipped {err}", file=sys.stderr)


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
