"""Typed run configs: dataclasses loaded from YAML with dotted ``key=value`` overrides.

``load_config(SFTConfig, "configs/tiny_sft.yaml", ["optimizer.learning_rate=1e-4"])`` reads the file,
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

import copy
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

from .distributed import DistributedOptions
from .layout import layout
from .models.options import ModelOptions  # the model: section (defined with the builders)

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


def _mismatch(value: Any, tp, key: str) -> ConfigError:
    """The error for ``value`` not fitting type ``tp`` at config key ``key``."""
    return ConfigError(f"config key {key!r}: expected {_describe(tp)}, got {value!r}")


def _convert(value: Any, tp, key: str):
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``key`` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise _mismatch(value, tp, key)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _mismatch(value, tp, key)
        return from_dict(tp, value, prefix=key)
    if origin in (list, Sequence, tuple, dict, Mapping) or tp in (list, tuple, dict):
        return _convert_container(value, tp, key)
    return _convert_scalar(value, tp, key)


def _convert_union(value: Any, tp, key: str):
    """``value`` converted to the first member of the union ``tp`` it fits (``None`` where ``tp`` allows it)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ConfigError:
            pass
    raise _mismatch(value, tp, key)


def _convert_container(value: Any, tp, key: str):
    """``value`` as the list, tuple or dict type ``tp``, converting every item (a dict's keys and values)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if isinstance(value, str) and (args and args[0] is str):
            value = [value]  # a single file name where a list is expected
        if not isinstance(value, (list, tuple)):
            raise _mismatch(value, tp, key)
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if not isinstance(value, Mapping):
        raise _mismatch(value, tp, key)
    key_type, value_type = args if args else (Any, Any)
    return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}


def _convert_scalar(value: Any, tp, key: str):
    """``value`` as the scalar (bool, int, float, str) or plain class ``tp``; a float may come as a string."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _mismatch(value, tp, key)


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
    if not inside or not math.isfinite(value):  # NaN and inf fail every range, even "> -inf" or "<= inf"
        raise ConfigError(f"config key {key!r}: expected {_describe(tp, spec)}, got {value!r}")


def section_defaults(field: dataclasses.Field, section: type) -> dict[str, Any]:
    """The values a section field's default factory sets apart from its class's own defaults (RL's
    ``optimizer``: lr 1e-6, constant). Only those: the rest is left to the class, so the values its
    ``__post_init__`` fills in from others (``rl.method``'s defaults) never become settings."""
    ours = field.default_factory()
    try:
        plain = section()
    except TypeError:  # a section with required keys: all of the factory's values
        return dataclasses.asdict(ours)
    return {f.name: dataclasses.asdict(ours)[f.name] for f in dataclasses.fields(section)
            if f.init and getattr(ours, f.name) != getattr(plain, f.name)}


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, checking keys, types and allowed ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    ranges = ranges_of(cls)
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if dotted in MOVED_KEYS:
                raise ConfigError(f"config key {dotted!r} is now {MOVED_KEYS[dotted]!r} (renamed; see docs/config.md)")
            raise ConfigError(f"unknown config key {dotted!r}; valid keys{' under ' + repr(prefix) if prefix else ''}: "
                              f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping) \
                    and field.default_factory is not dataclasses.MISSING:
                # a partial section starts from this config's own defaults for it (e.g. RL's optimizer lr)
                value = deep_merge(section_defaults(field, hints[name]), value)
            kwargs[name] = _convert(value, hints[name], dotted)
            if name in ranges:
                check_range(kwargs[name], ranges[name], hints[name], dotted)
            elif isinstance(kwargs[name], float) and not math.isfinite(kwargs[name]):
                # NaN or inf: no setting means that (a NaN reward would train on NaN advantages)
                raise ConfigError(f"config key {dotted!r}: expected a finite number, got {kwargs[name]!r}")
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
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); fix it, or quote it "
                          f"to pass a string ({key.strip()}='...')") from None
    return key.strip().split("."), value


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


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """``base`` with ``update`` merged in: nested mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else copy.deepcopy(value)
    return out


def read_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping, with its ``base:`` file (a path relative to it) merged underneath.

    A sized recipe states only what differs from its base: ``base: ../rl_qwen2.5-math-7b.yaml``.
    Bases may have bases; a cycle is an error naming the files.
    """
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file not found: {file}" + (f" (the base of {_chain[-1]})" if _chain else ""))
    if file.is_dir():
        raise ConfigError(f"{file}: a directory, not a config file; give the YAML file itself (--config FILE)")
    if file.resolve() in _chain:
        raise ConfigError(f"{file}: 'base:' includes form a cycle: {' -> '.join(map(str, (*_chain, file)))}")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file}: not a UTF-8 text file (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                          "a config is a YAML text file") from None
    except _DuplicateKeyError as err:
        raise ConfigError(f"{file}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{file}: config key 'base': expected the path of a config file, got {base!r}")
    return deep_merge(read_yaml(file.parent / base, (*_chain, file.resolve())), data)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML ``path`` (optional; with its ``base:`` chain), apply ``key=value`` overrides, and build ``cls``.

    A file whose ``kind:`` names another command is refused with the command to run it with.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    expected = getattr(cls, "kind", None)
    if "kind" in data and not (isinstance(data["kind"], str) and data["kind"]):
        raise ConfigError(f"{path or 'config'}: config key 'kind': expected a command name"
                          f"{f' ({expected!r}) or no kind: line' if expected else ''}, got {data['kind']!r}")
    if isinstance(expected, str) and expected and data.get("kind", expected) != expected:
        raise ConfigError(f"{path or 'config'}: a {data['kind']!r} config (kind: {data['kind']}), not {expected!r}; "
                          f"run it with `sftrl-jax {data['kind']}`")
    return from_dict(cls, data)


