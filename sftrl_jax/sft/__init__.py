"""Supervised fine-tuning with exact gradient accumulation (and opt-in emulations of two bugs)."""

from ..training import NonFiniteLossError, TrainResult
from .config import SFTConfig
from .step import make_train_step
from .trainer import SFTAlgorithm, heldout_loss, run_sft

__all__ = ["NonFiniteLossError", "SFTAlgorithm", "SFTConfig", "TrainResult", "heldout_loss", "make_train_step",
           "run_sft"]
