"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class DSFError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ConfigError(DSFError, ValueError):
    """An option or configuration value is out of range or inconsistent."""


class UnsupportedModelError(DSFError):
    """The model directory is not a supported causal LM."""


class CheckpointError(DSFError):
    """A DSF checkpoint is missing files, corrupt, or inconsistent with its metadata."""


class FactorizationError(DSFError):
    """A factorization produced non-finite values (the layer is named in the message)."""


class DataError(DSFError):
    """Calibration or evaluation text is missing or too short."""
