"""The SFT run config (``sftrl-jax sft --config FILE key=value ...``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import TrainingRunConfig, TrainOptions
from ..data.sft import SFTDataOptions


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
class SFTTrainSection(TrainOptions):
    global_batch_size: int = 64  # sequences per optimizer step (all micro-steps, all shards)
    emulate_bug: Literal["none", "deepspeed_offload", "openrlhf_mean_of_means", "both"] = "none"
    eval_every: int = 0  # steps; 0 = only at the end (when there is an eval split)

    _ranges = {"global_batch_size": ">= 1", "eval_every": ">= 0"}


@dataclasses.dataclass(kw_only=True)
class SFTConfig(TrainingRunConfig):
    kind: Literal["sft"] = "sft"
    data: SFTDataSection = dataclasses.field(default_factory=SFTDataSection)
    train: SFTTrainSection = dataclasses.field(default_factory=SFTTrainSection)
    output_dir: str = "runs/sft"
