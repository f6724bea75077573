"""The SFT run config (``sftrl-jax sft --config FILE key=value ...``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import TrainingRunConfig, TrainOptions
from ..data.sft import SFTDataOptions
from ..layout import layout

# The PyTorch-stack gradient bugs ``train.emulate_bug`` can reproduce (``sftrl_jax.sft.step``).
EmulateBug = Literal["none", "deepspeed_offload", "openrlhf_mean_of_means", "both"]


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
    emulate_bug: EmulateBug = "none"
    # The DeepSpeed layout a bug is emulated on (not our mesh's): data-parallel ranks (default: the mesh's
    # data-parallel size) and sequences per rank per micro-step (default: train.micro_batch_size). Unused
    # (logged) without emulate_bug. LUFFY: 8 ranks x 1 sequence, global batch 64 -> 8 micro-steps.
    emulate_ranks: int | None = None
    emulate_micro_batch_size: int | None = None
    eval_every: int = 0  # steps; 0 = only at the end (when there is an eval split)

    _ranges = {"global_batch_size": ">= 1", "eval_every": ">= 0", "emulate_ranks": ">= 1",
               "emulate_micro_batch_size": ">= 1"}


@dataclasses.dataclass(kw_only=True)
class SFTConfig(TrainingRunConfig):
    kind: Literal["sft"] = "sft"
    data: SFTDataSection = dataclasses.field(default_factory=SFTDataSection)
    train: SFTTrainSection = dataclasses.field(default_factory=SFTTrainSection)
    output_dir: str = layout("runs/sft")
