"""``sftrl-jax crosscheck``: put a PyTorch SFT run next to sftrl-jax's.

* ``crosscheck run`` (:mod:`.trl_run`, :func:`~.trl_run.run_crosscheck`): the same SFT with TRL's
  ``SFTTrainer`` and with sftrl-jax, step by step (loss, gradient norm) and in the final weights. Needs
  the ``crosscheck`` extra (torch, trl), imported only when it runs.
* ``crosscheck logs`` (:mod:`.logs`, :func:`~.logs.run_logs`): someone else's run's logged loss and
  gradient norm (:mod:`.references`) against JAX replays of its first steps under each accumulation
  semantics (correct, and the two PyTorch-stack bugs the SFT trainer emulates), with a verdict.

This package module imports nothing, so the command line can read the default below without loading JAX.
"""

# crosscheck logs: the largest score (mean relative distance of the loss or grad-norm curve) a matching
# semantics may have. A float32 reference replayed in float32 agrees to ~1e-6; the rest is room for a
# bfloat16 or GPU reference's rounding. The closest semantics within it is the verdict, and the report gives
# the margin to the next (the DeepSpeed defect moves the grad norm by tens of percent at the first step;
# mean-of-means early in training by a few 1e-3 only).
DEFAULT_TOLERANCE = 0.01
