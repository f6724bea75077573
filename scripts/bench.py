"""Benchmarks: sftrl-jax against PyTorch ``transformers`` on CPU, MFU / roofline on an accelerator.

    python scripts/bench.py                      # auto: the CPU comparison, or the accelerator set
    python scripts/bench.py --device cpu --sections matmul,sft,generate,decode_floor,memory
    python scripts/bench.py --device gpu         # bf16 MFU (Qwen3-0.6B, Qwen2.5-1.5B shapes), decode
                                                 # roofline, and the Qwen2.5-Math-7B fit on one GPU
    python scripts/bench.py --smoke              # every code path at toy sizes (tests/test_bench.py)

CPU sections (float32, one small Llama-shape model built by ``transformers`` from a seed and
loaded into sftrl-jax, so both sides hold the same weights):

* ``matmul``   attainable float32 matmul rate: best of ``--repeats`` jitted ``n x n @ n x n``.
* ``sft``      one optimizer step (forward + loss + backward + AdamW with clipping): our jitted
               :func:`sftrl_jax.sft.step.make_train_step` with :func:`sftrl_jax.optim.make_optimizer`
               vs ``LlamaForCausalLM`` + ``torch.optim.AdamW``; the two are timed in alternation
               (and the matmul rate with them) so load from other processes hits both alike.
               FLOPs: :func:`sftrl_jax.flops.train_flops` = 3 x (2·N·T + 4·L·H·D·T²) per sequence.
* ``generate`` new tokens/s at batch 16, 128 new tokens, greedy, no EOS stop: our
               :func:`sftrl_jax.sampling.generate` vs ``model.generate`` with its KV cache.
* ``rollout``  the two sampling engines (``sampling.engine``: static, paged) on the same prompts, with
               response lengths from a log-normal capped at ``--rollout-cap`` (mean about a third of the cap)
               fixed per request through per-request limits (no stop id), at the same KV memory budget:
               useful tokens/s, slot utilisation (useful tokens / (slots x decode steps)) and KV bytes the
               decode steps' attention reads per useful token; ``--json`` keeps them under ``rollout``.
* ``decode_floor`` what the decode step's weight matmuls cost on their own: the memory read rate
               (a jitted sum over ``--floor-mb`` MB), then every weight matrix of the model's decode
               step timed as a ``--gen-batch``-row product with cold weights (each matrix cycles
               through ``--floor-copies`` distinct copies), both as ``x @ W`` (``W [in, out]``, our
               layout) and as ``(W^T @ x^T)^T`` (``W^T [out, in]``, the weight as the left operand);
               their sum is the step's matmul floor in each layout.
* ``memory``   (child process with 8 simulated devices) per-device bytes of parameters + optimizer
               state, from the state's shardings and from the compiled SFT step's
               ``memory_analysis()``, for mesh fsdp=8 vs data=8.

Accelerator sections (``--device gpu|tpu``; random weights, float32 master weights, bf16 matmuls):

* ``mfu``      SFT step MFU at sequence 4096 for the Qwen3-0.6B and Qwen2.5-1.5B shapes:
               ``train_flops / step time / peak``, peak bf16 dense FLOP/s per chip from PEAK_FLOPS.
* ``decode``   sampler decode tokens/s at batch 1, 64, 256 (Qwen2.5-1.5B shape, bf16 weights and
               cache) against the HBM roofline ``bandwidth / bytes per step`` (weights + the KV
               cache of the filled context), bandwidth measured with a large on-device copy.
* ``fit7b``    whether one full SFT step of the Qwen2.5-Math-7B shape (seq 4096, remat full) fits
               on one device (compiled ``memory_analysis()`` vs the device's memory), and its MFU.

Every timing is a best (and median) of ``--repeats`` after a warm-up (compilation excluded); each
record carries ``os.getloadavg()`` because the machine may be shared. ``--json PATH`` saves all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Peak dense bf16 FLOP/s per chip (vendor figures; no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "v5p": 459e12, "v6e": 918e12, "v6 lite": 918e12}

# Shapes of the public checkpoints (config.json fields that matter), random weights are used.
QWEN3_0_6B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                  tie_word_embeddings=True)
QWEN2_5_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True)
QWEN2_5_MATH_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
# The CPU comparison model: Llama shape, sized so that one SFT step takes ~1 s on 2 cores.
CPU_MODEL = dict(model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1408,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)
TINY_MODEL = dict(CPU_MODEL, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
TINY_QWEN3 = dict(QWEN3_0_6B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32)
TINY_QWEN2 = dict(QWEN2_5_1_5B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def log(msg: str) -> None:
    print(msg, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(times: list[float]) -> dict:
    return {"best_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def model_config(hf: dict):
    from sftrl_jax.models import ModelConfig

    return ModelConfig.from_hf_dict(hf)


# ============================================================================ shared measurements
def matmul_rate(n: int, dtype: str, repeats: int) -> dict:
    """Best FLOP/s of a jitted ``n x n @ n x n`` (the attainable matmul rate)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    times = [timed(lambda: mm(a, b).block_until_ready()) for _ in range(repeats)]
    return {"n": n, "dtype": dtype, "flops_per_s": 2 * n**3 / min(times), **summary(times), "load": load()}


