"""The GRPO loop: sample -> score -> advantages -> old/ref log-probs -> mini-batch updates.

Each step samples ``rl.prompts_per_step`` prompts x ``rl.group_size`` responses with the shared
sampler from the current policy, scores them with the shared reward (or a ``reward_fn`` given by
the caller), and updates the policy in ``rl.mini_batches_per_step`` mini-batches for
``rl.ppo_epochs`` epochs, each mini-batch with exact accumulation over micro-batches.

With several processes (:mod:`sftrl_jax.distributed`) every process runs the same loop: sampling
is one SPMD program over the global mesh (each device generates its rows, the tokens are gathered
to every process), each process grades a contiguous share of the responses and the rewards are
gathered, so all processes hold identical rollouts; each update then places only the process's own
rows on its devices, and the gradient step is over the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ..data.batching import EpochSampler, bucket_length
from ..data.prompts import load_prompt_items
from ..distributed import initialize, map_rows_across_processes
from ..flops import generation_flops, train_flops
from ..metrics import MetricsWriter, is_writer, plot_curves, read_metrics
from ..models import load_tokenizer, save_pretrained
from ..optim import make_optimizer
from ..sampling import generate, sampling_layout
from ..sharding import make_mesh, named_sharding, place, to_host
from ..training import init_train_state, open_checkpoints, prepare_output, stop_on_nonfinite
from .algorithms import compute_advantages, kl_penalty, overlong_penalty
from .config import RLConfig
from .step import make_grpo_step, make_logprob_fn

log = logging.getLogger("sftrl_jax.rl")

# reward_fn(responses, ground_truths, response_token_ids) -> scores in [0, 1]
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Sequence[int]]], Sequence[float]]


class DynamicSamplingError(RuntimeError):
    """Dynamic sampling could not fill a step's batch with non-degenerate groups within the cap."""


@dataclasses.dataclass
class RLResult:
    output_dir: Path
    final_dir: Path
    steps: int
    params: dict
    metrics: list[dict]


@dataclasses.dataclass
class Rollouts:
    prompts: list[list[int]]  # one per sequence (repeated within a group)
    responses: list[list[int]]
    sampler_logprobs: list[list[float]]
    truncated: list[bool]
    correctness: list[float]
    rewards: list[float]
    rounds: int = 1
    dropped_groups: int = 0


def check_batch_sizes(cfg, shards: int) -> int:
    """Micro-steps per mini-batch; raises naming the keys when the sizes do not divide."""
    sequences = cfg.prompts_per_step * cfg.group_size
    if sequences % cfg.mini_batches_per_step:
        raise ValueError(f"rl.prompts_per_step x rl.group_size ({sequences}) must be a multiple of "
                         f"rl.mini_batches_per_step ({cfg.mini_batches_per_step})")
    mini = sequences // cfg.mini_batches_per_step
    if mini % (cfg.micro_batch_size * shards):
        raise ValueError(f"a mini-batch of {mini} sequences must be a multiple of rl.micro_batch_size "
                         f"({cfg.micro_batch_size}) x data-parallel shards ({shards})")
    return mini // (cfg.micro_batch_size * shards)


def rollout_arrays(rollouts: Rollouts, *, max_new_tokens: int, mask_truncated: bool, pad_id: int) -> dict:
    """``[S, P+R]`` sequences (left-padded prompt, right-padded response) and ``[S, R]`` response arrays."""
    count = len(rollouts.responses)
    prompt_len = bucket_length(max(map(len, rollouts.prompts)), maximum=1 << 30, minimum=16)
    response_len = bucket_length(max(max(map(len, rollouts.responses)), 1), maximum=max_new_tokens, minimum=16)
    ids = np.full((count, prompt_len + response_len), pad_id, np.int32)
    attention = np.zeros_like(ids)
    response_ids = np.full((count, response_len), pad_id, np.int32)
    response_mask = np.zeros((count, response_len), np.float32)
    sampler_logp = np.zeros((count, response_len), np.float32)
    for row, (prompt, response) in enumerate(zip(rollouts.prompts, rollouts.responses)):
        ids[row, prompt_len - len(prompt):prompt_len] = prompt
        attention[row, prompt_len - len(prompt):prompt_len + len(response)] = 1
        ids[row, prompt_len:prompt_len + len(response)] = response
        response_ids[row, :len(response)] = response
        if not (mask_truncated and rollouts.truncated[row]):
            response_mask[row, :len(response)] = 1.0
        sampler_logp[row, :len(response)] = rollouts.sampler_logprobs[row]
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "positions": positions, "response_ids": response_ids,
            "response_mask": response_mask, "sampler_logp": sampler_logp}


