"""Typed run configs: dataclasses loaded from YAML with dotted ``key=value`` overrides.

``load_config(SFTConfig, "configs/tiny_sft.yaml", ["train.learning_rate=1e-4"])`` reads the file,
applies the overrides, and builds the dataclass tree, checking every key and value: an unknown key,
a value of the wrong type, or a number outside its key's allowed range raises :class:`ConfigError`
naming the dotted key and what was expected. A file may leave out anything that has a default.

Allowed ranges are declared per class in a ``_ranges`` table (not a dataclass field, so not a key),
``{"field": ">= 1", "top_p": "(0, 1]"}``; a subclass's table adds to (or overrides) its bases',
so a section can range-check the fields it inherits. Specs: ``">= x"``, ``"> x"``, ``"<= x"``,
``"< x"`` or an interval ``"[a, b]"`` / ``"(a, b]"`` / ``"[a, b)"`` / ``"(a, b)"``. ``null`` passes
wherever the type allows it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key that does not exist, or a value that does not fit its key."""


def _describe(tp, spec: str | None = None) -> str:
    """The type ``tp`` in words (``int``, ``'a' | 'b'``, ``str or null``), with allowed range ``spec`` if any."""
    if spec is not None:
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        text = f"{' or '.join(_describe(a) for a in args)} {_range_text(spec)}"
        return text + " or null" if type(None) in typing.get_args(tp) else text
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``key`` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail():
        raise ConfigError(f"config key {key!r}: expected {_describe(tp)}, got {value!r}")

    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        fail()
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            fail()
        return from_dict(tp, value, prefix=key)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if isinstance(value, str) and (args and args[0] is str):
            value = [value]  # a single file name where a list is expected
        if not isinstance(value, (list, tuple)):
            fail()
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            fail()
        key_type, value_type = args if args else (Any, Any)
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    fail()


_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf)"
_BOUND = re.compile(rf"^(>=|>|<=|<)\s*{_NUMBER}$")
_INTERVAL = re.compile(rf"^([\[(])\s*{_NUMBER}\s*,\s*{_NUMBER}\s*([\])])$")


def _parse_range(spec: str) -> tuple[float, bool, float, bool]:
    """``(low, low_inclusive, high, high_inclusive)`` of a range spec like ``">= 1"`` or ``"(0, 1]"``."""
    text = spec.strip()
    if match := _BOUND.match(text):
        op, number = match.group(1), float(match.group(2))
        if op.startswith(">"):
            return number, op == ">=", math.inf, True
        return -math.inf, True, number, op == "<="
    if match := _INTERVAL.match(text):
        return float(match.group(2)), match.group(1) == "[", float(match.group(3)), match.group(4) == "]"
    raise ValueError(f"bad range spec {spec!r}")


def _range_text(spec: str) -> str:
    text = spec.strip()
    return f"in {text}" if text[0] in "[(" else text


def ranges_of(cls) -> dict[str, str]:
    """The allowed range of each range-checked field of config class ``cls`` (``_ranges`` along the MRO)."""
    table: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        table.update(vars(klass).get("_ranges", {}))
    return table


def check_range(value: Any, spec: str, tp, key: str) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` (of type ``tp``) lies in range ``spec`` (None passes)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, low_in, high, high_in = _parse_range(spec)
    inside = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
    if not inside:  # NaN fails every comparison, so it is refused too
        raise ConfigError(f"config key {key!r}: expected {_describe(tp, spec)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, checking keys, types and allowed ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    ranges = ranges_of(cls)
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key {dotted!r}; valid keys{' under ' + repr(prefix) if prefix else ''}: "
                              f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
            if name in ranges:
                check_range(kwargs[name], ranges[name], hints[name], dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {dotted!r} ({_describe(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` merges are overridable
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKeyError(f"duplicate key {key!r} at line {line} (first given at line "
                                             f"{seen[key]}; YAML would silently keep the last)")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
        return super().construct_mapping(node, deep=deep)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML ``path`` (optional), apply ``key=value`` overrides, and build ``cls``."""
    data: dict = {}
    if path is not None:
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"config file not found: {file}")
        try:
            data = yaml.load(file.read_text(), Loader=_UniqueKeyLoader) or {}
        except _DuplicateKeyError as err:
            raise ConfigError(f"{file}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: invalid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(obj) -> dict:
    """Plain nested dict of a config (for saving next to a run)."""
    return dataclasses.asdict(obj)


def save_config(obj, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# ------------------------------------------------------------------ sections shared by every stage
@dataclasses.dataclass
class ModelOptions:
    path: str  # local Hugging Face directory (config.json + safetensors + tokenizer)
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameters (optimizer state is always float32)
    compute_dtype: Literal["float32", "bfloat16"] | None = None  # matmuls; default: dtype
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # False: unroll the layer loop (faster steps for shallow models; compile time grows with depth)
    scan_layers: bool = True
    # attention kernel; auto: splash on TPU, cudnn on GPU (blockwise where cuDNN can't), dense on CPU
    attention: Literal["auto", "dense", "blockwise", "splash", "cudnn"] = "auto"
    attention_block_size: int = 512  # query/key block of blockwise and splash attention
    # losses turn hidden states into float32 log-probs this many positions at a time, so [T, vocab]
    # logits never exist at once (0: all positions at once)
    logits_chunk_size: int = 1024

    _ranges = {"attention_block_size": ">= 1", "logits_chunk_size": ">= 0"}


@dataclasses.dataclass
class CheckpointOptions:
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3
    async_save: bool = True

    _ranges = {"save_every": ">= 0", "keep_last": ">= 1"}


# allowed ranges of the optimizer keys (OptimizerOptions), for the sections that inherit them
OPTIMIZER_RANGES = {
    "learning_rate": "> 0", "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]", "weight_decay": ">= 0",
    "adam_b1": "[0, 1)", "adam_b2": "[0, 1)", "adam_eps": "> 0", "max_grad_norm": ">= 0",
}


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, type, default)`` for every key of config class ``cls`` (for docs and ``--help``);
    the type names the allowed range where there is one."""
    rows = []
    hints = typing.get_type_hints(cls)
    ranges = ranges_of(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        rows.append((key, _describe(tp, ranges.get(field.name)), default))
    return rows


def markdown_table(cls) -> str:
    lines = ["| key | type | default |", "|---|---|---|"]
    lines += [f"| `{k}` | {t.replace('|', '&#124;')} | `{d}` |" for k, t, d in describe(cls)]
    return "\n".join(lines) + "\n"
