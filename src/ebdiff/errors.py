"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class EbdiffError(Exception):
    """Base class: the message is the one line the user sees."""


class ConfigError(EbdiffError):
    pass


class DataError(EbdiffError):
    pass


class CheckpointError(EbdiffError):
    pass