def _layout(arrays: dict, rows_per_micro: int) -> dict:
    """``[S, ...] -> [S / rows, rows, ...]``: consecutive rows form a micro-step (shard-contiguous)."""
    return {k: v.reshape(v.shape[0] // rows_per_micro, rows_per_micro, *v.shape[1:]) for k, v in arrays.items()}


def default_reward_fn(pool, require_think: bool) -> RewardFn:
    def score(responses, ground_truths, _token_ids):
        result = pool.score_batch(list(responses), list(ground_truths), require_think=require_think)
        if result.num_timeouts:
            log.warning("%d responses timed out in grading (scored 0)", result.num_timeouts)
        return result.scores

    return score


def run_rl(config: RLConfig, *, resume: bool = False, progress: bool = True, reward_fn: RewardFn | None = None,
           on_step: Callable[[int, dict], None] | None = None, probe=None) -> RLResult:
    """Run (or with ``resume`` continue) GRPO as configured.

    ``probe`` (optional, see :mod:`sftrl_jax.pipeline`) is measured before the first step, every
    ``probe.every`` steps and at the end; its values go into ``metrics.jsonl``.
    """
    cfg = config.rl
    initialize(config.distributed)
    out = prepare_output(config)
    mesh = make_mesh(config.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    check_batch_sizes(cfg, shards)
    rows_per_micro = cfg.micro_batch_size * shards
    tokenizer = load_tokenizer(config.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items, skipped = load_prompt_items(config.data, tokenizer)
    files = ", ".join(map(str, config.data.files))
    if not items:
        raise ValueError(f"data.files ({files}): no usable prompts ({skipped['bad_rows']} bad rows, "
                         f"{skipped['prompt_too_long']} longer than data.max_prompt_length); nothing to train on")
    if not any(item.prompt_ids for item in items):  # e.g. a model directory without its tokenizer files
        raise ValueError(f"data.files ({files}): all {len(items)} prompts tokenise to no tokens with the tokenizer "
                         f"of {config.model.path} (are its tokenizer.json / tokenizer_config.json missing?); "
                         f"nothing to train on")
    prompt_sampler = EpochSampler(len(items), cfg.prompts_per_step, seed=cfg.seed, shuffle=config.data.shuffle)
    total_steps = cfg.max_steps or cfg.num_epochs * prompt_sampler.batches_per_epoch
    updates_per_step = cfg.mini_batches_per_step * cfg.ppo_epochs

    optimizer, schedule = make_optimizer(cfg, total_steps * updates_per_step)
    graphdef, model_config, state, state_shardings = init_train_state(config.model, mesh, optimizer)
    eos_ids = sorted({tokenizer.eos_token_id, *model_config.eos_token_ids} - {None})
    # frozen reference: the starting parameters (copied before any restore, so a resumed run has it too)
    ref_params = jax.tree.map(jnp.copy, state["params"]) if cfg.kl_coef > 0 else None
    checkpointer, state, meta = open_checkpoints(out, config.checkpoint, state, resume=resume)
    start_step, flops = 0, {"flops_train": 0.0, "flops_generate": 0.0}
    if meta is not None:
        prompt_sampler.load_state_dict(meta["data"])
        start_step, flops = int(meta["step"]), meta["flops"]

    batch_sharding = named_sharding((None, "batch"), mesh)
    update = jax.jit(make_grpo_step(graphdef, optimizer, schedule, cfg),
                     in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                     donate_argnums=0)
    logprobs_of = jax.jit(make_logprob_fn(graphdef, cfg.temperature),
                          in_shardings=(state_shardings["params"], batch_sharding))

    def on_devices(arrays):
        return {k: place(v, named_sharding((None, "batch") + (None,) * (v.ndim - 2), mesh)) for k, v in arrays.items()}

    def collect(step: int, params, score) -> Rollouts:
        policy = sampling_layout(nnx.merge(graphdef, params))  # once per rollout phase (decode layout)
        out_rollouts = Rollouts([], [], [], [], [], [])
        groups = 0
        while groups < cfg.prompts_per_step:
            if out_rollouts.rounds > cfg.max_generation_rounds:
                raise DynamicSamplingError(
                    f"dynamic sampling: only {groups} of {cfg.prompts_per_step} prompt groups had rewards that "
                    f"differ after {cfg.max_generation_rounds} generation rounds (rl.max_generation_rounds) at "
                    f"step {step}; the prompts are too easy or too hard for this model")
            chunk = [items[i] for i in prompt_sampler.next()]
            samples = generate(policy, [it.prompt_ids for it in chunk], max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=eos_ids,
                               seed=cfg.seed * 1_000_003 + step * 1009 + out_rollouts.rounds, n=cfg.group_size,
                               batch_size=cfg.generation_batch_size, pad_token_id=pad_id)
            bodies = [s.tokens[:-1] if s.stop_reason == "eos" else s.tokens for s in samples]
            texts = tokenizer.batch_decode(bodies, skip_special_tokens=False)
            truths = [chunk[s.prompt_index].ground_truth for s in samples]
            tick = time.perf_counter()
            # each process grades its share of the rollouts; all get the same full vector
            correctness = map_rows_across_processes(score, texts, truths, [s.tokens for s in samples])
            timing["score"] += time.perf_counter() - tick
            lengths = [len(s.tokens) for s in samples]
            rewards = correctness + np.asarray(overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer_len,
                                                                cfg.overlong_penalty_factor))
            for g in range(len(chunk)):
                rows = range(g * cfg.group_size, (g + 1) * cfg.group_size)
                if cfg.dynamic_sampling and np.ptp(rewards[list(rows)]) == 0:
                    out_rollouts.dropped_groups += 1
                    continue
                if groups == cfg.prompts_per_step:
                    break
                groups += 1
                for r in rows:
                    out_rollouts.prompts.append(chunk[g].prompt_ids)
                    out_rollouts.responses.append(samples[r].tokens)
                    out_rollouts.sampler_logprobs.append(samples[r].logprobs)
                    out_rollouts.truncated.append(samples[r].stop_reason == "length")
                    out_rollouts.correctness.append(float(correctness[r]))
                    out_rollouts.rewards.append(float(rewards[r]))
            out_rollouts.rounds += 1
        out_rollouts.rounds -= 1
        return out_rollouts

    writer = MetricsWriter(out / "metrics.jsonl", truncate_after_step=start_step)
    if probe is not None and start_step == 0:
        writer.write({"step": 0, **probe.measure(graphdef, state["params"])})
    bar = tqdm(total=total_steps, initial=start_step, desc="rl", disable=not (progress and is_writer()),
               dynamic_ncols=True)
    step = start_step
    with contextlib.ExitStack() as stack:
        if reward_fn is None:
            from ..rewards import RewardPool

            pool = stack.enter_context(RewardPool(num_workers=cfg.reward_workers, timeout_s=cfg.reward_timeout_s))
            reward_fn = default_reward_fn(pool, cfg.require_think)
        stack.callback(bar.close)
        stack.callback(checkpointer.close)
        while step < total_steps:
            timing = {"generate": 0.0, "score": 0.0, "train": 0.0}
            tick = time.perf_counter()
            rollouts = collect(step, state["params"], reward_fn)
            timing["generate"] = time.perf_counter() - tick - timing["score"]

            tick = time.perf_counter()
            arrays = rollout_arrays(rollouts, max_new_tokens=cfg.max_new_tokens, mask_truncated=cfg.mask_truncated,
                                    pad_id=pad_id)
            arrays["advantages"] = np.asarray(compute_advantages(rollouts.rewards, cfg.group_size,
                                                                 norm_by_std=cfg.norm_adv_by_std))
            sampler_logp = arrays.pop("sampler_logp")
            laid = on_devices(_layout(arrays, rows_per_micro))
            recomputed = to_host(logprobs_of(state["params"], laid)).reshape(sampler_logp.shape)
            mask = arrays["response_mask"] > 0
            mismatch = {
                "logprob_mismatch_abs": float(np.abs(recomputed - sampler_logp)[mask].mean()) if mask.any() else 0.0,
                "logprob_mismatch_kl": float(np.asarray(kl_penalty(jnp.asarray(recomputed),
                                                                   jnp.asarray(sampler_logp)))[mask].mean())
                if mask.any() else 0.0,
            }
            arrays["old_logp"] = recomputed if cfg.old_logprobs == "recompute" else sampler_logp
            if ref_params is not None:
                arrays["ref_logp"] = to_host(logprobs_of(ref_params, laid)).reshape(sampler_logp.shape)
            mini = len(rollouts.responses) // cfg.mini_batches_per_step
            update_metrics = []
            for _ in range(cfg.ppo_epochs):
                for j in range(cfg.mini_batches_per_step):
                    part = {k: v[j * mini:(j + 1) * mini] for k, v in arrays.items()}
                    state, metrics = update(state, on_devices(_layout(part, rows_per_micro)))
                    update_metrics.append(jax.device_get(metrics))
            timing["train"] = time.perf_counter() - tick
            step += 1

            summary = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
            if not all(math.isfinite(v) for v in summary.values()):
                stop_on_nonfinite(step, str(summary), checkpointer)
            lengths = np.array([len(r) for r in rollouts.responses])
            groups = np.asarray(rollouts.correctness).reshape(-1, cfg.group_size)
            for prompt, response in zip(rollouts.prompts[::cfg.group_size], np.split(lengths, len(groups))):
                flops["flops_generate"] += sum(generation_flops(model_config, len(prompt), int(n), prefill=k == 0)
                                               for k, n in enumerate(response))
            forward_passes = 3 * cfg.ppo_epochs + 1 + (ref_params is not None)  # updates + old (+ ref) log-probs
            flops["flops_train"] += sum(train_flops(model_config, len(p) + n) / 3 * forward_passes
                                        for p, n in zip(rollouts.prompts, lengths))
            seconds = sum(timing.values())
            record = {
                "step": step, "reward_mean": float(np.mean(rollouts.rewards)),
                "accuracy": float(np.mean(rollouts.correctness)),
                "all_correct_share": float(np.mean(groups.min(axis=1) >= 1.0)),
                "all_wrong_share": float(np.mean(groups.max(axis=1) <= 0.0)),
                "response_len_mean": float(lengths.mean()), "response_len_max": int(lengths.max()),
                "truncated_share": float(np.mean(rollouts.truncated)),
                "generation_rounds": rollouts.rounds, "dropped_groups": rollouts.dropped_groups,
                **summary, **mismatch, **{f"time_{k}": v for k, v in timing.items()},
                "tokens_per_s": float(lengths.sum()) / seconds, **flops,
            }
            if probe is not None and (step % probe.every == 0 or step == total_steps):
                record.update(probe.measure(graphdef, state["params"]))
            if step % max(cfg.log_every, 1) == 0 or "probe_reward" in record:
                writer.write(record)
            checkpointer.save(step, state, {"step": step, "data": prompt_sampler.state_dict(), "flops": flops},
                              force=step == total_steps)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", len=f"{record['response_len_mean']:.0f}")
            if on_step is not None:
                on_step(step, record)

    final_dir = out / "final"
    save_pretrained(nnx.merge(graphdef, state["params"]), final_dir, tokenizer_dir=config.model.path)
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, ["reward_mean", "accuracy", "response_len_mean", "entropy", "kl_ref", "grad_norm"],
                out / "rl.png", title="GRPO")
    log.info("done: %d steps; final model in %s", step, final_dir)
    return RLResult(output_dir=out, final_dir=final_dir, steps=step, params=state["params"], metrics=records)