def config_kind(path: str | os.PathLike) -> str | None:
    """The ``kind:`` a config file (or its base) declares, or None."""
    kind = read_yaml(path).get("kind")
    return kind if isinstance(kind, str) else None


def save_config(obj, path: str | os.PathLike) -> None:
    from .run_folder import write_text_atomic  # imported here: run_folder is not needed to read configs

    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False))


# ------------------------------------------------------------------ sections shared by every stage
@dataclasses.dataclass
class SamplingOptions:
    """How the one sampler generates: RL rollouts, evaluation and the pipeline's probe."""

    n: int = 1  # samples per prompt (RL: the group size)
    max_new_tokens: int = 8192
    temperature: float = 0.6  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: train.seed for RL rollouts, 0 for evaluation and the probe
    # prompts per compiled generation batch of the static engine (and, times n, the paged engine's default
    # max_slots); each sample draws from (seed, its sample id, its token index), so the samples do not depend
    # on it beyond floating-point rounding
    batch_size: int = 64
    # static: batches decoded until their longest response ends; paged (the default): continuous batching over
    # a paged KV cache (max_slots decode slots refilled as sequences end; the n samples of a prompt share its
    # pages), 1.9-2.7x the static engine's useful tokens/s at the same KV memory (docs/benchmarks.md); both
    # give the same samples
    engine: Literal["static", "paged"] = "paged"
    max_slots: int | None = None  # paged: decode slots (default: the static engine's rows, batch_size x n)
    page_size: int | None = None  # paged: tokens per KV page (default 16)
    # paged: pages in the KV pool (default: enough for every slot to hold the longest prompt and
    # max_new_tokens, the static engine's cache)
    num_pages: int | None = None
    # paged: the decode attention over the pages; auto = the platform's Pallas paged-attention kernel (TPU:
    # pallas_tpu where head_dim is a multiple of 128, keys and values in bfloat16; GPU: pallas_gpu, Triton),
    # which reads live pages only; on CPU pool (XLA: one pass over the whole pool, each page against the
    # queries of the slots reading it, no copy); gather otherwise (XLA: each slot's pages up to the longest
    # live sequence, copied, masked); a kernel named on CPU runs interpreted (slow; for tests)
    paged_attention: Literal["auto", "pool", "gather", "pallas_tpu", "pallas_gpu"] = "auto"
    # the devices each decode copy of the weights is split over (tensor parallelism while sampling; verl's
    # rollout.tensor_model_parallel_size): the sampler decodes on the same devices with the mesh's fsdp axis
    # folded into tensor by tensor_parallel / mesh.tensor (sharding.decode_mesh), so each device reads that
    # share of the weights per decode step; training keeps its mesh. A multiple of mesh.tensor dividing
    # mesh.fsdp x mesh.tensor, and the model's query and kv heads; default: mesh.tensor
    tensor_parallel: int | None = None

    _ranges = {"n": ">= 1", "max_new_tokens": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]", "top_k": ">= 0",
               "seed": ">= 0", "batch_size": ">= 1", "max_slots": ">= 1", "page_size": ">= 1", "num_pages": ">= 2",
               "tensor_parallel": ">= 1"}


