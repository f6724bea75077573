"""Layout settings: the config keys that say how a run is laid out, not what it computes.

Where a run writes, how it logs and checkpoints, how the work is laid out on devices (exact
accumulation makes the micro-batch split immaterial), how the model's kernels are chosen and how
the grader runs (its processes and time limit): changing these does not alter what a resumed run
computes, so a resume (:func:`sftrl_jax.run_folder.check_continuity`, the evaluation's generations
journal) ignores them.
Every other key must match to resume.

A config field is declared a layout setting where it is defined, with :func:`layout` in place of
``dataclasses.field`` (``micro_batch_size: int = layout(1)``); a whole section is one the same way
(``logging: LoggingOptions = layout(default_factory=LoggingOptions)``). Where a section's layout
settings do change what one command computes, that command's field of the section names them with
:func:`not_layout` (evaluation: ``reward.timeout_s`` changes the scores already written).
:func:`layout_keys` walks a config class and returns its dotted layout keys.

This module imports only ``dataclasses`` and ``typing``, so any config module can use it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

LAYOUT = "layout"  # field metadata: True where the field (the whole section) is a layout setting
NOT_LAYOUT = "not_layout"  # field metadata of a section: its layout keys that are not layout settings here


def layout(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """``dataclasses.field(default=...)`` (or ``default_factory=...``) marked as a layout setting."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={LAYOUT: True})


def not_layout(*keys: str) -> dict[str, tuple[str, ...]]:
    """Field metadata for a section whose layout ``keys`` (dotted, relative to the section) are not layout
    settings in this config: ``dataclasses.field(default_factory=..., metadata=not_layout("timeout_s"))``."""
    return {NOT_LAYOUT: keys}


def layout_keys(config_cls: type) -> tuple[str, ...]:
    """The dotted layout keys of config class ``config_cls``, in field order: each field declared with
    :func:`layout`, and those of its sections (less what a section's field excludes with :func:`not_layout`)."""
    hints = typing.get_type_hints(config_cls)
    keys: list[str] = []
    for field in dataclasses.fields(config_cls):
        if field.metadata.get(LAYOUT):
            keys.append(field.name)
        elif dataclasses.is_dataclass(hints[field.name]):
            excluded = field.metadata.get(NOT_LAYOUT, ())
            keys += [f"{field.name}.{key}" for key in layout_keys(hints[field.name])
                     if not any(key == name or key.startswith(name + ".") for name in excluded)]
    return tuple(keys)
