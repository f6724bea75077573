"""The RL run config (``sftrl-jax rl --config FILE key=value ...``).

Shared sections: ``optimizer`` (verl's defaults: lr 1e-6, constant), ``train`` (steps, seed,
micro-batch), ``sampling`` (the rollouts; ``sampling.n`` is the group size), ``reward`` (the
grader), ``checkpoint``, ``logging``. The ``rl`` section holds only the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import OptimizerOptions, RewardOptions, SamplingOptions, TrainingRunConfig
from ..data.prompts import PromptDataOptions
from ..layout import layout


@dataclasses.dataclass
class RLDataSection(PromptDataOptions):
    split: str = "train"
    shuffle: bool = True


AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclasses.dataclass
class RLSection:
    # a registered method (sftrl_jax/rl/methods): grpo, gspo, cispo (on-policy groups); luffy (each group is
    # sampling.n - 1 samples and the prompt's demonstration, the data's target/response); chord (expert rows:
    # rl.expert_source)
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
    # how the entropy bonus is aggregated: "loss" as the policy loss (rl.agg_mode; verl's agg_loss), or
    # "micro_batch_token_mean", LUFFY's fork: a token mean within each of verl's dynamic micro-batches, summed
    # over a rank's micro-batches and averaged over ranks (needs rl.verl_ranks); null: the method's (luffy:
    # micro_batch_token_mean, others: loss)
    entropy_agg: Literal["loss", "micro_batch_token_mean"] | None = None
    # verl's arrangement of a step, to reproduce a verl run (sftrl_jax/rl/verl_layout.py): the step's sequences
    # balanced over this many ranks and cut into mini-batches per rank as verl's trainer does, dynamic
    # micro-batches of at most verl_max_token_len tokens per rank (ppo_max_token_len_per_gpu); null: each
    # mini-batch is consecutive prompt groups
    verl_ranks: int | None = None
    verl_max_token_len: int = 32768
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
    # CHORD, (1 - mu) x GRPO on the sampled rows + mu x SFT on the expert rows: Trinity-RFT's names; null: its
    # defaults (sftrl_jax/rl/methods/chord.py). Where the expert rows come from: expert_data (Trinity-RFT's, the
    # default): ceil(expert_data_ratio x prompts_per_step x sampling.n) rows of rl.expert_data in each step, the
    # rest whole groups of sampling.n samples; group: each group's last member is the prompt's demonstration
    expert_source: Literal["expert_data", "group"] | None = None
    expert_data: list[str] = dataclasses.field(default_factory=list)  # SFT rows (prompt + target/response)
    expert_data_ratio: float | None = None  # share of each step's sequences that are expert rows (CHORD: 0.5)
    mu_warmup_steps: int | None = None  # mu rises linearly from 0 to mu_peak over these steps (CHORD: 0)
    mu_decay_steps: int | None = None  # then falls (cosine) to mu_valley over these, then stays (CHORD: 0)
    mu_peak: float | None = None  # CHORD: 0.1
    mu_valley: float | None = None  # CHORD: 0.1
    enable_phi_function: bool | None = None  # SFT loss -phi * logp, phi = p (1 - p) (CHORD-phi); false: -logp

    _ranges = {
        "prompts_per_step": ">= 1", "mini_batches_per_step": ">= 1", "ppo_epochs": ">= 1", "clip_low": ">= 0",
        "clip_high": ">= 0", "clip_c": "> 1", "loss_scale_factor": "> 0", "kl_coef": ">= 0", "entropy_coef": ">= 0",
        "tis_cap": "> 0", "verl_ranks": ">= 1", "verl_max_token_len": ">= 1",
        "max_generation_rounds": ">= 1", "overlong_buffer_len": ">= 0",
        "overlong_penalty_factor": ">= 0",
        "shaping_gamma": "> 0", "expert_data_ratio": "[0, 1)", "mu_warmup_steps": ">= 0", "mu_decay_steps": ">= 0",
        "mu_peak": "[0, 1]", "mu_valley": "[0, 1]",
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
        if self.entropy_agg == "micro_batch_token_mean" and self.entropy_coef > 0 and self.verl_ranks is None:
            raise ConfigError(
                f"config key 'rl.verl_ranks': rl.entropy_agg=micro_batch_token_mean (rl.method={self.method}'s "
                "default) takes the entropy's token mean within verl's dynamic micro-batches, which depend on the "
                "ranks of the run being reproduced: set rl.verl_ranks (LUFFY's runs: 8), or rl.entropy_agg=loss")
        if self.verl_ranks is not None and self.expert_source == "expert_data":
            raise ConfigError("config key 'rl.verl_ranks': verl's arrangement of a step does not apply to CHORD's "
                              "expert rows (Trinity-RFT spreads them evenly over the mini-batches); unset it")
        if self.tis_cap is not None and self.old_logprobs != "recompute":
            raise ConfigError("config key 'rl.tis_cap': truncated importance sampling weighs the recomputed old "
                              "log-probs against the sampler's; it needs rl.old_logprobs: recompute")


@dataclasses.dataclass
class ValidationOptions:
    """Validation during the run, as LUFFY's trainer does it (``sftrl_jax.probe.Validation``): every ``every``
    steps the reward of one sample per prompt of ``files``, averaged per benchmark and then over benchmarks
    (``val_score``), the best-scoring parameters kept in ``output_dir/best``. The prompts are read as the run's
    ``data`` section reads its own (template, system prompt, suffix)."""

    files: list[str] = dataclasses.field(default_factory=list)  # prompts with ground truths; empty: no validation
    split: str = "test"
    every: int = 10  # LUFFY: trainer.test_freq=10
    at_start: bool = False  # also before the first step (LUFFY's script: val_before_train=False)
    limit: int | None = None  # the first this many prompts (null: all)
    keep_best: bool = True  # save the parameters of the best val_score to output_dir/best
    # LUFFY: rollout.val_temperature=0.6, n_val=1, top_p 1, response length as training (its script: 8192)
    sampling: SamplingOptions = dataclasses.field(default_factory=lambda: SamplingOptions(temperature=0.6))

    _ranges = {"every": ">= 1", "limit": ">= 1"}


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
    validation: ValidationOptions = dataclasses.field(default_factory=ValidationOptions)
    output_dir: str = layout("runs/rl")

    def __post_init__(self):
        from ..config import ConfigError
        from .methods import get_method
        from .rollouts import demonstrations_in_groups

        if not get_method(self.rl.method).group_relative:
            return
        if self.sampling.n < 2:
            raise ConfigError(f"config key 'sampling.n': rl.method={self.rl.method} compares each response with "
                              f"the others of its group; a group of {self.sampling.n} has zero advantages and "
                              "trains on nothing: set sampling.n >= 2")
        if self.sampling.temperature == 0 and not demonstrations_in_groups(self.rl):
            raise ConfigError(f"config key 'sampling.temperature': 0 (greedy) samples sampling.n identical "
                              f"responses per prompt, so rl.method={self.rl.method}'s group-relative advantages "
                              "are all zero and nothing is trained: set sampling.temperature > 0")

    @property
    def rollout_seed(self) -> int:
        return self.sampling.seed if self.sampling.seed is not None else self.train.seed
