"""Fixed-shape batches for SFT: padding with length buckets, or sequence packing.

A global step's examples are laid out as ``[micro_steps, shards * rows, length]``: micro-step
``i``, data-parallel shard ``r`` gets examples ``(i * shards + r) * micro_batch_size`` onwards
(the contiguous rows ``r * rows ... (r + 1) * rows`` of axis 1 are what the mesh puts on shard
``r``). Lengths (padding) or row counts (packing) are rounded up to powers of two so a whole run
compiles only a handful of step shapes.

Each array is next-token aligned: position ``t`` holds input token ``t`` and, as its label, token
``t + 1`` of the same sequence; ``label_mask`` is 1 where that label is a supervised (response)
token. The last position of a sequence, padding and segment boundaries get mask 0.

With ``example_weights`` (one number per example of the global batch) the arrays also hold
``loss_weights``: ``label_mask`` times the weight of the example each token belongs to. The SFT
step uses them as the per-token loss weights when a PyTorch-stack bug is emulated; they are made
on the host from each example's index in the global batch, so they do not depend on how the
batch is split here (:mod:`sftrl_jax.sft.step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

WEIGHTS_KEY = "loss_weights"  # only when example weights are given


def bucket_length(n: int, maximum: int, minimum: int = 32) -> int:
    """Smallest bucket >= n, capped at ``maximum``. Buckets are ``minimum * 2^k`` and 1.5x those
    (32, 48, 64, 96, 128, ...): at most a third is padding, and few distinct shapes get compiled."""
    size = minimum
    while True:
        if size >= n:
            return min(size, maximum)
        half_step = size * 3 // 2
        if half_step >= n and half_step > size:
            return min(half_step, maximum)
        size *= 2


def _empty(rows: int, length: int, weighted: bool = False) -> dict[str, np.ndarray]:
    out = {
        "input_ids": np.zeros((rows, length), np.int32),
        "labels": np.zeros((rows, length), np.int32),
        "label_mask": np.zeros((rows, length), np.float32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
    }
    if weighted:
        out[WEIGHTS_KEY] = np.zeros((rows, length), np.float32)
    return out


def _write(out: dict[str, np.ndarray], row: int, start: int, segment: int, input_ids, loss_mask,
           weight: float | None = None) -> None:
    n = len(input_ids)
    sl = slice(start, start + n)
    out["input_ids"][row, sl] = input_ids
    out["labels"][row, start:start + n - 1] = input_ids[1:]
    out["label_mask"][row, start:start + n - 1] = loss_mask[1:]
    out["segment_ids"][row, sl] = segment
    out["positions"][row, sl] = np.arange(n)
    if weight is not None:
        out[WEIGHTS_KEY][row, start:start + n - 1] = np.float32(weight) * out["label_mask"][row, start:start + n - 1]


def pad_rows(examples: Sequence, rows: int, length: int, weights: Sequence[float] | None = None
             ) -> dict[str, np.ndarray]:
    """One example per row, right-padded to ``length``; rows beyond the examples are empty.
    With ``weights`` (one per example) also ``loss_weights``."""
    out = _empty(rows, length, weighted=weights is not None)
    for row, example in enumerate(examples):
        _write(out, row, 0, 1, example.input_ids, example.loss_mask, None if weights is None else weights[row])
    return out


def pack_groups(lengths: Sequence[int], length: int) -> list[list[int]]:
    """Greedy first-fit packing of example indices into rows of ``length`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index, n in enumerate(lengths):
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(index)
                free[r] -= n
                break
        else:
            rows.append([index])
            free.append(length - n)
    return rows


def pack_rows(examples: Sequence, rows: int, length: int, weights: Sequence[float] | None = None
              ) -> dict[str, np.ndarray]:
    out = _empty(rows, length, weighted=weights is not None)
    for row, group in enumerate(pack_groups([len(e.input_ids) for e in examples], length)):
        start = 0
        for segment, index in enumerate(group, start=1):
            _write(out, row, start, segment, examples[index].input_ids, examples[index].loss_mask,
                   None if weights is None else weights[index])
            start += len(examples[index].input_ids)
    return out


def layout_step(examples: Sequence, *, micro_steps: int, shards: int, micro_batch_size: int, max_length: int,
                pack: bool, shard_ids: Sequence[int] | None = None,
                example_weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Arrange one global batch (``micro_steps * shards * micro_batch_size`` examples) as
    ``[micro_steps, shards * rows, length]`` arrays.

    ``shard_ids`` (sorted) builds only those data-parallel shards' rows, ``[micro_steps,
    len(shard_ids) * rows, length]``: a process's part of the global batch in multi-process runs.
    The length (padding) or row count (packing) is still chosen from the whole global batch, so
    every process agrees on the global shape. ``example_weights`` (one per example, in the order
    of ``examples``) adds ``loss_weights`` (see the module docstring).
    """
    expected = micro_steps * shards * micro_batch_size
    if len(examples) != expected:
        raise ValueError(f"layout_step: got {len(examples)} examples, expected {expected}")
    if example_weights is not None and len(example_weights) != expected:
        raise ValueError(f"layout_step: got {len(example_weights)} example weights for {expected} examples")
    shard_ids = list(range(shards)) if shard_ids is None else list(shard_ids)
    if not shard_ids or any(not 0 <= r < shards for r in shard_ids) or shard_ids != sorted(set(shard_ids)):
        raise ValueError(f"layout_step: shard_ids {shard_ids} must be increasing ids below {shards}")
    chunks = [examples[k * micro_batch_size:(k + 1) * micro_batch_size] for k in range(micro_steps * shards)]
    chunk_weights = ([None] * len(chunks) if example_weights is None else
                     [example_weights[k * micro_batch_size:(k + 1) * micro_batch_size] for k in range(len(chunks))])
    if pack:
        length = max_length
        needed = max(len(pack_groups([len(e.input_ids) for e in chunk], length)) for chunk in chunks)
        rows = min(bucket_length(needed, micro_batch_size, minimum=1), micro_batch_size)
        build = pack_rows
    else:
        length = bucket_length(max(len(e.input_ids) for e in examples), max_length)
        rows = micro_batch_size
        build = pad_rows
    parts = [build(chunks[i * shards + r], rows, length, chunk_weights[i * shards + r])
             for i in range(micro_steps) for r in shard_ids]
    flat = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return micro_step_layout(flat, len(shard_ids) * rows)


def micro_step_layout(arrays: dict[str, np.ndarray], rows_per_micro_step: int) -> dict[str, np.ndarray]:
    """``[S, ...] -> [S / rows, rows, ...]``: consecutive rows form a micro-step, and within it
    consecutive blocks of ``rows / shards`` rows go to consecutive data-parallel shards (SFT and RL)."""
    return {key: value.reshape(value.shape[0] // rows_per_micro_step, rows_per_micro_step, *value.shape[1:])
            for key, value in arrays.items()}


class EpochSampler:
    """Deterministic batches of indices: epoch ``e`` is a permutation seeded by ``(seed, e)``, cut into
    ``batch`` consecutive slices (the remainder is left out that epoch). Its position is a small dict
    saved with every checkpoint, so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, size: int, batch: int, *, seed: int, shuffle: bool = True):
        if size < batch:
            raise ValueError(f"only {size} examples, fewer than one batch of {batch}")
        self.size, self.batch, self.seed, self.shuffle = size, batch, seed, shuffle
        self.batches_per_epoch = size // batch
        self.epoch = self.position = 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self) -> np.ndarray:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch
        self.position += 1
        return self.order(self.epoch)[start:start + self.batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["step_in_epoch"])


class SFTBatcher:
    """Global SFT batches in :func:`layout_step` form, in :class:`EpochSampler` order.

    Every process walks the same order over the same examples (the order depends only on the seed
    and epoch); with ``shard_ids`` it builds only its own shards' rows of each batch.
    ``example_weights(examples)`` (optional) gives one weight per example of a global batch, from
    the whole global batch (every process computes the same); the batches then carry
    ``loss_weights``. ``last_lengths`` holds the token count of each sequence of the latest batch.
    """

    def __init__(self, examples: Sequence, *, global_batch_size: int, micro_batch_size: int, shards: int,
                 max_length: int, pack: bool, seed: int, shuffle: bool = True,
                 shard_ids: Sequence[int] | None = None,
                 example_weights: Callable[[Sequence], np.ndarray] | None = None):
        per_micro_step = micro_batch_size * shards
        if global_batch_size % per_micro_step:
            raise ValueError(
                f"train.global_batch_size ({global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({micro_batch_size}) x data-parallel shards ({shards})")
        if len(examples) < global_batch_size:
            raise ValueError(f"only {len(examples)} training examples, fewer than train.global_batch_size "
                             f"({global_batch_size})")
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.shards = shards
        self.micro_steps = global_batch_size // per_micro_step
        self.max_length = max_length
        self.pack = pack
        self.shard_ids = list(range(shards)) if shard_ids is None else list(shard_ids)
        self.example_weights = example_weights
        self.last_lengths = np.zeros((0,), np.int64)
        self.sampler = EpochSampler(len(examples), global_batch_size, seed=seed, shuffle=shuffle)
        self.steps_per_epoch = self.sampler.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next(self) -> dict[str, np.ndarray]:
        """The rows of the next global batch that ``shard_ids`` names (all of it by default)."""
        examples = [self.examples[i] for i in self.sampler.next()]
        self.last_lengths = np.array([len(e.input_ids) for e in examples], np.int64)
        weights = None if self.example_weights is None else self.example_weights(examples)
        return layout_step(examples, micro_steps=self.micro_steps, shards=self.shards,
                           micro_batch_size=self.micro_batch_size, max_length=self.max_length, pack=self.pack,
                           shard_ids=self.shard_ids, example_weights=weights)

    def global_shape(self, local: np.ndarray) -> tuple[int, ...]:
        """The global shape of a batch array of which ``local`` (from :meth:`next`) is this process's part."""
        micro, rows, *rest = local.shape
        return (micro, rows // len(self.shard_ids) * self.shards, *rest)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(examples: Sequence, *, rows: int, max_length: int):
    """Padded ``[rows, length]`` batches covering every example once (the last one padded with empty rows)."""
    for start in range(0, len(examples), rows):
        chunk = examples[start:start + rows]
        yield pad_rows(chunk, rows, bucket_length(max(len(e.input_ids) for e in chunk), max_length))
