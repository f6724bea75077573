"""verl's arrangement of a step's sequences, for runs that reproduce a verl run (``rl.verl_ranks``).

verl's trainer (the version LUFFY's fork and its SFT->RL baseline ran) balances a step's sequences over its
data-parallel ranks before the update: a Karmarkar-Karp partition of the sequences' token counts (prompt and
response tokens) into ``ranks`` equal-sized parts, each sorted by index, rank ``r`` taking part ``r``. Each
rank cuts its part into the step's mini-batches in order, and with dynamic batch sizes it cuts its share
of a mini-batch into the fewest micro-batches of at most ``max_token_len`` tokens any rank needs (the maximum
over ranks), again by a Karmarkar-Karp partition of token counts.

None of this changes the policy loss of an exact-accumulation update, except through which sequences share
a mini-batch (:func:`verl_step_layout` gives that order). It changes the entropy bonus of LUFFY's fork,
which takes a token mean of the entropy within each micro-batch, sums those over the rank's micro-batches
and averages over ranks (``rl.entropy_agg: micro_batch_token_mean``): each token of a micro-batch with
``T`` response tokens weighs ``1 / (ranks * T)``.
"""

from __future__ import annotations

import heapq
import math

import numpy as np


class _Part:
    """One part under construction: its items ``(index, length)`` and their total."""

    __slots__ = ("items", "total")

    def __init__(self):
        self.items: list[tuple[int, int]] = []
        self.total = 0

    def extend(self, items) -> None:
        for index, length in items:
            self.items.append((index, length))
            self.total += length

    def key(self):
        return self.total, len(self.items), self.items


class _Partial:
    """A partial solution: ``k`` parts kept in decreasing order of (total, size, items). On the heap the
    partial with the largest spread (largest total minus smallest) comes first, ties to the larger first part."""

    def __init__(self, items: list[tuple[int, int]], k: int):
        self.parts = [_Part() for _ in range(k)]
        for part, item in zip(self.parts, items):
            part.extend([item])
        self._sort()

    def _sort(self) -> None:
        self.parts.sort(key=_Part.key, reverse=True)

    @property
    def spread(self) -> int:
        return self.parts[0].total - self.parts[-1].total

    def absorb(self, other: _Partial) -> None:
        """Join the parts pairwise, largest with smallest, so the two spreads cancel."""
        for part, opposite in zip(self.parts, reversed(other.parts)):
            part.extend(opposite.items)
        self._sort()

    def __lt__(self, other: _Partial) -> bool:
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.parts[0].key() > other.parts[0].key()


def balanced_partitions(lengths, k: int, *, equal_size: bool) -> list[list[int]]:
    """``k`` parts of ``range(len(lengths))`` with near-equal sums of ``lengths`` (the largest differencing
    method, as verl's ``get_seqlen_balanced_partitions``), each part's indices sorted; with ``equal_size``
    every part holds ``len(lengths) / k`` indices."""
    lengths = [int(n) for n in lengths]
    if len(lengths) < k:
        raise ValueError(f"{len(lengths)} sequences cannot fill {k} parts")
    ordered = sorted((length, index) for index, length in enumerate(lengths))
    heap: list[_Partial] = []
    if equal_size:
        if len(lengths) % k:
            raise ValueError(f"{len(lengths)} sequences do not split into {k} equal parts")
        for start in range(0, len(ordered), k):
            heapq.heappush(heap, _Partial([(i, n) for n, i in ordered[start:start + k]], k))
    else:
        for length, index in ordered:
            heapq.heappush(heap, _Partial([(index, length)], k))
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.absorb(second)
        heapq.heappush(heap, first)
    parts = [sorted(index for index, _ in part.items) for part in heap[0].parts]
    if any(not part for part in parts):
        raise ValueError(f"{len(lengths)} sequences left an empty part among {k}")
    return parts


def verl_step_layout(seq_tokens, response_tokens, *, ranks: int, mini_batches: int, max_token_len: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(order, entropy_weight)`` for one step's sequences as verl lays them out.

    ``seq_tokens``: each sequence's prompt + response tokens (what verl balances); ``response_tokens``: its
    response tokens in the loss (what a micro-batch's token mean divides by). ``order`` lists the sequences
    mini-batch by mini-batch (within one, rank by rank), so ``arrays[order]`` cut into ``mini_batches`` equal
    slices gives verl's mini-batches. ``entropy_weight[i]`` is ``1 / (ranks * T)``, ``T`` the response tokens
    of sequence ``i``'s dynamic micro-batch.
    """
    seq_tokens, response_tokens = np.asarray(seq_tokens, np.int64), np.asarray(response_tokens, np.int64)
    count = len(seq_tokens)
    if count % (ranks * mini_batches):
        raise ValueError(f"{count} sequences per step do not split over rl.verl_ranks ({ranks}) x "
                         f"rl.mini_batches_per_step ({mini_batches})")
    per_rank = count // ranks
    rows = per_rank // mini_batches  # one rank's share of a mini-batch
    shares = balanced_partitions(seq_tokens, ranks, equal_size=True)
    order, weight = [], np.zeros(count, np.float64)
    for j in range(mini_batches):
        parts = [np.asarray(share[j * rows:(j + 1) * rows]) for share in shares]
        micro = max(math.ceil(int(seq_tokens[part].sum()) / max_token_len) for part in parts)
        for part in parts:
            order.extend(part.tolist())
            for group in balanced_partitions(seq_tokens[part], micro, equal_size=False):
                members = part[group]
                weight[members] = 1.0 / (ranks * max(int(response_tokens[members].sum()), 1))
    return np.asarray(order, np.int64), weight.astype(np.float32)