@dataclasses.dataclass
class RewardOptions:
    """The grader (``sftrl_jax.rewards``): RL rewards, evaluation scores and the probe."""

    # the reward kind (sftrl_jax.rewards.REWARD_KINDS): math (math-verify equivalence), choice
    # (multiple-choice letter), label (exact normalised label), luffy_eval (the label of LUFFY's published
    # evaluation; grades after the first </think> up to any second, or the whole response without one, whatever
    # require_think says), python (reward.function)
    kind: str = "math"
    # kind python: "module:function", called as fn(answer, ground_truth) -> score in [0, 1] in the
    # grading processes (imported there, not when the config is read)
    function: str | None = None
    require_think: bool = False  # grade only after </think>; no </think> scores 0 (not read by luffy_eval)
    timeout_s: float = layout(10.0)  # hard per-response limit (the worker is killed)
    num_workers: int | None = layout(None)  # grading processes (default: CPU count)
    # the reward of a correct and of a wrong answer in RL and the probe (Paper B's 0.385/0.343 suggest
    # correct 1 / wrong -1); evaluation always reports accuracy (0 / 1)
    correct: float = 1.0
    wrong: float = 0.0

    _ranges = {"timeout_s": "> 0", "num_workers": ">= 1"}

    def __post_init__(self):
        from .rewards.kinds import REWARD_KINDS, parse_function

        if self.kind not in REWARD_KINDS:
            raise ConfigError(f"config key 'reward.kind': expected one of "
                              f"{' | '.join(map(repr, sorted(REWARD_KINDS)))}, got {self.kind!r}")
        takes_function = REWARD_KINDS[self.kind].takes_function
        if takes_function and self.function is None:
            raise ConfigError(f"config key 'reward.function': reward.kind={self.kind} needs the scorer as "
                              "'module:function'")
        if not takes_function and self.function is not None:
            users = ", ".join(k for k, v in sorted(REWARD_KINDS.items()) if v.takes_function)
            raise ConfigError(f"config key 'reward.function': only read by reward.kind={users}, got "
                              f"{self.function!r} with reward.kind={self.kind}")
        if self.function is not None:
            try:
                parse_function(self.function)
            except ValueError as err:
                raise ConfigError(f"config key 'reward.function': {err}") from None

    def scale(self, correctness):
        """Rewards on this scale from 0/1 correctness (numpy arrays or floats)."""
        return self.wrong + (self.correct - self.wrong) * correctness


@dataclasses.dataclass
class LoggingOptions:
    """Where the training loop's metrics go (``sftrl_jax.training.loop``)."""

    log_every: int = 1  # steps between metric records (evaluations and probes are always recorded)
    # jsonl: output_dir/metrics.jsonl; plots: PNG curves at the end; tensorboard: event files in
    # output_dir/tensorboard (extra: tensorboard); wandb: Weights & Biases (extra: wandb)
    sinks: list[Literal["jsonl", "plots", "tensorboard", "wandb"]] = dataclasses.field(
        default_factory=lambda: ["jsonl", "plots"])
    wandb_project: str = "sftrl-jax"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no network (`wandb sync` later)
    progress: bool = True  # a progress bar on process 0

    _ranges = {"log_every": ">= 1"}


@dataclasses.dataclass
class TrainOptions:
    """The training loop's length, seed and micro-batch (SFT and RL)."""

    max_steps: int | None = None  # default: num_epochs over the data
    num_epochs: int = 1
    seed: int = 42
    micro_batch_size: int = layout(1)  # sequences per data-parallel shard per micro-step
    # stop early once the run's counted FLOPs (the cumulative flops_* metrics) reach this, for
    # comparisons at equal compute; the lr schedule still spans max_steps / num_epochs
    max_flops: float | None = None

    _ranges = {"max_steps": ">= 1", "num_epochs": ">= 1", "seed": ">= 0", "micro_batch_size": ">= 1",
               "max_flops": "> 0"}


