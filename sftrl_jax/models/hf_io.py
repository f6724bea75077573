"""Hugging Face checkpoints in and out: ``config.json`` + (sharded) safetensors.

Import streams tensor by tensor: each Hugging Face tensor is read from the memory-mapped file,
converted to our layout and placed on the devices with its sharding (each process supplying only
its own shards) before the next is read, so the host never holds more than one tensor, and the
model is never in host memory twice. Per-layer tensors are written into the stacked, already
sharded ``[layers, ...]`` array with a donated in-place update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from ..distributed import barrier
from ..sharding import DEFAULT_RULES, Rules, named_sharding, place, single_device_mesh, to_host
from .config import ModelConfig
from .decoder import Decoder, as_dtype
from .options import ModelOptions

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied along with the weights when the source directory has them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# The files a tokenizer's vocabulary comes from (a folder with none of them has no tokenizer).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Checkpoint entries that carry no parameters of their own.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """How one parameter of ours corresponds to Hugging Face tensor(s).

    ``ours = hf.T.reshape(shape)`` if ``transpose`` else ``hf.reshape(shape)``, per layer when
    ``layered`` (``hf_name`` then contains ``{layer}``).
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # our per-layer shape
    transpose: bool = False
    layered: bool = False

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        return (hf.T if self.transpose else hf).reshape(self.shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(ours.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(ours.reshape(self.hf_shape))

    def hf_names(self, num_layers: int) -> list[str]:
        if self.layered:
            return [self.hf_name.format(layer=i) for i in range(num_layers)]
        return [self.hf_name]


def weight_specs(config: ModelConfig) -> list[WeightSpec]:
    """The parameter correspondence table for ``config``, in Hugging Face file order."""
    c = config
    E, H, KV, D, M, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    attn, mlp = "model.layers.{layer}.self_attn", "model.layers.{layer}.mlp"

    def layer(name, hf_name, hf_shape, shape, transpose=False):
        return WeightSpec(("layers", name), hf_name, hf_shape, shape, transpose, layered=True)

    specs = [WeightSpec(("embed",), "model.embed_tokens.weight", (V, E), (V, E))]
    specs.append(layer("input_norm", "model.layers.{layer}.input_layernorm.weight", (E,), (E,)))
    specs.append(layer("q_proj", f"{attn}.q_proj.weight", (H * D, E), (E, H, D), True))
    specs.append(layer("k_proj", f"{attn}.k_proj.weight", (KV * D, E), (E, KV, D), True))
    specs.append(layer("v_proj", f"{attn}.v_proj.weight", (KV * D, E), (E, KV, D), True))
    if c.qkv_bias:
        specs.append(layer("q_bias", f"{attn}.q_proj.bias", (H * D,), (H, D)))
        specs.append(layer("k_bias", f"{attn}.k_proj.bias", (KV * D,), (KV, D)))
        specs.append(layer("v_bias", f"{attn}.v_proj.bias", (KV * D,), (KV, D)))
    specs.append(layer("o_proj", f"{attn}.o_proj.weight", (E, H * D), (H, D, E), True))
    if c.o_bias:
        specs.append(layer("o_bias", f"{attn}.o_proj.bias", (E,), (E,)))
    if c.qk_norm:
        specs.append(layer("q_norm", f"{attn}.q_norm.weight", (D,), (D,)))
        specs.append(layer("k_norm", f"{attn}.k_norm.weight", (D,), (D,)))
    specs.append(layer("post_norm", "model.layers.{layer}.post_attention_layernorm.weight", (E,), (E,)))
    specs.append(layer("gate_proj", f"{mlp}.gate_proj.weight", (M, E), (E, M), True))
    specs.append(layer("up_proj", f"{mlp}.up_proj.weight", (M, E), (E, M), True))
    specs.append(layer("down_proj", f"{mlp}.down_proj.weight", (E, M), (M, E), True))
    if c.mlp_bias:
        specs.append(layer("gate_bias", f"{mlp}.gate_proj.bias", (M,), (M,)))
        specs.append(layer("up_bias", f"{mlp}.up_proj.bias", (M,), (M,)))
        specs.append(layer("down_bias", f"{mlp}.down_proj.bias", (E,), (E,)))
    specs.append(WeightSpec(("final_norm",), "model.norm.weight", (E,), (E,)))
    if not c.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head",), "lm_head.weight", (V, E), (E, V), True))
    return specs


# ---------------------------------------------------------------------------------------- reading
class SafetensorsReader:
    """Tensor-by-tensor access to ``model.safetensors`` or an indexed set of shards."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._open: dict[Path, object] = {}
        index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' mapping of tensor names to shard files")
            self.file_of = {name: directory / file for name, file in weight_map.items()}
            for file in sorted(set(self.file_of.values())):
                if not file.exists():
                    raise FileNotFoundError(f"safetensors shard {file} (listed in {index_path}) not found")
        elif single_path.exists():
            self.file_of = {name: single_path for name in self._handle(single_path).keys()}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")

    def names(self) -> set[str]:
        return set(self.file_of)

    def _handle(self, file: Path):
        """The open safetensors ``file``; an empty, truncated or corrupt file is a ValueError naming it."""
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="numpy")
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: re-raised with the file
                size = file.stat().st_size if file.exists() else 0
                detail = "empty file (0 bytes)" if size == 0 else f"{str(err).strip()} ({size} bytes)"
                raise ValueError(f"{file}: not a readable safetensors file: {detail} "
                                 f"(truncated or incomplete download?)") from None
        return self._open[file]

    def get(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        try:
            return self._handle(file).get_tensor(name)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{file}: cannot read tensor {name!r}: {str(err).strip()}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())


def read_config(path: str | os.PathLike) -> ModelConfig:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"config.json not found in model directory {directory}")
    config = read_json(config_file)
    return ModelConfig.from_hf_dict(config, source_dir=str(directory))


def generation_eos_token_ids(path: str | os.PathLike | None) -> tuple[int, ...]:
    """The ``eos_token_id`` (an int or a list) of ``generation_config.json`` in model directory ``path``;
    empty where there is no such file or no such key. Invalid JSON is a ValueError naming the file."""
    if path is None:
        return ()
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return ()
    eos = read_json(file).get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{file}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return tuple(ids)


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; invalid JSON (or text that is not UTF-8) is a ValueError naming it."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got a {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------- models
def abstract_model(config: ModelConfig, options: ModelOptions | None = None, mesh: Mesh | None = None, *,
                   rules: Rules = DEFAULT_RULES) -> Decoder:
    """A :class:`Decoder` whose parameters are shapes only (nothing allocated); ``options`` as for
    :class:`Decoder`, ``mesh`` default: one device."""
    mesh = mesh or single_device_mesh()
    return nnx.eval_shape(lambda: Decoder(config, options, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))


def param_items(model: nnx.Module) -> Iterator[tuple[tuple[str, ...], nnx.Param]]:
    """``(path, Param)`` for every parameter of ``model``."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield tuple(str(p) for p in path), var


def param_sharding(var: nnx.Param, mesh: Mesh, rules: Rules) -> NamedSharding:
    return named_sharding(var.get_metadata()["logical_axes"], mesh, rules, var.shape)


def param_shardings(model: Decoder, rules: Rules | None = None) -> dict:
    """Pure dict (like ``nnx.to_pure_dict(nnx.state(model))``) of each parameter's NamedSharding under
    ``rules`` (default: the model's own)."""
    state = nnx.state(model, nnx.Param)
    rules = model.rules if rules is None else rules
    return nnx.to_pure_dict(jax.tree.map(lambda v: param_sharding(v, model.mesh, rules), state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def init_model(config: ModelConfig, options: ModelOptions | None = None, mesh: Mesh | None = None, *,
               seed: int = 0, rules: Rules = DEFAULT_RULES) -> Decoder:
    """A randomly initialised model, created directly in its sharded layout; ``options`` as for
    :class:`Decoder`, ``mesh`` default: one device."""
    mesh = mesh or single_device_mesh()
    abstract = nnx.eval_shape(lambda: Decoder(config, options, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules))

    @functools.partial(jax.jit, out_shardings=param_shardings(abstract))
    def create():
        return nnx.to_pure_dict(nnx.state(Decoder(config, options, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules)))

    return nnx.merge(nnx.graphdef(abstract), create())


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _write_layer(stacked: jax.Array, layer_value: jax.Array, layer: int) -> jax.Array:
    return stacked.at[layer].set(layer_value)


def load_pretrained(source: ModelOptions | str | os.PathLike, mesh: Mesh | None = None, *,
                    rules: Rules = DEFAULT_RULES) -> tuple[Decoder, ModelConfig]:
    """Load a local Hugging Face directory into a :class:`Decoder` sharded on ``mesh`` (default: one device).

    ``source`` is a :class:`ModelOptions` (the directory is its ``path``; every other field as for
    :class:`Decoder`) or the directory itself, built with the default options. Raises with the
    offending path / tensor name on a missing directory or file, a missing or unexpected tensor, or
    a shape mismatch, and (:meth:`ModelConfig.from_hf_dict`) on a ``config.json`` whose model this
    decoder cannot compute exactly.
    """
    options = source if isinstance(source, ModelOptions) else ModelOptions(path=os.fspath(source))
    directory = Path(options.path)
    config = read_config(directory)
    reader = SafetensorsReader(directory)
    mesh = mesh or single_device_mesh()
    param_dtype = as_dtype(options.dtype)
    specs = weight_specs(config)

    expected = {name for spec in specs for name in spec.hf_names(config.num_layers)}
    present = reader.names()
    missing = sorted(expected - present)
    if missing:
        raise KeyError(f"{directory}: checkpoint is missing tensor {missing[0]!r}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in present - expected - ignorable if not _IGNORED.search(n))
    if unexpected:
        raise KeyError(f"{directory}: unexpected tensor {unexpected[0]!r} for model_type {config.model_type!r}"
                       + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for spec in specs:
        for name in spec.hf_names(config.num_layers):
            shape = reader.shape(name)
            if shape != spec.hf_shape:
                raise ValueError(f"{directory}: tensor {name!r} has shape {shape}, expected {spec.hf_shape} "
                                 f"from config.json")

    model = abstract_model(config, options, mesh, rules=rules)
    params = dict(param_items(model))
    finite: list[tuple[str, jax.Array]] = []  # (tensor name, whether all its values are finite), checked at the end
    for spec in specs:
        var = params[spec.path]
        sharding = param_sharding(var, mesh, rules)
        if not spec.layered:
            value = place(spec.to_ours(reader.get(spec.hf_name)).astype(param_dtype), sharding)
            finite.append((spec.hf_name, _all_finite(value)))
            var.set_value(value)
            continue
        layer_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        stacked = jax.jit(lambda shape=var.shape: jnp.zeros(shape, param_dtype), out_shardings=sharding)()
        for i, name in enumerate(spec.hf_names(config.num_layers)):
            value = place(spec.to_ours(reader.get(name)).astype(param_dtype), layer_sharding)
            finite.append((name, _all_finite(value)))
            stacked = _write_layer(stacked, value, i)
        var.set_value(stacked)
    _require_finite(finite, reader, param_dtype)
    return model, config


@jax.jit
def _all_finite(value: jax.Array) -> jax.Array:
    """Whether every value of ``value`` is finite: one reduction on the devices, a replicated bool."""
    return jnp.isfinite(value).all()


def _require_finite(finite: list[tuple[str, jax.Array]], reader: SafetensorsReader, dtype) -> None:
    """Stop at the first tensor with a NaN or infinity (as loaded, in ``dtype``), naming it and its file. The
    flags were computed on the devices as the tensors were placed; one transfer reads them all."""
    flags = jax.device_get([flag for _, flag in finite])
    bad = [name for (name, _), ok in zip(finite, flags) if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"{reader.file_of[bad[0]]}: tensor {bad[0]!r} holds non-finite values (NaN or infinity) "
                         f"when loaded as {np.dtype(dtype).name}{more}; the weights are damaged (or overflow "
                         f"{np.dtype(dtype).name}): re-download or re-export them")


# ---------------------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB', '500MB')")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def _hf_tensors(model: Decoder, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` one tensor at a time, in checkpoint order."""
    config = model.config
    params = dict(param_items(model))
    for spec in weight_specs(config):
        var = params[spec.path]
        if not spec.layered:
            yield spec.hf_name, spec.to_hf(to_host(var[...].astype(dtype)))
            continue
        for i, name in enumerate(spec.hf_names(config.num_layers)):
            yield name, spec.to_hf(to_host(var[...][i].astype(dtype)))


def save_pretrained(model: Decoder, path: str | os.PathLike, *, dtype=None, max_shard_size: int | str = "5GB",
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_size``).

    ``dtype`` defaults to the parameter dtype. Tokenizer and generation-config files are copied
    from ``tokenizer_dir`` (default: the directory the model was loaded from) when present.
    Only process 0 writes; every process must call this (gathering sharded weights is collective),
    and none returns before the directory is complete (so another process may load it next).
    """
    out_dir = Path(path)
    out_dtype = as_dtype(dtype) if dtype is not None else model.param_dtype
    limit = _parse_size(max_shard_size)
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_FILE]:
            stale.unlink(missing_ok=True)

    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = total_bytes = 0
    tmp_names: list[Path] = []

    def flush():
        nonlocal pending, pending_bytes
        if pending and writer:
            tmp = out_dir / f"model-tmp-{len(shards):05d}.safetensors"
            save_file(pending, str(tmp), metadata={"format": "pt"})
            tmp_names.append(tmp)
        if pending:
            shards.append(list(pending))
        pending, pending_bytes = {}, 0

    for name, array in _hf_tensors(model, out_dtype):
        if pending and pending_bytes + array.nbytes > limit:
            flush()
        pending[name] = array
        pending_bytes += array.nbytes
        total_bytes += array.nbytes
    flush()

    if writer:
        if len(shards) == 1:
            tmp_names[0].rename(out_dir / SINGLE_FILE)
        else:
            weight_map = {}
            for k, (tmp, names) in enumerate(zip(tmp_names, shards), start=1):
                final = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                tmp.rename(out_dir / final)
                weight_map.update({n: final for n in names})
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        write_config_and_tokenizer(model, out_dir, jnp.dtype(out_dtype).name, tokenizer_dir)
    barrier(f"sftrl_jax.save_pretrained:{out_dir}")
    return out_dir


def write_config_and_tokenizer(model: Decoder, directory: Path, dtype: str,
                               tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Next to ``model``'s saved weights (stored as ``dtype``): its ``config.json``, and the tokenizer files of
    ``tokenizer_dir`` (default: the directory the model was loaded from) unless they are already there."""
    config = model.config.to_hf_dict(dtype=dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    source = tokenizer_dir or model.config.source_dir
    if source is not None and Path(source).resolve() != directory.resolve():
        copy_tokenizer_files(source, directory)


def copy_tokenizer_files(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(destination) / name)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer (with its chat template) of a local Hugging Face directory. Code the directory names
    (``auto_map`` to a ``.py`` file in it) is never run or asked about: a tokenizer that needs it is refused."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    if not any((directory / name).is_file() for name in VOCABULARY_FILES):
        # transformers would build a 1-token tokenizer, or ask for sentencepiece to convert files that are not there
        raise FileNotFoundError(f"{directory}: no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); copy "
                                "the tokenizer files of the model it came from into the folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"{directory}: its tokenizer needs code from the folder (tokenizer_config.json auto_map); "
                         "sftrl-jax runs no code from a model folder") from None
