"""Error types. Every message says what went wrong and what to do about it."""


class MechdiffError(Exception):
    """Base class for all mechdiff errors."""


class ConfigError(MechdiffError, ValueError):
    """A pair file, model spec or option is invalid."""


class ModelLoadError(MechdiffError, RuntimeError):
    """A model or tokenizer could not be loaded (e.g. a hub id offline)."""


class SiteError(MechdiffError, ValueError):
    """A site name or layer index is invalid for a model, or shapes do not fit a patch."""


class DataError(MechdiffError, ValueError):
    """Prompts or datasets are empty, malformed, or filtered away."""


class NumericsError(MechdiffError, ArithmeticError):
    """NaN/Inf in activations or an estimator that is undefined for the input."""
