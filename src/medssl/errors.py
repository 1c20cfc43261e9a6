"""Errors for bad input, each with a message that names the file, field or value at fault.

Kept free of heavy imports so that every CLI command can catch them cheaply. Every one is a UserError: the
CLI ends a command that raises one with its one-line message (exit 2); any other exception is a fault of
medssl's own and keeps its traceback.
"""


class UserError(Exception):
    """Bad input of some kind (a value, a file, an argument, the host): the message says which, and what to do."""


class ConfigError(UserError, ValueError):
    """params.yaml is missing, unreadable or holds an invalid value."""


class DataError(UserError, ValueError):
    """The data file is missing or its content is not what medssl expects."""


class WeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights are neither cached nor downloadable."""


class ParityError(UserError, RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


class ImageReadError(UserError, ValueError):
    """An input file is not a readable image."""


class Diverged(UserError, FloatingPointError):
    """Training left the finite, bounded regime (non-finite or exploding loss, exploding weights)."""


class TrackingUnavailable(UserError, RuntimeError):
    """The MLflow tracking server does not answer."""


class Busy(UserError, RuntimeError):
    """Another process is running the same stage or pipeline on the same outputs."""


class PromotionError(UserError, RuntimeError):
    """A trained model fails a check that keeps it out of the registry."""


class PlotsError(UserError, RuntimeError):
    """A plot's input is missing or DVC could not render it."""


class StaleStageError(UserError, RuntimeError):
    """A stage's input was written for another version of its upstream output: rerun the named stage."""


class ModelIntegrityError(UserError, RuntimeError):
    """A registered model's file is not the one registered, or it answers non-finite probabilities."""


class DeviceUnavailable(UserError, RuntimeError):
    """The host claims a GPU (driver, MEDSSL_DEVICE=cuda) that torch or ONNX Runtime cannot use."""


class UsageError(UserError, ValueError):
    """A command-line argument or environment variable names something that does not exist or cannot work."""


class MissingInput(UserError, FileNotFoundError):
    """A file a stage reads is not there: the message names the stage (or command) that writes it."""
