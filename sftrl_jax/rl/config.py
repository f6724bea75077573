"""The GRPO run config (``sftrl-jax rl --config FILE key=value ...``).

Shared sections: ``optimizer`` (verl's defaults: lr 1e-6, constant), ``train`` (steps, seed,
micro-batch), ``sampling`` (the rollouts; ``sampling.n`` is the group size), ``reward`` (the
grader), ``checkpoint``, ``logging``. The ``rl`` section holds only the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import RewardOptions, SamplingOptions, TrainingRunConfig
from ..data.prompts import PromptDataOptions
from ..optim import OptimizerOptions


@dataclasses.dataclass
class RLDataSection(PromptDataOptions):
    split: str = "train"
    shuffle: bool = True


@dataclasses.dataclass
class RLSection:
    # what one step samples and how it updates
    prompts_per_step: int = 128
    mini_batches_per_step: int = 2  # optimizer updates per epoch over the step's responses
    ppo_epochs: int = 1
    # advantage and loss (verl semantics, BRIEF §5)
    norm_adv_by_std: bool = True  # False = Dr.GRPO (A = r - mean)
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher: 0.28
    clip_c: float = 3.0  # dual clip for A < 0
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = \
        "token-mean"
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm constant (default: sampling.max_new_tokens)
    kl_coef: float = 0.0  # 0: no reference model is kept
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"
    entropy_coef: float = 0.0
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    # DAPO options
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and sample more
    max_generation_rounds: int = 4  # cap on generation rounds per step with dynamic sampling
    overlong_buffer_len: int = 0  # soft overlong punishment over the last this-many tokens (0: off)
    overlong_penalty_factor: float = 1.0
    mask_truncated: bool = False  # exclude responses cut at sampling.max_new_tokens from the loss

    _ranges = {
        "prompts_per_step": ">= 1", "mini_batches_per_step": ">= 1", "ppo_epochs": ">= 1", "clip_low": ">= 0",
        "clip_high": ">= 0", "clip_c": "> 1", "loss_scale_factor": "> 0", "kl_coef": ">= 0", "entropy_coef": ">= 0",
        "max_generation_rounds": ">= 1", "overlong_buffer_len": ">= 0", "overlong_penalty_factor": ">= 0",
    }


def _rl_optimizer() -> OptimizerOptions:
    return OptimizerOptions(learning_rate=1e-6, lr_schedule="constant")  # verl: constant lr, no warmup


def _rl_sampling() -> SamplingOptions:
    return SamplingOptions(n=8, temperature=1.0)


@dataclasses.dataclass(kw_only=True)
class RLConfig(TrainingRunConfig):
    kind: Literal["rl"] = "rl"
    data: RLDataSection = dataclasses.field(default_factory=RLDataSection)
    optimizer: OptimizerOptions = dataclasses.field(default_factory=_rl_optimizer)
    sampling: SamplingOptions = dataclasses.field(default_factory=_rl_sampling)
    reward: RewardOptions = dataclasses.field(default_factory=RewardOptions)
    rl: RLSection = dataclasses.field(default_factory=RLSection)
    output_dir: str = "runs/rl"

    @property
    def rollout_seed(self) -> int:
        return self.sampling.seed if self.sampling.seed is not None else self.train.seed
