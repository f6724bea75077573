"""The offline demo (``sftrl-jax demo``) and its embedded task, tokenizer and base model."""

from .runner import run_demo

__all__ = ["run_demo"]
