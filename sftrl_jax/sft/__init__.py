"""Supervised fine-tuning with exact gradient accumulation (and opt-in emulations of two bugs)."""

from .config import SFTConfig
from .step import make_train_step
from .trainer import NonFiniteLossError, SFTResult, run_sft

__all__ = ["SFTConfig", "make_train_step", "run_sft", "NonFiniteLossError", "SFTResult"]
