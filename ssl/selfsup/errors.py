"""Errors a user can act on. Each message names the problem and the fix; stages print it in one line."""


class SelfsupError(Exception):
    """Base of the errors that mean "your input needs a change", not "a bug"."""


class ConfigError(SelfsupError, ValueError):
    """Params that cannot work: the message names the key, the value and what is allowed."""


class DatasetError(SelfsupError):
    """A dataset that is missing or malformed: the message names the path and how to fix it."""


class NonFiniteLossError(SelfsupError):
    """The loss became NaN or infinite; checkpoints written before it are kept."""


class CollapseError(SelfsupError):
    """The embeddings collapsed (every image maps to nearly one point); the last good checkpoint is kept."""


class RayClusterError(SelfsupError):
    """The Ray cluster named by RAY_ADDRESS cannot be reached."""


class TrackingError(SelfsupError):
    """The MLflow tracking server cannot be reached."""


class CheckpointError(SelfsupError):
    """A checkpoint or saved encoder that cannot be read."""


class WorkerLostError(SelfsupError):
    """Ray Train workers kept failing past scaling.max_failures; the checkpoints written so far are kept."""
