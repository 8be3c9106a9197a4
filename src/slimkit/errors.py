"""Typed errors. Every error slimkit raises on bad input is a `SlimkitError`.

The CLI prints `error: <message>` on one line and exits with code 2 for any of them,
so messages must name the file, layer, key or stage at fault and say what to do.
"""


class SlimkitError(Exception):
    """Base class of every error slimkit raises on bad input."""


class ConfigError(SlimkitError, ValueError):
    """A config, recipe or option is malformed (unknown key, wrong type, out of range)."""


class DataError(SlimkitError, ValueError):
    """A data set is missing, empty, malformed, or contains NaN/Inf where that is not allowed."""


class ModelError(SlimkitError, ValueError):
    """A model reference cannot be resolved (unknown zoo name, bad factory path) or built."""


class ArtifactError(SlimkitError, OSError):
    """A model file is missing, corrupt, or not a slimkit artifact."""


class SelectorError(SlimkitError, ValueError):
    """A module selector matched no layer, or a named layer does not exist."""


class UnsupportedLayerError(SlimkitError, TypeError):
    """A technique was asked to transform a layer type it cannot handle."""


class CalibrationError(SlimkitError, ValueError):
    """Calibration data is empty or contains NaN/Inf, or statistics are unusable."""


class ChainError(ConfigError):
    """A technique was asked to follow one that does not allow it (e.g. anything after quantize)."""


class InfeasibleError(SlimkitError, ValueError):
    """A constraint or budget cannot be met by any candidate."""


class MissingDependencyError(SlimkitError, ImportError):
    """An optional dependency (extra) needed for this feature is not installed."""


class UntrustedFactoryError(ArtifactError):
    """A model file names a builder that is not trusted; loading it would import and run code."""
