"""One process of the multi-process test (tests/test_multihost.py): SFT steps, then a GRPO step.

    python tests/multihost_worker.py ROOT MODEL_DIR DATA PROMPTS

The distributed settings come from the environment (``SFTRL_JAX_COORDINATOR_ADDRESS``,
``SFTRL_JAX_NUM_PROCESSES``, ``SFTRL_JAX_PROCESS_ID``); ``run_sft`` starts the runtime itself.
The same function runs in-process (one process, 8 devices) for the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SFT_MESH = "{data: 2, fsdp: 2, tensor: 2}"  # batch blocks held by pairs of devices, heads split in two


def even_first_token(responses, truths, token_ids):
    """A controlled reward that varies inside the groups: 1 when the first sampled token id is even."""
    return [float(len(ids) > 0 and ids[0] % 2 == 0) for ids in token_ids]


def flat(params) -> dict[str, np.ndarray]:
    import jax

    from sftrl_jax.sharding import to_host

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): to_host(leaf) for path, leaf in leaves}


def run(root: Path, model_dir: Path, data: Path, prompts: Path) -> dict[str, dict[str, np.ndarray]]:
    """SFT (3 steps, checkpoints at 2 and 3) then GRPO (1 step, 2 mini-batches) from its final model."""
    from sftrl_jax.config import load_config
    from sftrl_jax.rl import RLConfig, run_rl
    from sftrl_jax.sft import SFTConfig, run_sft

    tiny = Path(__file__).parents[1] / "configs" / "tiny_sft.yaml"
    sft = run_sft(load_config(SFTConfig, tiny, [
        f"model.path={model_dir}", f"data.train_files=[{data}]", f"output_dir={root / 'sft'}",
        "train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=1", "train.eval_every=0",
        "checkpoint.save_every=2", f"mesh={SFT_MESH}"]), progress=False)
    rl = run_rl(load_config(RLConfig, overrides=[
        f"model.path={sft.final_dir}", f"data.files=[{prompts}]", f"output_dir={root / 'rl'}",
        "rl.prompts_per_step=4", "sampling.n=4", "rl.mini_batches_per_step=2", "train.micro_batch_size=1",
        "sampling.max_new_tokens=6", "train.max_steps=1", "optimizer.learning_rate=1e-2", "train.seed=0",
        # Adam's first step is ~lr*sign(g) where |g| ~ eps, which turns float32 reduction-order noise
        # into lr-sized differences; a larger eps keeps the update a smooth function of the gradient
        "optimizer.adam_eps=1e-3",
        "checkpoint.save_every=0"]), reward_fn=even_first_token, progress=False)
    return {"sft": flat(sft.params), "rl": flat(rl.params)}


if __name__ == "__main__":
    import jax

    root, model_dir, data, prompts = map(Path, sys.argv[1:5])
    params = run(root, model_dir, data, prompts)
    index = jax.process_index()
    for stage, values in params.items():
        np.savez(root / f"{stage}_params_process{index}.npz", **values)
    print(f"process {index} of {jax.process_count()} ({jax.local_device_count()} of {jax.device_count()} devices) "
          "done", flush=True)
