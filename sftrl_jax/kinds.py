"""The config kinds: a config file's ``kind:`` (the command that runs it) and its config class.

``config_class("rl")`` is :class:`~sftrl_jax.rl.config.RLConfig`. A class is imported when it is
asked for, so this module imports nothing of the package: any module can use it without an import
cycle (the pipeline, whose own class is in the table, builds its stages' configs with it).
"""

from __future__ import annotations

import importlib

# kind -> (module, class name), in the order the commands are documented
_CLASSES = {
    "sft": ("sftrl_jax.sft.config", "SFTConfig"),
    "rl": ("sftrl_jax.rl.config", "RLConfig"),
    "eval": ("sftrl_jax.evaluation", "EvalConfig"),
    "pipeline": ("sftrl_jax.pipeline", "PipelineConfig"),
}
KINDS: tuple[str, ...] = tuple(_CLASSES)


def config_class(kind: str) -> type:
    """The config class of ``kind`` (one of :data:`KINDS`); ValueError naming the kinds otherwise."""
    try:
        module, name = _CLASSES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown config kind {kind!r} (one of {', '.join(KINDS)})") from None
    return getattr(importlib.import_module(module), name)
