"""The RL run config (``sftrl-jax rl --config FILE key=value ...``).

Shared sections: ``optimizer`` (verl's defaults: lr 1e-6, constant), ``train`` (steps, seed,
micro-batch), ``sampling`` (the rollouts; ``sampling.n`` is the group size), ``reward`` (the
grader), ``checkpoint``, ``logging``. The ``rl`` section holds only the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import RewardOptions, SamplingOptions, TrainingRunConfig
from ..data.prompts import PromptDataOptions
from ..layout import layout
from ..optim import OptimizerOptions


@dataclasses.dataclass
class RLDataSection(PromptDataOptions):
    split: str = "train"
    shuffle: bool = True


AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclasses.dataclass
class RLSection:
    # a registered method (sftrl_jax/rl/methods): grpo, gspo, cispo (on-policy groups); luffy, chord (each
    # group is sampling.n - 1 samples and the prompt's demonstration, the data's target/response)
    method: str = "grpo"
    # what one step samples and how it updates
    prompts_per_step: int = 128
    mini_batches_per_step: int = 2  # optimizer updates per epoch over the step's responses
    ppo_epochs: int = 1
    # advantage and loss (verl semantics); null: the method's default (grpo: std-normalised, clip 0.2/0.2,
    # dual clip 3, token-mean, no entropy bonus; each method's file in sftrl_jax/rl/methods says its own)
    norm_adv_by_std: bool | None = None  # False = Dr.GRPO (A = r - mean)
    clip_low: float | None = None
    clip_high: float | None = None  # DAPO clip-higher: 0.28
    clip_c: float | None = None  # dual clip for A < 0
    agg_mode: AggMode | None = None
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm constant (default: sampling.max_new_tokens)
    kl_coef: float = 0.0  # 0: no reference model is kept
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"
    entropy_coef: float | None = None
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    # truncated importance sampling (recompute only): weight each sampled token's policy loss by
    # min(exp(old_logp - sampler_logp), tis_cap), correcting for the sampler/trainer mismatch; null: off
    tis_cap: float | None = None
    # DAPO options
    dynamic_sampling: bool = False  # drop groups whose accuracy is all equal (verl's metric=acc) and sample more
    max_generation_rounds: int = 4  # cap on generation rounds per step with dynamic sampling
    overlong_buffer_len: int = 0  # soft overlong punishment over the last this-many tokens (0: off)
    overlong_penalty_factor: float = 1.0
    mask_truncated: bool = False  # exclude responses cut at sampling.max_new_tokens from the loss
    # mixed-policy methods
    demonstration_field: str | None = None  # null: "target" (LUFFY parquet) if the row has one, else "response"
    clip_on_policy: bool | None = None  # LUFFY: PPO-clip the on-policy tokens (its released run does not)
    shaping_gamma: float = 0.1  # LUFFY's policy shaping f(p) = p / (p + gamma) on demonstration tokens
    chord_mu_peak: float = 0.1  # CHORD: weight of the SFT term, (1 - mu) GRPO + mu SFT
    chord_mu_valley: float = 0.1  # ... decayed (cosine) to this after the warm-up; equal to the peak: constant
    chord_mu_warmup_steps: int = 0

    _ranges = {
        "prompts_per_step": ">= 1", "mini_batches_per_step": ">= 1", "ppo_epochs": ">= 1", "clip_low": ">= 0",
        "clip_high": ">= 0", "clip_c": "> 1", "loss_scale_factor": "> 0", "kl_coef": ">= 0", "entropy_coef": ">= 0",
        "tis_cap": "> 0", "max_generation_rounds": ">= 1", "overlong_buffer_len": ">= 0",
        "overlong_penalty_factor": ">= 0",
        "shaping_gamma": "> 0", "chord_mu_peak": "[0, 1]", "chord_mu_valley": "[0, 1]", "chord_mu_warmup_steps": ">= 0",
    }

    def __post_init__(self):
        from ..config import ConfigError
        from .methods import get_method

        try:
            method = get_method(self.method)
        except ValueError as err:
            raise ConfigError(f"config key 'rl.method': {err}") from None
        for key, value in method.resolved_defaults().items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        method.validate(self)
        if self.tis_cap is not None and self.old_logprobs != "recompute":
            raise ConfigError("config key 'rl.tis_cap': truncated importance sampling weighs the recomputed old "
                              "log-probs against the sampler's; it needs rl.old_logprobs: recompute")


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
    output_dir: str = layout("runs/rl")

    @property
    def rollout_seed(self) -> int:
        return self.sampling.seed if self.sampling.seed is not None else self.train.seed