@dataclasses.dataclass
class CheckpointOptions:
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3
    async_save: bool = True

    _ranges = {"save_every": ">= 0", "keep_last": ">= 1"}


@dataclasses.dataclass
class OptimizerOptions:
    """The ``optimizer:`` section: AdamW with warmup + decay schedules and global-norm clipping
    (:mod:`sftrl_jax.optim` builds it)."""

    learning_rate: float = 5e-5
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # final lr = learning_rate * min_lr_ratio (cosine / linear)
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    _ranges = {"learning_rate": "> 0", "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]", "weight_decay": ">= 0",
               "adam_b1": "[0, 1)", "adam_b2": "[0, 1)", "adam_eps": "> 0", "max_grad_norm": ">= 0"}


def describe(cls, prefix: str = "", instance=None) -> list[tuple[str, str, str]]:
    """``(dotted key, type, default)`` for every key of config class ``cls`` (for docs and ``--help``);
    the type names the allowed range where there is one. Defaults are those of ``instance`` when given
    (a section whose defaults the enclosing config sets, e.g. RL's optimizer)."""
    rows = []
    hints = typing.get_type_hints(cls)
    ranges = ranges_of(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if instance is not None:
            default = repr(getattr(instance, field.name))
        elif field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        if dataclasses.is_dataclass(tp):
            section = getattr(instance, field.name) if instance is not None else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            rows.extend(describe(tp, key + ".", section))
            continue
        rows.append((key, _describe(tp, ranges.get(field.name)), default))
    return rows


def markdown_table(cls) -> str:
    lines = ["| key | type | default |", "|---|---|---|"]
    lines += [f"| `{k}` | {t.replace('|', '&#124;')} | `{d}` |" for k, t, d in describe(cls)]
    return "\n".join(lines) + "\n"


def _default_mesh() -> dict[str, int]:
    return {"data": 1, "fsdp": -1, "tensor": 1}


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """What every command's config has: its kind, the model, the device mesh, the processes, the output folder.

    Each command's config (``SFTConfig``, ``RLConfig``, ``EvalConfig``, ``PipelineConfig``) is this
    plus the shared sections it uses (``optimizer``, ``train``, ``sampling``, ``reward``,
    ``checkpoint``, ``logging``) and its own (``data``, ``rl``, ``probe``, ``stages``).
    """

    kind: str = ""  # the command: a file with another kind is refused (each subclass fixes it)
    model: ModelOptions
    mesh: dict[str, int] = layout(default_factory=_default_mesh)
    distributed: DistributedOptions = layout(default_factory=DistributedOptions)
    output_dir: str = layout("runs/run")


@dataclasses.dataclass(kw_only=True)
class TrainingRunConfig(RunConfig):
    """A training command's config: :class:`RunConfig` plus the sections the training loop reads."""

    optimizer: OptimizerOptions = dataclasses.field(default_factory=OptimizerOptions)
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    checkpoint: CheckpointOptions = layout(default_factory=CheckpointOptions)
    logging: LoggingOptions = layout(default_factory=LoggingOptions)


# Dotted keys of settings that live in another section: a config that uses one is refused, naming the
# key to use.
_OPTIMIZER_KEYS = ("learning_rate", "lr_schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "adam_b1",
                   "adam_b2", "adam_eps", "max_grad_norm")
MOVED_KEYS = {
    **{f"train.{k}": f"optimizer.{k}" for k in _OPTIMIZER_KEYS},
    **{f"rl.{k}": f"optimizer.{k}" for k in _OPTIMIZER_KEYS},
    **{f"rl.{k}": f"train.{k}" for k in ("max_steps", "num_epochs", "seed", "micro_batch_size")},
    **{f"rl.{k}": f"sampling.{k}" for k in ("max_new_tokens", "temperature", "top_p", "top_k")},
    "rl.group_size": "sampling.n", "rl.generation_batch_size": "sampling.batch_size",
    "rl.require_think": "reward.require_think", "rl.reward_timeout_s": "reward.timeout_s",
    "rl.reward_workers": "reward.num_workers",
    "train.log_every": "logging.log_every", "rl.log_every": "logging.log_every",
    **{f"probe.{k}": f"probe.sampling.{k}" for k in ("temperature", "max_new_tokens", "seed")},
    "probe.require_think": "reward.require_think",
}
