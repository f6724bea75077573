"""XLA GPU device specs (GpuTargetConfigProto text) used by ``sftrl-jax compile`` (:mod:`sftrl_jax.aot`).

Vendored from openxla/xla (Apache-2.0); each file's header names its source commit.
"""
