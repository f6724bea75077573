"""The modelled generation time of one RL step's rollouts with each sampling engine, on one device of a mesh.

Decode steps are bound by what they read from HBM: the decode copy of the weights, and keys/values. The
model counts, for the same response lengths (:func:`lognormal_lengths`, the rollout benchmark's
distribution), the decode steps each engine needs and the bytes each step reads on one device, and
divides by the chip's HBM bandwidth (or its peak FLOP/s, where that is slower):

- ``static``: batches of ``rows`` sequences, one after the other; a batch runs until its longest response
  ends, and every step reads the weights and the batch's whole cache (prompt + cap positions per row).
- ``paged``: ``slots`` decode slots refilled as soon as a sequence ends; every step reads the weights
  and, with a Pallas kernel, each busy slot's live pages, with the ``gather`` path every slot's
  pages up to the engine's bound: the bucket of pages (:func:`sftrl_jax.data.batching.bucket_length`)
  covering the longest live sequence and the next
  :data:`sftrl_jax.paged.DEFAULT_CHUNK` steps.

Both split their rows or slots evenly over the data-parallel shards, and a device reads its shard's share
of keys/values (its kv heads). What the model leaves out: prefill (the same prompts in both), the host's
refill granularity (the paged engine refills after a few slots end, not after each), preemption (the
default pool holds every slot's longest sequence), and collectives.
"""

from __future__ import annotations

import numpy as np

from ..data.batching import bucket_length

LENGTH_SEED = 2  # the rollout benchmark's draw


def lognormal_lengths(count: int, cap: int, rng) -> np.ndarray:
    """``count`` response lengths from a log-normal (sigma 1) capped at ``cap``, its location chosen so the
    capped mean is about ``cap / 3`` (the long tail of RL responses: most short, some at the cap)."""
    draws = rng.standard_normal(count)
    lo, hi = -5.0, np.log(cap)
    for _ in range(60):  # bisect the location for a capped mean of cap / 3
        mu = (lo + hi) / 2
        mean = np.minimum(np.exp(mu + draws), cap).mean()
        lo, hi = (mu, hi) if mean < cap / 3 else (lo, mu)
    return np.clip(np.round(np.exp(mu + draws)), 1, cap).astype(np.int64)


def static_engine(lengths: np.ndarray, rows: int, cache_positions: int) -> tuple[list[int], list[float]]:
    """Per batch of ``rows`` sequences: its decode steps (its longest response, less the token prefill draws)
    and the KV positions each of its steps reads (every row's whole cache)."""
    steps, positions = [], []
    for start in range(0, len(lengths), rows):
        steps.append(int(lengths[start:start + rows].max()) - 1)
        positions.append(float(rows * cache_positions))
    return steps, positions


def paged_engine(lengths: np.ndarray, slots: int, prompt: int, page_size: int, max_pages: int, chunk: int,
                 kernel: bool) -> tuple[int, float]:
    """Continuous batching of ``lengths`` over ``slots``: the decode steps, and the KV positions all of them
    read together."""
    queue = list(lengths[::-1] - 1)  # decode steps each sequence needs (prefill draws its first token)
    left = np.zeros(slots, np.int64)  # steps a slot's sequence still needs (0: idle)
    done = np.zeros(slots, np.int64)  # steps it has run
    steps, positions = 0, 0.0
    while True:
        for slot in np.flatnonzero(left == 0):
            while queue and left[slot] == 0:
                left[slot], done[slot] = queue.pop(), 0
        busy = left > 0
        if not busy.any():
            return steps, positions
        live = prompt + done + 1  # tokens each busy slot attends over this step
        if kernel:
            positions += float(np.sum(-(-live[busy] // page_size)) * page_size)
        else:
            reach = -(-(int(live[busy].max()) + chunk - 1) // page_size)
            bound = min(bucket_length(reach, maximum=max_pages, minimum=1), max_pages)
            positions += float(slots * bound * page_size)
        steps += 1
        done += busy
        left -= busy


def modelled_rollout(*, sequences: int, cap: int, prompt: int, rows: int, slots: int, shards: int, page_size: int,
                     chunk: int, attention: str, weight_bytes: float, kv_bytes_per_position: float,
                     step_flops_per_row: float, hbm_bandwidth: float, peak_flops: float) -> dict:
    """Both engines' decode steps and seconds for ``sequences`` responses of :func:`lognormal_lengths` (capped at
    ``cap``) after ``prompt``-token prompts, on one device: ``rows`` (static) and ``slots`` (paged) over
    ``shards`` data-parallel shards, ``weight_bytes`` of weights and ``kv_bytes_per_position`` of keys/values
    per cached position on the device, ``step_flops_per_row`` per row and decode step; ``attention`` the paged
    engine's (``gather``, or a kernel reading live pages only)."""
    lengths = lognormal_lengths(sequences, cap, np.random.default_rng(LENGTH_SEED))

    def seconds(step_count: float, positions: float, rows_per_step: int) -> float:
        read = step_count * weight_bytes + positions / shards * kv_bytes_per_position
        work = step_count * rows_per_step / shards * step_flops_per_row
        return max(read / hbm_bandwidth, work / peak_flops)

    static_steps, static_positions = static_engine(lengths, rows, prompt + cap)
    static_seconds = sum(seconds(s, s * p, rows) for s, p in zip(static_steps, static_positions))
    max_pages = -(-(prompt + cap) // page_size)
    paged_steps, paged_positions = paged_engine(lengths, slots, prompt, page_size, max_pages, chunk,
                                                kernel=attention != "gather")
    paged_seconds = seconds(paged_steps, paged_positions, slots)
    return {"sequences": sequences, "cap": cap, "prompt": prompt, "mean_length": float(lengths.mean()),
            "at_cap": int(np.sum(lengths == cap)), "rows": rows, "slots": slots, "shards": shards,
            "page_size": page_size, "attention": attention, "weight_bytes": weight_bytes,
            "kv_bytes_per_position": kv_bytes_per_position,
            "static": {"calls": len(static_steps), "decode_steps": int(sum(static_steps)),
                       "seconds": static_seconds},
            "paged": {"decode_steps": paged_steps, "seconds": paged_seconds},
            "speedup": static_seconds / paged_seconds}
