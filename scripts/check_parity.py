"""Compare sftrl-jax logits with the PyTorch ``transformers`` model for a local HF checkpoint.

    python scripts/check_parity.py /path/to/Qwen2.5-Math-7B [--dtype bfloat16] [--mesh fsdp=-1]

Prints the max |Δ| over real (non-padding) positions of a left-padded random batch. Needs torch
(``pip install -e '.[test]'``); use it on real weights where a model hub or a local copy exists.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from sftrl_jax.cli import mesh_arg
from sftrl_jax.models import ModelOptions, load_pretrained
from sftrl_jax.sharding import make_mesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mesh", type=mesh_arg, default={"fsdp": -1})
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()

    model, config = load_pretrained(ModelOptions(path=args.model_dir, dtype=args.dtype), make_mesh(args.mesh))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1:, : args.length // 4] = 0
    ours = jax.jit(lambda s, i, m: nnx.merge(nnx.graphdef(model), s)(i, attention_mask=m))(
        nnx.state(model), jnp.asarray(ids), jnp.asarray(mask))

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        tmask = torch.as_tensor(mask, dtype=torch.long)
        theirs = reference(torch.as_tensor(ids, dtype=torch.long), attention_mask=tmask,
                           position_ids=(tmask.cumsum(-1) - 1).clamp(min=0)).logits.float().numpy()
    diff = np.abs(np.asarray(ours) - theirs)[mask.astype(bool)]
    print(f"{config.model_type}: max |Δ| = {diff.max():.3e}, mean |Δ| = {diff.mean():.3e}, "
          f"max |logit| = {np.abs(theirs).max():.2f} ({args.dtype})")


if __name__ == "__main__":
    main()
