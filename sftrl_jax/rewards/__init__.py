"""Rewards and grading: the reward kinds (``reward.kind``) shared by GRPO training, evaluation and the probe.

- ``open_reward(options, stack, reward_fn=None) -> Reward``: the scorer of a run (a ``RewardFn``:
  ``reward(responses, ground_truths, token_ids) -> scores``; ``reward.score_batch(...) -> ScoreResult``),
  the caller's ``reward_fn`` or a pool grading with ``reward.kind``
- ``REWARD_KINDS`` / ``@reward_kind(name)``: the registry of kinds (``math``, ``choice``, ``label``,
  ``luffy_eval``, ``python``; see :mod:`sftrl_jax.rewards.kinds`)
- ``compute_score(response, ground_truth, *, require_think=False) -> float``: the math grader in-process
  (1.0 / 0.0, never raises)
- ``luffy_eval_score(response, ground_truth) -> float``: the label LUFFY's published evaluation gives
  (:mod:`sftrl_jax.rewards.luffy_eval`; the ``luffy_eval`` kind)
- ``extract_answer(response, ground_truth, *, require_think=False)``: what the math grader reads;
  ``extract_boxed(text)``, ``extract_choice(text)``, ``is_choice_answer(ground_truth)``
- ``RewardPool(num_workers=None, timeout_s=10.0, *, kind="math", function=None)``: parallel grading in
  worker processes with a hard per-item timeout; ``score_batch(responses, ground_truths, *,
  require_think=False) -> ScoreResult``.

Importing this package is cheap: math-verify/sympy are imported on first use.
"""

from sftrl_jax.rewards.kinds import REWARD_KINDS, RewardLoadError, reward_kind
from sftrl_jax.rewards.luffy_eval import luffy_eval_score
from sftrl_jax.rewards.math_reward import compute_score, extract_answer, extract_boxed, extract_choice, is_choice_answer
from sftrl_jax.rewards.pool import RewardPool, ScoreResult
from sftrl_jax.rewards.scoring import Reward, RewardFn, open_reward

__all__ = ["REWARD_KINDS", "Reward", "RewardFn", "RewardLoadError", "RewardPool", "ScoreResult", "compute_score",
           "extract_answer", "extract_boxed", "extract_choice", "is_choice_answer", "luffy_eval_score", "open_reward",
           "reward_kind"]