def copy_bandwidth(nbytes: int, repeats: int) -> dict:
    """Device memory bandwidth from a large on-device elementwise copy (bytes read + written)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    copy(x).block_until_ready()
    times = [timed(lambda: copy(x).block_until_ready()) for _ in range(repeats)]
    return {"bytes": nbytes, "bytes_per_s": 2 * nbytes / min(times), **summary(times), "load": load()}


def sft_batch(config, rows: int, length: int, seed: int = 0):
    """One global batch ``[1, rows, length]`` as the trainer builds it (every token supervised)."""
    from sftrl_jax.data.batching import layout_step
    from sftrl_jax.data.sft import SFTExample

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (rows, length)).astype(np.int32)
    examples = [SFTExample(input_ids=row, loss_mask=np.ones(length, bool)) for row in ids]
    return ids, layout_step(examples, micro_steps=1, shards=1, micro_batch_size=rows, max_length=length, pack=False)


def sft_step_spec(model, shape, *, mesh, learning_rate=1e-5):
    """The SFT trainer's own ``train_step`` declaration (:func:`sftrl_jax.sft.step.sft_functions`) for ``model``
    on ``mesh`` and batches of ``shape`` = (micro-steps, rows, length), AdamW with clipping; and its context."""
    from sftrl_jax.config import OptimizerOptions
    from sftrl_jax.models import ModelOptions
    from sftrl_jax.sft import SFTConfig
    from sftrl_jax.sft.config import SFTDataSection, SFTTrainSection
    from sftrl_jax.sft.step import sft_functions
    from sftrl_jax.sharding import data_parallel_size
    from sftrl_jax.training import abstract_context

    micro_steps, rows, length = shape
    shards = data_parallel_size(mesh)
    config = SFTConfig(model=ModelOptions(path=""), data=SFTDataSection(max_length=length),
                       train=SFTTrainSection(global_batch_size=micro_steps * rows, micro_batch_size=rows // shards),
                       optimizer=OptimizerOptions(learning_rate=learning_rate, lr_schedule="constant",
                                                  weight_decay=0.0, max_grad_norm=1.0))
    ctx, _ = abstract_context(config, mesh, 1000, model=model)
    return sft_functions(ctx)["train_step"], ctx


def jax_train_step(model, batch_host, *, learning_rate=1e-5, mesh=None, donate=True):
    """(jitted step, state, device batch) for the real SFT step (the trainer's declaration) with AdamW +
    clipping; ``mesh`` default: one device."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sftrl_jax.sharding import make_mesh, place
    from sftrl_jax.training import train_state

    mesh = mesh if mesh is not None else make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    spec, ctx = sft_step_spec(model, batch_host["input_ids"].shape, mesh=mesh, learning_rate=learning_rate)
    if not donate:
        spec = dataclasses.replace(spec, donate_argnums=())
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model)))  # the step donates; keep the model's own
    state, _ = train_state(params, ctx.optimizer, mesh)  # exactly the trainers' layout
    batch = {k: place(v, spec.in_shardings[1]) for k, v in batch_host.items()}
    return spec.jit(), state, batch


