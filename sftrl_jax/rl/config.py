"""The GRPO run config (``sftrl-jax rl --config FILE key=value ...``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import OPTIMIZER_RANGES, CheckpointOptions, ModelOptions
from ..data.prompts import PromptDataOptions
from ..distributed import DistributedOptions
from ..optim import OptimizerOptions


@dataclasses.dataclass
class RLDataSection(PromptDataOptions):
    split: str = "train"
    shuffle: bool = True

    _ranges = {"max_prompt_length": ">= 1", "limit_per_benchmark": ">= 1"}


@dataclasses.dataclass
class RLSection(OptimizerOptions):
    # optimizer defaults of the reference recipe (verl: constant lr, no warmup)
    learning_rate: float = 1e-6
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    # what one step samples and how it updates
    prompts_per_step: int = 128
    group_size: int = 8  # responses per prompt
    mini_batches_per_step: int = 2  # optimizer updates per epoch over the step's responses
    ppo_epochs: int = 1
    micro_batch_size: int = 1  # sequences per data-parallel shard per micro-step
    max_steps: int | None = None  # default: num_epochs over the prompts
    num_epochs: int = 1
    seed: int = 42
    # sampling (rollouts)
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int = 64  # prompts per compiled generation batch
    # advantage and loss (verl semantics, BRIEF §5)
    norm_adv_by_std: bool = True  # False = Dr.GRPO (A = r - mean)
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher: 0.28
    clip_c: float = 3.0  # dual clip for A < 0
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = \
        "token-mean"
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm constant (default: max_new_tokens)
    kl_coef: float = 0.0  # 0: no reference model is kept
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"
    entropy_coef: float = 0.0
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    # DAPO options
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and sample more
    max_generation_rounds: int = 4  # cap on generation rounds per step with dynamic sampling
    overlong_buffer_len: int = 0  # soft overlong punishment over the last this-many tokens (0: off)
    overlong_penalty_factor: float = 1.0
    mask_truncated: bool = False  # exclude responses cut at max_new_tokens from the loss
    # reward
    require_think: bool = False  # grade only after </think>; no </think> scores 0
    reward_timeout_s: float = 10.0
    reward_workers: int | None = None
    log_every: int = 1

    _ranges = {
        **OPTIMIZER_RANGES, "prompts_per_step": ">= 1", "group_size": ">= 1", "mini_batches_per_step": ">= 1",
        "ppo_epochs": ">= 1", "micro_batch_size": ">= 1", "max_steps": ">= 1", "num_epochs": ">= 1", "seed": ">= 0",
        "max_new_tokens": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]", "top_k": ">= 0",
        "generation_batch_size": ">= 1", "clip_low": ">= 0", "clip_high": ">= 0", "clip_c": "> 1",
        "loss_scale_factor": "> 0", "kl_coef": ">= 0", "entropy_coef": ">= 0", "max_generation_rounds": ">= 1",
        "overlong_buffer_len": ">= 0", "overlong_penalty_factor": ">= 0", "reward_timeout_s": "> 0",
        "reward_workers": ">= 1", "log_every": ">= 1",
    }


@dataclasses.dataclass
class RLConfig:
    model: ModelOptions
    data: RLDataSection = dataclasses.field(default_factory=RLDataSection)
    rl: RLSection = dataclasses.field(default_factory=RLSection)
    checkpoint: CheckpointOptions = dataclasses.field(default_factory=CheckpointOptions)
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    distributed: DistributedOptions = dataclasses.field(default_factory=DistributedOptions)
    output_dir: str = "runs/rl"
