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
# semantics may have. float32 replays of a float32 reference differ by ~1e-5; the semantics differ by more
# than 1e-2 within a few steps (the DeepSpeed defect and mean-of-means at the first step).
DEFAULT_TOLERANCE = 0.01
