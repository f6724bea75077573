"""Supervised fine-tuning with exact gradient accumulation (and opt-in emulations of two bugs)."""

from .config import SFTConfig
from .step import make_train_step
from ..training import NonFiniteLossError
from .trainer import SFTResult, run_sft

__all__ = ["SFTConfig", "make_train_step", "run_sft", "NonFiniteLossError", "SFTResult"]
