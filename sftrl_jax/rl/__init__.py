"""GRPO reinforcement learning with verifiable rewards (verl semantics; DAPO options)."""

from ..losses import entropy_from_logits
from ..training import TrainResult
from .algorithms import compute_advantages, kl_penalty, overlong_penalty, policy_loss
from .config import RLConfig
from .rollouts import DynamicSamplingError, Rollouts, collect_rollouts, rollout_arrays
from .trainer import GRPOAlgorithm, run_rl

__all__ = ["DynamicSamplingError", "GRPOAlgorithm", "RLConfig", "Rollouts", "TrainResult", "collect_rollouts",
           "compute_advantages", "entropy_from_logits", "kl_penalty", "overlong_penalty", "policy_loss",
           "rollout_arrays", "run_rl"]
