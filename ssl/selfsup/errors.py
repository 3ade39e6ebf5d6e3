"""Errors a user can act on. Each message names the problem and the fix; stages print it in one line."""


class SelfsupError(Exception):
    """Base of the errors that mean "your input needs a change", not "a bug"."""


class ConfigError(SelfsupError, ValueError):
    """Params that cannot work: the message names the key, the value and what is allowed."""


class DatasetError(SelfsupError):
    """A dataset that is missing or malformed: the message names the path and how to fix it."""


class TrainingStoppedError(SelfsupError):
    """Training stopped itself: going on could not help. `history` holds the per-epoch metrics up to the stop
    (the stopping epoch last), so the run's curves show what led there."""

    def __init__(self, message: str, history: list[dict] | None = None):
        super().__init__(message)
        self.history = history or []


class NonFiniteLossError(TrainingStoppedError):
    """The loss became NaN or infinite; checkpoints written before it are kept."""


class CollapseError(TrainingStoppedError):
    """The embeddings collapsed (every image maps to nearly one point); the last good checkpoint is kept."""


class RayClusterError(SelfsupError):
    """The Ray cluster named by RAY_ADDRESS cannot be reached or refuses this client."""


class TrackingError(SelfsupError):
    """The MLflow tracking server cannot be reached."""


class CheckpointError(SelfsupError):
    """A checkpoint or saved encoder that cannot be read."""


class WorkerLostError(SelfsupError):
    """Ray Train workers were lost past scaling.max_failures; the checkpoints written so far are kept."""


class WorkerError(SelfsupError):
    """A Ray Train worker raised an error a restart would only repeat (a bug, out of memory): not retried; its
    traceback is printed once above the one line."""
