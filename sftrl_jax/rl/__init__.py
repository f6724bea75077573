"""GRPO reinforcement learning with verifiable rewards (verl semantics; DAPO options)."""

from ..losses import entropy_from_logits
from .algorithms import compute_advantages, kl_penalty, overlong_penalty, policy_loss
from .config import RLConfig
from .trainer import DynamicSamplingError, RLResult, run_rl

__all__ = ["compute_advantages", "entropy_from_logits", "kl_penalty", "overlong_penalty", "policy_loss", "RLConfig",
           "DynamicSamplingError", "RLResult", "run_rl"]
