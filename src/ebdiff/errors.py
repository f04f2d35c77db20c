"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class EbdiffError(Exception):
    """Base class: the message is the one line the user sees."""


class ConfigError(EbdiffError):
    pass


class DataError(EbdiffError):
    pass


class CheckpointError(EbdiffError):
    pass


class NonFiniteError(EbdiffError):
    """The loss or the weights went non-finite: training stops before writing a checkpoint."""


class LockError(EbdiffError):
    """A run folder is in use by another ebdiff process."""


class Interrupted(EbdiffError):
    """Stopped by a signal after saving what could be saved; `--resume` continues. `code`: the exit
    status (128 + the signal's number, the shell convention)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code
