"""sftrl-jax: pure-JAX SFT-then-GRPO post-training for reasoning LLMs."""

__version__ = "0.1.0"
