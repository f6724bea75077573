"""Rewards and grading: one binary math-verify grader shared by GRPO training and evaluation.

- ``compute_score(response, ground_truth, *, require_think=False) -> float`` (1.0 / 0.0, never raises)
- ``extract_answer(response, ground_truth, *, require_think=False)``: what the grader reads;
  ``extract_boxed(text)``, ``extract_choice(text)``, ``is_choice_answer(ground_truth)``
- ``RewardPool(num_workers=None, timeout_s=10.0)``: parallel grading in worker processes with a hard
  per-item timeout; ``score_batch(responses, ground_truths, *, require_think=False) -> ScoreResult``.

Importing this package is cheap: math-verify/sympy are imported on first use.
"""

from sftrl_jax.rewards.math_reward import compute_score, extract_answer, extract_boxed, extract_choice, is_choice_answer
from sftrl_jax.rewards.pool import RewardPool, ScoreResult

__all__ = ["RewardPool", "ScoreResult", "compute_score", "extract_answer", "extract_boxed", "extract_choice",
           "is_choice_answer"]
