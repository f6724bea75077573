"""The one way RL, evaluation and the pipeline's probe score responses: :func:`open_reward`.

    with contextlib.ExitStack() as stack:
        reward = open_reward(config.reward, stack)          # a RewardPool of reward.kind
        scores = reward(responses, ground_truths, token_ids)  # a RewardFn
        result = reward.score_batch(responses, ground_truths)  # ScoreResult: with timeouts and errors

A caller's own ``reward_fn`` (``run_rl(..., reward_fn=...)``, ``run_pipeline(..., reward_fn=...)``)
takes the pool's place; :func:`open_reward` is the only place that chooses between the two.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .kinds import REWARD_KINDS, applies_require_think
from .math_reward import _answer_part
from .pool import RewardPool, ScoreResult

if TYPE_CHECKING:
    from ..config import RewardOptions

logger = logging.getLogger("sftrl_jax.rewards")

__all__ = ["Reward", "RewardFn", "open_reward"]

# reward_fn(responses, ground_truths, response_token_ids) -> scores in [0, 1]
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Sequence[int]]], Sequence[float]]


class Reward:
    """Scores responses against ground truths, as a :data:`RewardFn` (see :func:`open_reward`).

    Either a :class:`RewardPool` grading with ``reward.kind`` (``require_think`` applied), or a
    caller's ``reward_fn`` (which reports no timeouts or errors, and whose answer is not shown).
    """

    def __init__(self, *, pool: RewardPool | None = None, require_think: bool = False,
                 reward_fn: RewardFn | None = None):
        if (pool is None) == (reward_fn is None):
            raise ValueError("Reward: give a pool or a reward_fn")
        self.pool, self.require_think, self.reward_fn = pool, bool(require_think), reward_fn

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str],
                    token_ids: Sequence[Sequence[int]] | None = None) -> ScoreResult:
        """The scores of ``responses`` (``token_ids``: their token ids, read only by a caller's ``reward_fn``)."""
        if self.reward_fn is not None:
            scores = list(self.reward_fn(responses, ground_truths, token_ids))
            name = getattr(self.reward_fn, "__qualname__", None) or repr(self.reward_fn)
            name = f"{getattr(self.reward_fn, '__module__', None) or '?'}.{name}"
            if len(scores) != len(responses):
                raise ValueError(f"reward_fn {name} returned {len(scores)} scores for {len(responses)} responses; "
                                 "it must return one score per response, in order")
            try:
                scores = [float(s) for s in scores]
            except (TypeError, ValueError) as err:
                raise ValueError(f"reward_fn {name} returned a score that is not a number ({err})") from None
            return ScoreResult(scores, [False] * len(scores), 0)
        return self.pool.score_batch(responses, ground_truths, require_think=self.require_think)

    def __call__(self, responses: Sequence[str], ground_truths: Sequence[str],
                 token_ids: Sequence[Sequence[int]] | None = None) -> list[float]:
        result = self.score_batch(responses, ground_truths, token_ids)
        if result.num_timeouts:
            logger.warning("%d responses timed out in grading (scored 0)", result.num_timeouts)
        return result.scores

    def answer(self, response: str, ground_truth: str) -> str | None:
        """The answer the kind's scorer reads from ``response`` (for records; None where the kind shows none);
        with alternative ground truths (a tuple), as read against the first."""
        if self.pool is None or not isinstance(response, str):
            return None
        if isinstance(ground_truth, (tuple, list)):
            ground_truth = ground_truth[0] if ground_truth else ""
        extract = REWARD_KINDS[self.pool.kind].extract
        text = _answer_part(response, applies_require_think(self.pool.kind, self.require_think))
        return extract(text, ground_truth) if extract is not None and text is not None else None


def open_reward(options: RewardOptions, stack: contextlib.ExitStack, reward_fn: RewardFn | None = None) -> Reward:
    """How responses are scored: the caller's ``reward_fn`` when given, else a :class:`RewardPool` of
    ``options.kind`` (``reward.kind``; ``reward.function``, ``reward.timeout_s``, ``reward.num_workers``,
    ``reward.require_think``) that ``stack`` closes.

    Scores are correctness in [0, 1]; RL and the probe put them on the ``reward.correct`` /
    ``reward.wrong`` scale (``options.scale``). A ``reward_fn`` that is already a :class:`Reward` is
    returned as is.
    """
    if isinstance(reward_fn, Reward):
        return reward_fn
    if reward_fn is not None:
        return Reward(reward_fn=reward_fn)
    pool = stack.enter_context(RewardPool(num_workers=options.num_workers, timeout_s=options.timeout_s,
                                          kind=options.kind, function=options.function))
    return Reward(pool=pool, require_think=options.require_think)
