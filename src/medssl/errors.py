"""Errors for bad input, each with a message that names the file, field or value at fault.

Kept free of heavy imports so that every CLI command can catch them cheaply.
"""


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or holds an invalid value."""


class DataError(ValueError):
    """The data file is missing or its content is not what medssl expects."""


class WeightsUnavailable(RuntimeError):
    """ImageNet weights are neither cached nor downloadable."""


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


class ImageReadError(ValueError):
    """An input file is not a readable image."""


class Diverged(FloatingPointError):
    """Training left the finite, bounded regime (non-finite or exploding loss, exploding weights)."""


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer."""


class Busy(RuntimeError):
    """Another process is running the same stage or pipeline on the same outputs."""


class PromotionError(RuntimeError):
    """A trained model fails a check that keeps it out of the registry."""


class PlotsError(RuntimeError):
    """A plot's input is missing or DVC could not render it."""


class StaleStageError(RuntimeError):
    """A stage's input was written for another version of its upstream output: rerun the named stage."""


class ModelIntegrityError(RuntimeError):
    """A registered model's file is not the one registered, or it answers non-finite probabilities."""


class DeviceUnavailable(RuntimeError):
    """The host claims a GPU (driver, MEDSSL_DEVICE=cuda) that torch or ONNX Runtime cannot use."""
