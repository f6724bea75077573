"""Model configuration read from (and written back to) a Hugging Face ``config.json``.

One :class:`ModelConfig` describes every supported family; the family differences are fields:

=============  ==========  =====================  ========  =====================
model_type     qkv bias    q/k RMSNorm per head   tied      RoPE scaling
=============  ==========  =====================  ========  =====================
``qwen2``      yes         no                     either    none
``llama``      config      no                     either    none/linear/llama3
``qwen3``      config      yes                    either    none/linear/llama3
=============  ==========  =====================  ========  =====================

Every layer attends over all earlier positions: a checkpoint whose config declares a sliding window
that its family's transformers model would apply (:func:`check_sliding_window`) is refused.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen2", "llama", "qwen3")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("linear", factor) / ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos) / None
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # The checkpoint's own config.json, kept so that an export writes back every field it had.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    # Directory the weights came from (tokenizer files are copied along on export).
    source_dir: str | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source_dir: str | None = None) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}"
                + (f" in {source_dir}/config.json" if source_dir else "")
                + f"; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        where = f"{source_dir}/config.json" if source_dir else "config.json"

        def need(key):
            if key not in hf:
                raise KeyError(f"{where}: missing required key {key!r}")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
        check_sliding_window(hf, model_type, int(need("num_hidden_layers")), where)

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope_theta, rope_scaling = _parse_rope(hf, where)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            hf_config=copy.deepcopy(dict(hf)),
            source_dir=source_dir,
        )

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """A ``config.json`` that ``transformers`` reads back into an equivalent model."""
        out = copy.deepcopy(self.hf_config)
        out.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        # Write RoPE both ways: the pre-v5 keys (rope_theta/rope_scaling) and v5's rope_parameters.
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        scaling = None
        if self.rope_scaling is not None:
            kind, factor, *rest = self.rope_scaling
            scaling = {"rope_type": kind, "factor": factor}
            if kind == "llama3":
                low, high, orig = rest
                scaling.update(low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=orig)
            rope.update(scaling)
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = scaling
        out["rope_parameters"] = rope
        if dtype is not None:
            out["torch_dtype"] = dtype
            out["dtype"] = dtype
        return out

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)


def require_positions(model_config: ModelConfig, needed: int, key: str) -> None:
    """Refuse sequences of ``needed`` tokens (config key ``key``) on a model that has fewer positions.

    Positions past ``max_position_embeddings`` are outside what the model (its RoPE scaling) was built
    for: training there runs and silently learns on out-of-range positions (e.g. a 16k-token recipe on
    stock Qwen2.5-Math-7B, which has 4,096). A checkpoint whose ``config.json`` does not declare the
    key has no known limit and passes.
    """
    declared = model_config.hf_config
    if declared and "max_position_embeddings" not in declared:
        return
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and needed > limit:
        where = f" ({model_config.source_dir})" if model_config.source_dir else ""
        raise ValueError(f"{key} ({needed}) exceeds the model's max_position_embeddings ({limit}){where}: "
                         f"it was not built for positions past {limit}; lower {key} or use a model with "
                         f"longer positions (e.g. RoPE extended, as LUFFY's Qwen2.5-Math-7B-16k-think)")


def _qwen_sliding_layers(hf: dict[str, Any], num_layers: int, where: str) -> tuple[Any, list[int], str]:
    """Qwen2/Qwen2.5/Qwen3, as transformers' Qwen2Config/Qwen3Config read them: ``sliding_window``
    counts only when ``use_sliding_window`` is true (else it is dropped, whatever its value); the layers
    it applies to are those ``layer_types`` marks ``"sliding_attention"``, or without ``layer_types``
    those from ``max_window_layers`` (default 28) on."""
    use = bool(hf.get("use_sliding_window", False))
    window = hf.get("sliding_window") if use else None
    types = hf.get("layer_types")
    if types is not None:
        other = sorted(set(types) - {"full_attention", "sliding_attention"})
        if other:
            raise ValueError(f"{where}: layer_types has {other[0]!r} layers; only 'full_attention' is supported")
        because = f"layer_types, use_sliding_window {str(use).lower()}"
        return window, [i for i, kind in enumerate(types) if kind == "sliding_attention"], because
    if window is None:
        return None, [], ""
    first = 28 if hf.get("max_window_layers") is None else int(hf["max_window_layers"])
    return window, list(range(first, num_layers)), f"use_sliding_window true, max_window_layers {first}"


def _no_sliding_layers(hf: dict[str, Any], num_layers: int, where: str) -> tuple[Any, list[int], str]:
    """Llama: transformers' LlamaConfig has no window keys (a ``sliding_window`` or ``layer_types`` in
    its config.json is ignored), so every layer attends globally, as here."""
    return None, [], ""


# model_type -> (config.json, num_layers, where) -> (the window in effect or None, the layers that
# attend through it, the keys that say so): how that family's transformers model decides where a
# sliding window applies. Every supported model_type has an entry.
SLIDING_LAYERS: dict[str, Callable[[dict[str, Any], int, str], tuple[Any, list[int], str]]] = {
    "qwen2": _qwen_sliding_layers,
    "qwen3": _qwen_sliding_layers,
    "llama": _no_sliding_layers,
}


def check_sliding_window(hf: dict[str, Any], model_type: str, num_layers: int, where: str = "config.json") -> None:
    """Refuse a ``config.json`` (the dict ``hf``) with layers that attend through a sliding window.

    The decoder attends globally on every layer. A window counts as its family reads it
    (:data:`SLIDING_LAYERS`); one of at least ``max_position_embeddings`` positions covers every
    position the model has, so it is global attention and passes. Sliding layers without a window in
    effect (which transformers cannot run either) are refused too.
    """
    window, layers, because = SLIDING_LAYERS[model_type](hf, num_layers, where)
    if not layers:
        return
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
    if window is None:
        raise ValueError(f"{where}: {span} of {num_layers} slide ({because}) but no window is in effect "
                         f"(sliding_window {hf.get('sliding_window')!r}); sliding-window attention is not supported")
    positions = hf.get("max_position_embeddings")
    if positions is not None and int(window) >= int(positions):
        return
    cover = (f"a window of at least max_position_embeddings ({positions}) is global attention and passes"
             if positions is not None else "max_position_embeddings is not declared, so no window is known to "
                                          "cover every position")
    raise ValueError(f"{where}: sliding_window {window} applies to {span} of {num_layers} ({because}): "
                     f"sliding-window attention is not supported ({cover})")


def _parse_rope(hf: dict[str, Any], where: str) -> tuple[float, tuple | None]:
    # transformers >= 5 writes ``rope_parameters``; older checkpoints ``rope_theta`` + ``rope_scaling``.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{where}: RoPE scaling type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if kind == "default":
        return theta, None
    try:
        factor = float(scaling["factor"])
        if kind == "linear":
            return theta, ("linear", factor)
        return theta, (
            "llama3",
            factor,
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as err:
        raise KeyError(f"{where}: RoPE scaling {kind!r} needs key {err.args[0]!r}") from None