def write_hf_model(hf: dict, directory: Path, seed: int = 0):
    """A ``transformers`` model from ``hf`` with its default random init (seeded), saved to ``directory``."""
    import torch
    import transformers

    arch = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[hf["model_type"]]
    config = getattr(transformers, arch)(**{k: v for k, v in hf.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return model


# ============================================================================ CPU: ours vs torch
def cpu_compare(args, results: dict) -> None:
    import jax
    import torch

    from sftrl_jax import flops
    from sftrl_jax.models import ModelOptions, load_pretrained
    from sftrl_jax.sampling import generate

    hf_dict = TINY_MODEL if args.smoke else CPU_MODEL
    sections = args.sections
    workdir = Path(tempfile.mkdtemp(prefix="sftrl-bench-"))
    torch_model = write_hf_model(hf_dict, workdir)
    model, config = load_pretrained(ModelOptions(path=str(workdir), scan_layers=not args.unroll_layers))
    results["cpu_model"] = {**hf_dict, "scan_layers": not args.unroll_layers,
                            "matmul_params": flops.matmul_params(config), "torch_threads": torch.get_num_threads()}
    mm_n = 256 if args.smoke else args.matmul_n

    if "matmul" in sections:
        log(f"[matmul] float32 {mm_n}^3, best of {args.repeats}")
        jax_mm = matmul_rate(mm_n, "float32", args.repeats)
        a, b = torch.randn(mm_n, mm_n), torch.randn(mm_n, mm_n)
        a @ b
        torch_times = [timed(lambda: a @ b) for _ in range(args.repeats)]
        results["matmul"] = {"jax": jax_mm, "torch": {"flops_per_s": 2 * mm_n**3 / min(torch_times),
                                                      **summary(torch_times), "load": load()}}
        log(f"  jnp.dot {jax_mm['flops_per_s'] / 1e9:.1f} GFLOP/s, torch.mm "
            f"{results['matmul']['torch']['flops_per_s'] / 1e9:.1f} GFLOP/s  load {load()}")

    if "sft" in sections:
        rows, length = (2, 32) if args.smoke else (args.sft_batch, args.sft_seq)
        ids, host_batch = sft_batch(config, rows, length)
        step, state, batch = jax_train_step(model, host_batch)
        step_flops = rows * flops.train_flops(config, length)

        torch_model.train()
        optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0)
        tids = torch.as_tensor(ids, dtype=torch.long)

        def torch_step():
            logits = torch_model(tids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     tids[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
            optimizer.step()
            return float(loss.detach())

        log(f"[sft] batch {rows} x {length} tokens, {step_flops / 1e9:.1f} GFLOP/step; jax and torch alternate")
        holder = {"state": state}

        def jax_step():
            holder["state"], metrics = step(holder["state"], batch)
            return float(jax.device_get(metrics["loss"]))

        first_loss_jax, first_loss_torch = jax_step(), torch_step()  # warm-up (compilation), same data
        jax_step(), torch_step()
        mm = jax.jit(lambda x, y: x @ y)
        xa = jax.random.normal(jax.random.key(0), (mm_n, mm_n))
        mm(xa, xa).block_until_ready()
        jt, tt, mt, loads = [], [], [], []
        for _ in range(args.repeats):
            jt.append(timed(jax_step))
            tt.append(timed(torch_step))
            mt.append(timed(lambda: mm(xa, xa).block_until_ready()))
            loads.append(load()[0])
        attainable = 2 * mm_n**3 / min(mt)
        tokens = rows * length
        res = {"batch": rows, "seq": length, "tokens_per_step": tokens, "flops_per_step": step_flops,
               "first_loss": {"jax": first_loss_jax, "torch": first_loss_torch},
               "jax": {**summary(jt), "tokens_per_s": tokens / min(jt), "flops_per_s": step_flops / min(jt)},
               "torch": {**summary(tt), "tokens_per_s": tokens / min(tt), "flops_per_s": step_flops / min(tt)},
               "attainable_flops_per_s": attainable, "load_1min": loads}
        res["jax"]["fraction_of_attainable"] = res["jax"]["flops_per_s"] / attainable
        res["torch"]["fraction_of_attainable"] = res["torch"]["flops_per_s"] / attainable
        res["speedup_vs_torch"] = min(tt) / min(jt)
        res["speedup_vs_torch_median"] = statistics.median(tt) / statistics.median(jt)
        results["sft"] = res
        log(f"  first loss jax {first_loss_jax:.5f} torch {first_loss_torch:.5f}")
        log(f"  jax   {res['jax']['tokens_per_s']:8.0f} tok/s  {res['jax']['flops_per_s'] / 1e9:6.1f} GFLOP/s "
            f"({res['jax']['fraction_of_attainable']:.0%} of {attainable / 1e9:.1f})  best {min(jt):.3f}s "
            f"median {statistics.median(jt):.3f}s")
        log(f"  torch {res['torch']['tokens_per_s']:8.0f} tok/s  {res['torch']['flops_per_s'] / 1e9:6.1f} GFLOP/s "
            f"({res['torch']['fraction_of_attainable']:.0%})  best {min(tt):.3f}s median {statistics.median(tt):.3f}s")
        log(f"  speedup {res['speedup_vs_torch']:.2f}x (median {res['speedup_vs_torch_median']:.2f}x)  "
            f"load {loads}")
        del holder, state, optimizer

    if "generate" in sections:
        rows, prompt_len, new = (2, 8, 4) if args.smoke else (args.gen_batch, args.gen_prompt, args.gen_new)
        rng = np.random.default_rng(1)
        prompts = rng.integers(1, config.vocab_size, (rows, prompt_len))
        prompt_lists = [list(map(int, p)) for p in prompts]
        torch_model.eval()
        tids = torch.as_tensor(prompts, dtype=torch.long)

        def ours():
            return generate(model, prompt_lists, max_new_tokens=new, temperature=0.0, eos_token_id=[],
                            batch_size=rows)

        def theirs():
            with torch.no_grad():
                return torch_model.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new,
                                            min_new_tokens=new, do_sample=False, pad_token_id=0)

        log(f"[generate] batch {rows}, prompt {prompt_len}, {new} new tokens, greedy, no EOS stop")
        samples, out = ours(), theirs()  # warm-up / compilation
        ours_tokens = np.asarray([s.tokens for s in samples])
        theirs_tokens = out[:, prompt_len:].numpy()
        assert ours_tokens.shape == theirs_tokens.shape == (rows, new), (ours_tokens.shape, theirs_tokens.shape)
        agree = float(np.mean(ours_tokens == theirs_tokens))
        jt, tt, loads = [], [], []
        for _ in range(args.gen_repeats):
            jt.append(timed(ours))
            tt.append(timed(theirs))
            loads.append(load()[0])
        res = {"batch": rows, "prompt": prompt_len, "new_tokens": new, "greedy_token_agreement": agree,
               "jax": {**summary(jt), "tokens_per_s": rows * new / min(jt)},
               "torch": {**summary(tt), "tokens_per_s": rows * new / min(tt)},
               "speedup_vs_torch": min(tt) / min(jt),
               "speedup_vs_torch_median": statistics.median(tt) / statistics.median(jt), "load_1min": loads}
        results["generate"] = res
        log(f"  jax   {res['jax']['tokens_per_s']:8.0f} new tok/s  best {min(jt):.3f}s "
            f"median {statistics.median(jt):.3f}s")
        log(f"  torch {res['torch']['tokens_per_s']:8.0f} new tok/s  best {min(tt):.3f}s "
            f"median {statistics.median(tt):.3f}s")
        log(f"  speedup {res['speedup_vs_torch']:.2f}x (median {res['speedup_vs_torch_median']:.2f}x), greedy tokens "
            f"agree {agree:.1%}  load {loads}")

    if "rollout" in sections:
        results["rollout"] = cpu_rollout(args, model)

    if "decode_floor" in sections:
        results["decode_floor"] = decode_floor(config, args)

    if "memory" in sections:
        results["memory"] = run_memory_child(args)


def decode_floor(config, args) -> dict:
    """The decode step's weight matmuls timed one by one with cold weights, in two weight layouts."""
    import jax
    import jax.numpy as jnp

    rows = 2 if args.smoke else args.gen_batch
    copies = 2 if args.smoke else args.floor_copies
    x = jnp.ones(((1 if args.smoke else args.floor_mb) * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    read = x.nbytes / min(timed(lambda x=x: total(x).block_until_ready()) for _ in range(args.repeats))
    del x
    c = config
    per_layer = {"q_proj": (c.hidden_size, c.num_heads * c.head_dim),
                 "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
                 "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
                 "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
                 "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
                 "down_proj": (c.intermediate_size, c.hidden_size)}
    matrices = {**{name: (shape, c.num_layers) for name, shape in per_layer.items()},
                "lm_head": ((c.hidden_size, c.vocab_size), 1)}
    right = jax.jit(lambda a, ws: [a @ w for w in ws])
    left = jax.jit(lambda a, wts: [jax.lax.dot_general(wt, a, (((1,), (1,)), ((), ()))).T for wt in wts])
    log(f"[decode_floor] memory read {read / 1e9:.1f} GB/s; {rows}-row products, cold weights")
    res = {"rows": rows, "read_bytes_per_s": read, "matrices": {}}
    floor = {"x @ W": 0.0, "(W^T @ x^T)^T": 0.0}
    for name, ((k, n), per_step) in matrices.items():
        a = jax.random.normal(jax.random.key(0), (rows, k))
        ws = [jax.random.normal(jax.random.key(i + 1), (k, n)) for i in range(copies)]
        wts = [jnp.asarray(w.T) for w in ws]
        entry = {"shape": [k, n], "per_step": per_step}
        for label, fn, weights in (("x @ W", right, ws), ("(W^T @ x^T)^T", left, wts)):
            jax.block_until_ready(fn(a, weights))
            each = min(timed(lambda fn=fn, a=a, weights=weights: jax.block_until_ready(fn(a, weights)))
                       for _ in range(args.repeats)) / copies
            entry[label] = {"seconds": each, "weight_bytes_per_s": k * n * 4 / each}
            floor[label] += per_step * each
        res["matrices"][name] = entry
        log(f"  {name:9s} [{k}, {n}] x{per_step}: x @ W {entry['x @ W']['seconds'] * 1e3:.3f} ms "
            f"({entry['x @ W']['weight_bytes_per_s'] / 1e9:.1f} GB/s), (W^T @ x^T)^T "
            f"{entry['(W^T @ x^T)^T']['seconds'] * 1e3:.3f} ms "
            f"({entry['(W^T @ x^T)^T']['weight_bytes_per_s'] / 1e9:.1f} GB/s)")
    res["floor_seconds_per_step"] = floor
    log(f"  matmul floor per decode step: x @ W {floor['x @ W'] * 1e3:.1f} ms, "
        f"(W^T @ x^T)^T {floor['(W^T @ x^T)^T'] * 1e3:.1f} ms")
    return res


# ============================================================================ memory on 8 devices
def run_memory_child(args) -> dict:
    """Re-run this script with 8 simulated CPU devices (XLA_FLAGS must be set before jax starts)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(out)]
        if args.smoke:
            cmd.append("--smoke")
        log("[memory] 8 simulated devices: " + " ".join(cmd[1:]))
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def per_device_bytes(tree, device) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total


def memory_child(path: str, smoke: bool) -> None:
    import jax

    from sftrl_jax.models import init_model
    from sftrl_jax.sharding import make_mesh

    assert jax.device_count() == 8, "memory section needs 8 (simulated) devices"
    hf = TINY_MODEL if smoke else CPU_MODEL
    config = model_config(hf)
    rows, length = (8, 16) if smoke else (8, 128)
    _, host_batch = sft_batch(config, rows, length)
    out = {"model": hf, "batch": [rows, length], "load": load()}
    for name, spec in (("fsdp8", {"data": 1, "fsdp": 8, "tensor": 1}), ("data8", {"data": 8, "fsdp": 1, "tensor": 1})):
        mesh = make_mesh(spec)
        model = init_model(config, mesh=mesh)
        step, state, batch = jax_train_step(model, host_batch, mesh=mesh, donate=True)
        device = jax.devices()[0]
        compiled = step.lower(state, batch).compile()
        analysis = compiled.memory_analysis()
        rec = {
            "mesh": spec,
            "params_bytes_per_device": per_device_bytes(state["params"], device),
            "opt_state_bytes_per_device": per_device_bytes(state["opt_state"], device),
            "params_bytes_total": sum(x.nbytes for x in jax.tree.leaves(state["params"])),
        }
        rec["state_bytes_per_device"] = rec["params_bytes_per_device"] + rec["opt_state_bytes_per_device"]
        if analysis is not None:
            rec["compiled"] = {k: int(getattr(analysis, k)) for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes")}
        state, metrics = step(state, batch)  # it runs, too
        rec["loss"] = float(metrics["loss"])
        out[name] = rec
        del model, state
    out["state_ratio_fsdp8_over_data8"] = (out["fsdp8"]["state_bytes_per_device"]
                                           / out["data8"]["state_bytes_per_device"])
    if "compiled" in out["fsdp8"]:
        args8 = out["fsdp8"]["compiled"]["argument_size_in_bytes"]
        args1 = out["data8"]["compiled"]["argument_size_in_bytes"]
        out["argument_ratio_fsdp8_over_data8"] = args8 / args1
    Path(path).write_text(json.dumps(out, indent=1))
    log(f"  per device params+opt: fsdp=8 {out['fsdp8']['state_bytes_per_device'] / 2**20:.2f} MiB, "
        f"data=8 {out['data8']['state_bytes_per_device'] / 2**20:.2f} MiB, ratio "
        f"{out['state_ratio_fsdp8_over_data8']:.4f} (target <= 1/7 = 0.1429)")
    if "argument_ratio_fsdp8_over_data8" in out:
        log(f"  compiled step arguments per device: fsdp=8 {args8 / 2**20:.2f} MiB, data=8 {args1 / 2**20:.2f} MiB, "
            f"ratio {out['argument_ratio_fsdp8_over_data8']:.4f} (includes the batch)")


# ============================================================================ accelerator
def peak_flops(device_kind: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value, f"table ({key})"
    return None, "unknown device: pass --peak-tflops"


def is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def accel_sft(hf: dict, *, seq: int, batch: int, remat: str, repeats: int, peak: float | None) -> dict:
    """MFU of the real SFT step (float32 params + AdamW state, bf16 matmuls), halving the batch on OOM."""
    import jax

    from sftrl_jax import flops
    from sftrl_jax.models import ModelOptions, init_model

    config = model_config(hf)
    while batch >= 1:
        try:
            model = init_model(config, ModelOptions(path="", dtype="float32", compute_dtype="bfloat16", remat=remat))
            _, host_batch = sft_batch(config, batch, seq)
            step, state, dev_batch = jax_train_step(model, host_batch)
            del model
            state, metrics = step(state, dev_batch)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                state, metrics = step(state, dev_batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
            step_flops = batch * flops.train_flops(config, seq)
            rec = {"batch": batch, "seq": seq, "remat": remat, "flops_per_step": step_flops, **summary(times),
                   "tokens_per_s": batch * seq / min(times), "flops_per_s": step_flops / min(times),
                   "loss": float(metrics["loss"]), "load": load()}
            if peak:
                rec["mfu"] = rec["flops_per_s"] / peak
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                rec["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
            del state
            return rec
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(err) or batch == 1:
                raise
            log(f"  batch {batch} out of memory, trying {batch // 2}")
            batch //= 2
    raise RuntimeError("unreachable")


def accel_decode(hf: dict, *, batches, prompt: int, new: int, bandwidth: float, repeats: int) -> list[dict]:
    """Decode tokens/s of the sampler vs the HBM roofline, per batch size.

    Decode time = generate(new) - generate(1) (same prompt, so the prefill cancels); bytes per step
    = parameters + K and V of the filled context (prompt + new/2 on average) for every row.
    """
    import jax
    import jax.numpy as jnp

    from sftrl_jax.models import ModelOptions, init_model
    from sftrl_jax.sampling import generate

    config = model_config(hf)
    model = init_model(config, ModelOptions(path="", dtype="bfloat16"))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx_state(model)))
    rng = np.random.default_rng(0)
    out = []
    for rows in batches:
        prompts = [list(map(int, p)) for p in rng.integers(1, config.vocab_size, (rows, prompt))]

        def run(n, prompts=prompts, rows=rows):
            return generate(model, prompts, max_new_tokens=n, temperature=1.0, eos_token_id=[], batch_size=rows)

        run(1), run(new)
        short = [timed(lambda: run(1)) for _ in range(repeats)]
        long = [timed(lambda: run(new)) for _ in range(repeats)]
        step_s = (min(long) - min(short)) / (new - 1)
        context = prompt + new / 2
        kv_bytes = 2 * config.num_layers * rows * config.num_kv_heads * config.head_dim * context * \
            jnp.dtype(model.dtype).itemsize
        bytes_per_step = weight_bytes + kv_bytes
        roofline_tps = rows * bandwidth / bytes_per_step
        rec = {"batch": rows, "prompt": prompt, "new_tokens": new, "step_s": step_s, "tokens_per_s": rows / step_s,
               "bytes_per_step": bytes_per_step, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
               "roofline_tokens_per_s": roofline_tps, "fraction_of_roofline": rows / step_s / roofline_tps,
               "generate_best_s": {"1": min(short), str(new): min(long)}, "load": load()}
        out.append(rec)
        log(f"  batch {rows:4d}: {rec['tokens_per_s']:10.0f} tok/s, {step_s * 1e3:.2f} ms/step, "
            f"roofline {roofline_tps:10.0f} tok/s -> {rec['fraction_of_roofline']:.0%}")
    return out


def nnx_state(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model))


def accel_fit(hf: dict, *, seq: int, batch: int, remat: str, repeats: int, peak: float | None,
              run_step: bool = True) -> dict:
    """Does one SFT step fit on one device? Compile abstractly first (nothing allocated), compare the
    compiled ``memory_analysis()`` with the device's memory, then run it if it fits."""
    import jax

    from sftrl_jax.models import ModelOptions, abstract_model
    from sftrl_jax.sharding import make_mesh

    config = model_config(hf)
    mesh = make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    abstract = abstract_model(config, ModelOptions(path="", dtype="float32", compute_dtype="bfloat16", remat=remat),
                              mesh)
    _, host_batch = sft_batch(config, batch, seq)
    spec, _ = sft_step_spec(abstract, host_batch["input_ids"].shape, mesh=mesh)
    state = spec.args[0]
    start = time.perf_counter()
    compiled = spec.lower().compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    rec = {"batch": batch, "seq": seq, "remat": remat, "compile_s": compile_s,
           "state_bytes": sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))}
    if analysis is not None:
        mem = {k: int(getattr(analysis, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                        "alias_size_in_bytes", "temp_size_in_bytes")}
        mem["predicted_peak_bytes"] = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
                                       - mem["alias_size_in_bytes"] + mem["temp_size_in_bytes"])
        rec["compiled"] = mem
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        rec["device_bytes_limit"] = int(stats["bytes_limit"])
        if "compiled" in rec:
            rec["fits_predicted"] = rec["compiled"]["predicted_peak_bytes"] <= rec["device_bytes_limit"]
    if run_step and rec.get("fits_predicted", True):
        try:
            rec["run"] = accel_sft(hf, seq=seq, batch=batch, remat=remat, repeats=repeats, peak=peak)
            rec["fits"] = True
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            rec["fits"], rec["error"] = False, str(err).splitlines()[0][:300]
    return rec


def accel_bench(args, results: dict) -> None:
    import jax

    device = jax.devices()[0]
    peak, peak_source = peak_flops(device.device_kind, args.peak_tflops)
    if args.smoke and peak is None:
        peak, peak_source = matmul_rate(256, "float32", 2)["flops_per_s"], "smoke: measured float32 matmul"
    results["accelerator"] = {"device_kind": device.device_kind, "platform": device.platform,
                              "device_count": jax.device_count(), "peak_flops": peak, "peak_source": peak_source}
    log(f"[accelerator] {device.device_kind} x{jax.device_count()}, peak {peak and peak / 1e12:.0f} TFLOP/s "
        f"({peak_source})")
    sections = args.sections
    if "matmul" in sections:
        n = 256 if args.smoke else 8192
        dtype = "float32" if args.smoke else "bfloat16"
        mm = matmul_rate(n, dtype, args.repeats)
        results["accelerator"]["matmul"] = mm
        log(f"  {dtype} matmul {n}^3: {mm['flops_per_s'] / 1e12:.1f} TFLOP/s"
            + (f" ({mm['flops_per_s'] / peak:.0%} of peak)" if peak else ""))
    if "mfu" in sections:
        shapes = {"qwen3-0.6b": TINY_QWEN3} if args.smoke else \
            {"qwen3-0.6b": QWEN3_0_6B, "qwen2.5-1.5b": QWEN2_5_1_5B}
        seq = 32 if args.smoke else args.accel_seq
        results["mfu"] = {}
        for name, hf in shapes.items():
            rec = accel_sft(hf, seq=seq, batch=2 if args.smoke else args.accel_batch, remat=args.remat,
                            repeats=args.repeats, peak=peak)
            results["mfu"][name] = rec
            log(f"[mfu] {name}: batch {rec['batch']} x {seq}, {rec['tokens_per_s']:.0f} tok/s, "
                f"{rec['flops_per_s'] / 1e12:.2f} TFLOP/s" + (f", MFU {rec['mfu']:.1%}" if "mfu" in rec else ""))
    if "decode" in sections:
        bw = copy_bandwidth(2**20 if args.smoke else 2**31, args.repeats)
        results["bandwidth"] = bw
        log(f"[decode] copy bandwidth {bw['bytes_per_s'] / 1e9:.0f} GB/s")
        results["decode"] = accel_decode(TINY_QWEN2 if args.smoke else QWEN2_5_1_5B,
                                         batches=(2,) if args.smoke else (1, 64, 256),
                                         prompt=8 if args.smoke else args.decode_prompt,
                                         new=4 if args.smoke else args.decode_new,
                                         bandwidth=bw["bytes_per_s"], repeats=max(1, args.repeats // 2))
    if "fit7b" in sections:
        hf = TINY_QWEN2 if args.smoke else QWEN2_5_MATH_7B
        rec = accel_fit(hf, seq=32 if args.smoke else args.accel_seq, batch=1, remat="full",
                        repeats=args.repeats, peak=peak)
        results["fit7b"] = rec
        comp = rec.get("compiled", {})
        log(f"[fit7b] predicted peak {comp.get('predicted_peak_bytes', 0) / 2**30:.1f} GiB, device limit "
            f"{rec.get('device_bytes_limit', 0) / 2**30:.1f} GiB, fits {rec.get('fits')}"
            + (f", MFU {rec['run']['mfu']:.1%}" if "mfu" in rec.get("run", {}) else ""))


def cpu_rollout(args, model) -> dict:
    """Both engines on the same prompts and per-request lengths, at the same KV memory budget.

    The lengths are enforced through per-request limits with no stop id (a random model would otherwise
    end responses anywhere), so both engines generate exactly the same tokens. The budget is the static
    engine's cache (``--rollout-batch`` rows of prompt + cap positions); the paged engine gets a pool of
    that many tokens and ``--rollout-slots`` slots.
    """
    from sftrl_jax.aot.rollout import LENGTH_SEED, lognormal_lengths
    from sftrl_jax.paged import DEFAULT_PAGE_SIZE, resolve_paged_attention
    from sftrl_jax.sampling import generate, kv_bytes_per_token

    smoke = args.smoke
    requests, prompt_len, cap = (6, 8, 16) if smoke else (args.rollout_requests, args.rollout_prompt, args.rollout_cap)
    batch, slots = (2, 4) if smoke else (args.rollout_batch, args.rollout_slots)
    page_size = args.rollout_page_size or DEFAULT_PAGE_SIZE
    rng = np.random.default_rng(LENGTH_SEED)
    lengths = lognormal_lengths(requests, cap, rng)
    prompts = [list(map(int, p)) for p in rng.integers(1, model.config.vocab_size, (requests, prompt_len))]
    budget_tokens = batch * (prompt_len + cap)  # the static engine's cache
    num_pages = budget_tokens // page_size + 1  # the same bytes, plus the scratch page
    common = dict(max_new_tokens=lengths.tolist(), temperature=1.0, eos_token_id=[], seed=0)
    engines = {"static": dict(batch_size=batch),
               "paged": dict(engine="paged", max_slots=slots, page_size=page_size, num_pages=num_pages)}
    log(f"[rollout] {requests} requests, prompt {prompt_len}, lengths log-normal capped at {cap} (mean "
        f"{lengths.mean():.1f}), KV budget {budget_tokens} tokens: static batch {batch}, paged {slots} slots x "
        f"{num_pages} pages of {page_size}")
    out: dict = {"requests": requests, "prompt": prompt_len, "cap": cap, "mean_length": float(lengths.mean()),
                 "useful_tokens": int(lengths.sum()), "kv_budget_tokens": budget_tokens,
                 "kv_bytes_per_token": kv_bytes_per_token(model), "page_size": page_size, "num_pages": num_pages,
                 "static_batch": batch, "paged_slots": slots,
                 "paged_attention": resolve_paged_attention("auto", model.platform, model.config.head_dim)}
    # warm-up (compilation) on a share of the requests, one of them at the cap (the shapes the run compiles)
    warm = min(requests, 2 * slots)
    warm_limits = [cap] + lengths[1:warm].tolist()
    for kwargs in engines.values():
        generate(model, prompts[:warm], **{**common, "max_new_tokens": warm_limits}, **kwargs)
    repeats = 1 if smoke else args.gen_repeats
    runs = {name: [] for name in engines}
    samples, loads = {}, []
    for _ in range(repeats):  # the engines alternate, so load hits both alike
        for name, kwargs in engines.items():
            stats: dict = {}
            samples[name] = generate(model, prompts, **common, **kwargs, stats=stats)
            runs[name].append(stats)
        loads.append(load()[0])
    for name in engines:
        best = max(runs[name], key=lambda r: r["useful_tokens_per_s"])
        out[name] = {"useful_tokens_per_s": best["useful_tokens_per_s"],
                     "useful_tokens_per_s_median": statistics.median(r["useful_tokens_per_s"] for r in runs[name]),
                     "slot_utilisation": best["slot_utilisation"], "decode_steps": best["decode_steps"],
                     "seconds": best["seconds"], "kv_bytes_read_per_useful_token":
                         best["kv_bytes_read"] / best["useful_tokens"], "max_pages_in_use": best["max_pages_in_use"]}
    out["speedup"] = out["paged"]["useful_tokens_per_s"] / out["static"]["useful_tokens_per_s"]
    out["speedup_median"] = out["paged"]["useful_tokens_per_s_median"] / out["static"]["useful_tokens_per_s_median"]
    out["utilisation_ratio"] = out["paged"]["slot_utilisation"] / out["static"]["slot_utilisation"]
    out["kv_bytes_ratio"] = (out["static"]["kv_bytes_read_per_useful_token"]
                             / out["paged"]["kv_bytes_read_per_useful_token"])
    out["identical_samples"] = float(np.mean([a.tokens == b.tokens for a, b in zip(samples["static"],
                                                                                     samples["paged"])]))
    out["load_1min"] = loads
    for name in engines:
        r = out[name]
        log(f"  {name:6s} {r['useful_tokens_per_s']:8.1f} useful tok/s  utilisation {r['slot_utilisation']:.1%}  "
            f"{r['decode_steps']} steps  KV read {r['kv_bytes_read_per_useful_token'] / 1e3:.1f} kB/useful token")
    log(f"  paged / static: {out['speedup']:.2f}x useful tok/s (median {out['speedup_median']:.2f}x), "
        f"{out['utilisation_ratio']:.2f}x utilisation, {out['kv_bytes_ratio']:.2f}x fewer KV bytes per useful token; "
        f"identical samples {out['identical_samples']:.0%}  load {loads}")
    return out


# ============================================================================ main
CPU_SECTIONS = ("matmul", "sft", "generate", "rollout", "decode_floor", "memory")
ACCEL_SECTIONS = ("matmul", "mfu", "decode", "fit7b")


def environment() -> dict:
    import jax

    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()][:1],
            "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "load": load()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                  if line.startswith("Model name")), platform.processor())
    except OSError:
        info["cpu_model"] = platform.processor()
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu", "tpu"])
    p.add_argument("--smoke", action="store_true", help="every code path at toy sizes (CPU and accelerator)")
    p.add_argument("--sections", default=None, help="comma list; CPU: matmul,sft,generate,rollout,decode_floor,memory; "
                   "accelerator: "
                   "matmul,mfu,decode,fit7b (default: all of the device's)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--matmul-n", type=int, default=4096)
    p.add_argument("--sft-batch", type=int, default=4)
    p.add_argument("--sft-seq", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-prompt", type=int, default=64)
    p.add_argument("--gen-new", type=int, default=128)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--rollout-requests", type=int, default=640, help="rollout: requests (one sample each)")
    p.add_argument("--rollout-prompt", type=int, default=64, help="rollout: prompt tokens")
    p.add_argument("--rollout-cap", type=int, default=256, help="rollout: the response length cap")
    p.add_argument("--rollout-batch", type=int, default=16, help="rollout: static batch (sets the KV budget)")
    p.add_argument("--rollout-slots", type=int, default=32, help="rollout: the paged engine's slots")
    p.add_argument("--rollout-page-size", type=int, default=None, help="rollout: tokens per page (default 16)")
    p.add_argument("--floor-mb", type=int, default=256, help="decode_floor: MB summed for the memory read rate")
    p.add_argument("--floor-copies", type=int, default=24, help="decode_floor: distinct copies of each matrix")
    p.add_argument("--accel-seq", type=int, default=4096)
    p.add_argument("--accel-batch", type=int, default=8, help="sequences per SFT step (halved on OOM)")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--unroll-layers", action="store_true", help="CPU sections: model.scan_layers=false")
    p.add_argument("--decode-prompt", type=int, default=512)
    p.add_argument("--decode-new", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.smoke)
        return {}
    import jax

    device = args.device
    if device == "auto":
        backend = jax.default_backend()
        device = "tpu" if backend == "tpu" else ("gpu" if backend in ("gpu", "cuda", "rocm") else "cpu")
    if args.smoke:
        args.repeats = min(args.repeats, 2)
        args.gen_repeats = 1
    results = {"environment": environment(), "device": device, "smoke": args.smoke, "argv": sys.argv[1:]}
    log(f"sftrl-jax bench: {results['environment']}")
    if device == "cpu":
        args.sections = tuple((args.sections or ",".join(CPU_SECTIONS)).split(","))
        cpu_compare(args, results)
        if args.smoke:  # the accelerator code paths, at toy sizes on CPU, so they cannot rot
            args.sections = ACCEL_SECTIONS
            accel_bench(args, results)
    else:
        args.sections = tuple((args.sections or ",".join(ACCEL_SECTIONS)).split(","))
        accel_bench(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        log(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
