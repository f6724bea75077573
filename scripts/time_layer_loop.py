"""Time the demo model's GRPO update and SFT step with the layer loop scanned and unrolled.

The figures behind ``model.scan_layers`` in docs/design.md. The model is the demo's shape (Llama,
2 layers, hidden 128, vocab 384); the batches have the demo's shapes (GRPO mini-batch 128
sequences of 48 prompt + 40 response tokens; SFT batch 32 x 96 tokens), random tokens. The two
variants are timed in alternation on one device, after a compile step each.

    python scripts/time_layer_loop.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax.config import TrainOptions
from sftrl_jax.models import ModelConfig, ModelOptions, init_model
from sftrl_jax.rl import RLConfig, rl_functions
from sftrl_jax.rl.config import RLDataSection, RLSection
from sftrl_jax.sft import SFTConfig
from sftrl_jax.sft.config import SFTDataSection, SFTTrainSection
from sftrl_jax.sft.step import sft_functions
from sftrl_jax.sharding import make_mesh
from sftrl_jax.training import abstract_context, train_state

CONFIG = ModelConfig(model_type="llama", vocab_size=384, hidden_size=128, intermediate_size=384, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=True)


def batches(rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    rows, prompt, response = 128, 48, 40
    ids = rng.integers(0, CONFIG.vocab_size, (1, rows, prompt + response)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[..., :8] = 0  # some left padding
    grpo = {"input_ids": ids, "attention_mask": attention,
            "positions": np.maximum(np.cumsum(attention, -1) - 1, 0).astype(np.int32),
            "response_ids": ids[..., prompt:],
            "response_mask": (rng.random((1, rows, response)) < 0.7).astype(np.float32),
            "response_off_policy": np.zeros((1, rows, response), np.float32),
            "advantages": rng.normal(size=(1, rows)).astype(np.float32),
            "old_logp": -rng.random((1, rows, response)).astype(np.float32)}
    sft_ids = rng.integers(0, CONFIG.vocab_size, (1, 32, 96)).astype(np.int32)
    sft = {"input_ids": sft_ids, "labels": sft_ids, "label_mask": np.ones(sft_ids.shape, np.float32),
           "segment_ids": np.ones_like(sft_ids),
           "positions": np.broadcast_to(np.arange(96, dtype=np.int32), sft_ids.shape).copy()}
    return {"grpo update": grpo, "sft step": sft}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    mesh = make_mesh({"data": 1, "fsdp": 1})
    data = batches(np.random.default_rng(0))
    steps = {}
    for scan_layers in (True, False):
        model = init_model(CONFIG, ModelOptions(path="", scan_layers=scan_layers), mesh)
        params = nnx.to_pure_dict(nnx.state(model))
        # the trainers' own declarations, for configs of the batches' shapes
        rl_config = RLConfig(model=ModelOptions(path=""), data=RLDataSection(max_prompt_length=48),
                             rl=RLSection(prompts_per_step=128, mini_batches_per_step=1),
                             train=TrainOptions(micro_batch_size=128))
        rl_config.sampling.n, rl_config.sampling.max_new_tokens = 1, 40
        sft_config = SFTConfig(model=ModelOptions(path=""), data=SFTDataSection(max_length=96),
                               train=SFTTrainSection(global_batch_size=32, micro_batch_size=32))
        rl_ctx, _ = abstract_context(rl_config, mesh, 1000, model=model)
        sft_ctx, _ = abstract_context(sft_config, mesh, 1000, model=model)
        makers = {"grpo update": (rl_functions(rl_ctx)["policy_update"], rl_ctx.optimizer),
                  "sft step": (sft_functions(sft_ctx)["train_step"], sft_ctx.optimizer)}
        for name, (spec, optimizer) in makers.items():
            state, _ = train_state(jax.tree.map(jnp.copy, params), optimizer, mesh)  # each step donates its own
            fn = spec.jit()
            tick = time.perf_counter()
            state, metrics = fn(state, data[name])
            jax.block_until_ready(metrics)
            steps[name, scan_layers] = {"fn": fn, "state": state, "compile_s": time.perf_counter() - tick, "times": []}
    for _ in range(args.repeats):
        for key, entry in steps.items():
            tick = time.perf_counter()
            entry["state"], metrics = entry["fn"](entry["state"], data[key[0]])
            jax.block_until_ready(metrics)
            entry["times"].append(time.perf_counter() - tick)
    for (name, scan_layers), entry in steps.items():
        layout = "scanned" if scan_layers else "unrolled"
        print(f"{name:12s} {layout:9s} first call (compile) {entry['compile_s']:5.2f} s"
              f"  best {min(entry['times']):.3f} s  median {np.median(entry['times']):.3f} s")


if __name__ == "__main__":
    main()
