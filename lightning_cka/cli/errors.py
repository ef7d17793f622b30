"""The one error type of the command line."""


class CLIError(Exception):
    """A problem with what the command line names; reported as one line on stderr with exit code 2."""
