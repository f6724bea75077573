"""A tiny model directory (random Qwen2 weights + char tokenizer) and SFT data in the LUFFY schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from hf_checkpoints import make_tokenizer


def make_model_dir(hf_checkpoint_dir: Path, target: Path) -> Path:
    shutil.copytree(hf_checkpoint_dir, target)
    make_tokenizer(target)
    return target


def luffy_rows(count: int, seed: int = 0) -> list[dict]:
    """Addition problems whose responses differ a lot in length (0 to 16 reasoning lines)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50))
        steps = "".join(f"{a}+{b}={a + b}\n" for _ in range(int(rng.choice([0, 1, 2, 8, 16]))))
        rows.append({
            "data_source": "tiny_add",
            "prompt": [{"role": "user", "content": f"what is {a}+{b}?"}],
            "target": [{"role": "assistant", "content": f"<think>\n{steps}</think>\n\\boxed{{{a + b}}}"}],
            "reward_model": {"ground_truth": str(a + b), "style": "rule"},
            "extra_info": {"index": i},
        })
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    pd.DataFrame(rows).to_parquet(path)
    return path
