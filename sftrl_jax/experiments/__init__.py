"""Experiments built on the library's public API, apart from the library core.

- :mod:`.demo`: ``sftrl-jax demo`` (base -> SFT -> GRPO -> evaluation on the embedded task);
- :mod:`.repro_bugs`: ``sftrl-jax repro bugs`` (Paper A's staircase at small scale);
- :mod:`.repro_coupling`: ``sftrl-jax repro coupling`` (Paper B's non-decoupling at small scale);
- :mod:`.task`, :mod:`.assets`, :mod:`.workspace`: the embedded task, its tokenizer and random base
  model, and what every embedded-task run shares.

They import only package-level names of ``sftrl_jax.sft``, ``.rl``, ``.pipeline``, ``.evaluation``,
``.config``, ``.models`` and ``.metrics``; ``import sftrl_jax`` does not import them. Each command
writes ``report.json``; ``scripts/render_docs.py --import-...`` puts a run's figures into the docs.
"""

from .demo import run_demo

__all__ = ["run_demo"]
