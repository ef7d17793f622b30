"""The error types of the command line."""

from pathlib import Path


class CLIError(Exception):
    """A problem with what the command line names; reported as one line on stderr with exit code 2."""


class NoProbesHere(CLIError):
    """A folder without probe files of its own, above run folders that have some (listed in :attr:`below`)."""

    def __init__(self, message: str, below: list[tuple[Path, int]]) -> None:
        super().__init__(message)
        self.below = below
