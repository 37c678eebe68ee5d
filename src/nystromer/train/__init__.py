"""Generic training machinery: loop, checkpoints, exact resume, metrics, multi-process.

Nothing here knows about a particular model: :func:`train` takes a model, an objective
``objective(model, batch) -> (loss, sums)`` and datasets. See :mod:`nystromer.train.loop`.
"""

from .checkpoint import load_weights, save_weights
from .distributed import DistInfo, init_from_env
from .loop import (
    NonFiniteLossError,
    Objective,
    TrainConfig,
    Trainer,
    TrainResult,
    evaluate,
    train,
)
from .sampler import ResumableBatchSampler

__all__ = [
    "DistInfo",
    "NonFiniteLossError",
    "Objective",
    "ResumableBatchSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "init_from_env",
    "load_weights",
    "save_weights",
    "train",
]
