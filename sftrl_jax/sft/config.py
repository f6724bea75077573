"""The SFT run config (``sftrl-jax sft --config FILE key=value ...``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import OPTIMIZER_RANGES, CheckpointOptions, ModelOptions
from ..data.sft import SFTDataOptions
from ..distributed import DistributedOptions
from ..optim import OptimizerOptions


@dataclasses.dataclass
class SFTDataSection(SFTDataOptions):
    train_files: list[str] = dataclasses.field(default_factory=list)  # files, globs or HF dataset ids
    train_split: str = "train"
    eval_files: list[str] = dataclasses.field(default_factory=list)
    eval_fraction: float = 0.0  # held out from train_files when eval_files is empty
    pack: bool = False  # pack several sequences per row (segment ids) instead of padding
    shuffle: bool = True

    _ranges = {"max_length": ">= 2", "eval_fraction": "[0, 1)"}


@dataclasses.dataclass
class SFTTrainSection(OptimizerOptions):
    global_batch_size: int = 64  # sequences per optimizer step (all micro-steps, all shards)
    micro_batch_size: int = 1  # sequences per data-parallel shard per micro-step
    max_steps: int | None = None  # default: num_epochs over the data
    num_epochs: int = 1
    seed: int = 42
    emulate_bug: Literal["none", "deepspeed_offload", "openrlhf_mean_of_means", "both"] = "none"
    eval_every: int = 0  # steps; 0 = only at the end (when there is an eval split)
    log_every: int = 1

    _ranges = {**OPTIMIZER_RANGES, "global_batch_size": ">= 1", "micro_batch_size": ">= 1", "max_steps": ">= 1",
               "num_epochs": ">= 1", "seed": ">= 0", "eval_every": ">= 0", "log_every": ">= 1"}


@dataclasses.dataclass
class SFTConfig:
    model: ModelOptions
    data: SFTDataSection = dataclasses.field(default_factory=SFTDataSection)
    train: SFTTrainSection = dataclasses.field(default_factory=SFTTrainSection)
    checkpoint: CheckpointOptions = dataclasses.field(default_factory=CheckpointOptions)
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    distributed: DistributedOptions = dataclasses.field(default_factory=DistributedOptions)
    output_dir: str = "runs/sft"
