"""Reinforcement learning with verifiable rewards: GRPO-family methods (verl semantics; Dr.GRPO and DAPO
options, GSPO, CISPO) and the mixed-policy methods LUFFY and CHORD, each a registered ``rl.method``
(:mod:`sftrl_jax.rl.methods`)."""

from ..losses import entropy_from_logits
from ..training import TrainResult
from .algorithms import compute_advantages, kl_penalty, overlong_penalty, ppo_token_losses
from .config import RLConfig
from .methods import METHODS, Objective, PolicyMethod, get_method, register
from .methods.chord import chord_mu, chord_sft_token_losses
from .methods.cispo import cispo_token_losses
from .methods.gspo import gspo_token_losses
from .methods.luffy import luffy_token_losses
from .rollouts import DynamicSamplingError, Rollouts, collect_rollouts, rollout_arrays
from .step import make_policy_update, method_loss, rl_functions
from .trainer import RLAlgorithm, run_rl

__all__ = ["METHODS", "DynamicSamplingError", "Objective", "PolicyMethod", "RLAlgorithm", "RLConfig", "Rollouts",
           "TrainResult", "chord_mu", "chord_sft_token_losses", "cispo_token_losses", "collect_rollouts",
           "compute_advantages", "entropy_from_logits", "get_method", "gspo_token_losses", "kl_penalty",
           "luffy_token_losses", "make_policy_update", "method_loss", "overlong_penalty", "ppo_token_losses",
           "register", "rl_functions", "rollout_arrays", "run_rl"]
