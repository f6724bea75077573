"""GRPO reinforcement learning with verifiable rewards (verl semantics; DAPO options), and the mixed-policy
methods LUFFY and CHORD (``rl.method``)."""

from ..losses import entropy_from_logits
from ..training import TrainResult
from .algorithms import (
                         chord_mu,
                         chord_sft_token_losses,
                         compute_advantages,
                         kl_penalty,
                         luffy_token_losses,
                         mixed_policy_loss,
                         overlong_penalty,
                         policy_loss,
)
from .config import RLConfig
from .rollouts import DynamicSamplingError, Rollouts, collect_rollouts, rollout_arrays
from .trainer import GRPOAlgorithm, run_rl

__all__ = ["DynamicSamplingError", "GRPOAlgorithm", "RLConfig", "Rollouts", "TrainResult", "chord_mu",
           "chord_sft_token_losses", "collect_rollouts", "compute_advantages", "entropy_from_logits", "kl_penalty",
           "luffy_token_losses", "mixed_policy_loss", "overlong_penalty", "policy_loss", "rollout_arrays", "run_rl"]
