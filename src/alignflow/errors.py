"""Errors users see. Each names the file, line or field that is wrong and what was expected."""


class AlignflowError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class ConfigError(AlignflowError):
    """A config file or override is invalid."""


class DataFormatError(AlignflowError):
    """An input dataset file is malformed."""


class StoreError(AlignflowError):
    """The metadata store or an artifact is missing, corrupt or out of date."""


class IntegrityError(StoreError):
    """An artifact's bytes on disk do not match the hash recorded for them."""
