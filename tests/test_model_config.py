"""Reading config.json: sliding windows are refused where the family's transformers model would apply one."""

import pytest
import torch
import transformers

from sftrl_jax.models import ModelConfig
from sftrl_jax.models.config import SLIDING_LAYERS, SUPPORTED_MODEL_TYPES

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
TRANSFORMERS_CONFIG = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig"}
SLIDE_LAST = ["full_attention"] * 3 + ["sliding_attention"]

# (name, config.json keys over TINY, refused) for Qwen2/Qwen3
QWEN_CASES = [
    ("no window keys", {}, False),
    # stock Qwen2.5(-Math): a window declared but switched off
    ("use_sliding_window false", dict(use_sliding_window=False, sliding_window=64, max_window_layers=0), False),
    # a Mistral-style bare sliding_window: Qwen drops it without use_sliding_window
    ("bare sliding_window", dict(sliding_window=64), False),
    ("on, from max_window_layers", dict(use_sliding_window=True, sliding_window=64, max_window_layers=2), True),
    ("on, every layer", dict(use_sliding_window=True, sliding_window=64, max_window_layers=0), True),
    # the default max_window_layers (28) leaves all 4 layers global
    ("on, max_window_layers past the last layer", dict(use_sliding_window=True, sliding_window=64), False),
    ("on, window null", dict(use_sliding_window=True, sliding_window=None, max_window_layers=0), False),
    # a window that spans every position is global attention
    ("on, window = max_position_embeddings", dict(use_sliding_window=True, sliding_window=512, max_window_layers=0),
     False),
    ("on, window > max_position_embeddings", dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0),
     False),
    ("on, window one short", dict(use_sliding_window=True, sliding_window=511, max_window_layers=0), True),
    # layer_types (which recent transformers versions write) decides the layers; max_window_layers is then unread
    ("layer_types all full", dict(use_sliding_window=True, sliding_window=64, max_window_layers=0,
                                  layer_types=["full_attention"] * 4), False),
    ("layer_types slides", dict(use_sliding_window=True, sliding_window=64, layer_types=SLIDE_LAST), True),
    ("layer_types slides, wide window", dict(use_sliding_window=True, sliding_window=512, layer_types=SLIDE_LAST),
     False),
    # sliding layers with the window switched off: transformers cannot run this either
    ("layer_types slides, window off", dict(use_sliding_window=False, sliding_window=64, layer_types=SLIDE_LAST), True),
]


def _hf(model_type, extra):
    return {"model_type": model_type, **TINY, **extra}


def _refused(hf) -> str | None:
    try:
        ModelConfig.from_hf_dict(hf)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("name,extra,refused", QWEN_CASES, ids=[case[0] for case in QWEN_CASES])
def test_qwen_window_refused_exactly_where_transformers_applies_one(model_type, name, extra, refused):
    hf = _hf(model_type, extra)
    error = _refused(hf)
    assert (error is not None) == refused, error
    if error:
        assert "\n" not in error and error.startswith("config.json: ")
        assert "sliding-window attention is not supported" in error
    # the same verdict from transformers' own reading of the config: some layer is "sliding_attention"
    # and its window (None where transformers drops it) is narrower than the positions
    config = getattr(transformers, TRANSFORMERS_CONFIG[model_type]).from_dict(hf)
    slides = "sliding_attention" in config.layer_types
    assert refused == (slides and (config.sliding_window is None or config.sliding_window < 512))


def test_refusal_names_the_key_and_its_value():
    error = _refused(_hf("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=2)))
    assert error == ("config.json: sliding_window 64 applies to layers 2-3 of 4 (use_sliding_window true, "
                     "max_window_layers 2): sliding-window attention is not supported (a window of at least "
                     "max_position_embeddings (512) is global attention and passes)")
    error = _refused(_hf("qwen3", dict(use_sliding_window=False, sliding_window=64, layer_types=SLIDE_LAST)))
    assert error.startswith("config.json: layer 3 of 4 slide (layer_types, use_sliding_window false) but no window "
                            "is in effect (sliding_window 64)")


def test_window_without_declared_positions_is_refused():
    """Without max_position_embeddings no window is known to span every position."""
    hf = {k: v for k, v in _hf("qwen2", dict(use_sliding_window=True, sliding_window=1 << 20,
                                             max_window_layers=0)).items() if k != "max_position_embeddings"}
    assert "max_position_embeddings is not declared" in _refused(hf)


def test_unknown_layer_type_is_refused():
    error = _refused(_hf("qwen3", dict(layer_types=["full_attention"] * 3 + ["chunked_attention"])))
    assert error == "config.json: layer_types has 'chunked_attention' layers; only 'full_attention' is supported"


@pytest.mark.parametrize("extra", [dict(sliding_window=2), dict(use_sliding_window=True, sliding_window=2),
                                   dict(use_sliding_window=True, sliding_window=2, layer_types=SLIDE_LAST)],
                         ids=["bare", "use_sliding_window", "layer_types"])
def test_llama_has_no_window_keys(extra):
    """transformers' Llama reads no window key, so a Llama config.json that carries one attends globally."""
    assert _refused(_hf("llama", extra)) is None


@pytest.mark.parametrize("model_type,honoured", [("qwen2", True), ("llama", False)])
def test_transformers_applies_the_window_only_where_it_is_refused(model_type, honoured):
    """Run the tiny transformers model with and without a narrow window (same weights): its logits change
    exactly for the family whose config is refused."""
    cls = getattr(transformers, TRANSFORMERS_CONFIG[model_type])
    windowed = {**TINY, "use_sliding_window": True, "sliding_window": 2, "layer_types": SLIDE_LAST}
    logits = []
    for keys in (TINY, windowed):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cls(**keys), attn_implementation="eager").eval()
        with torch.no_grad():
            logits.append(model(torch.arange(12)[None]).logits)
    assert (not torch.allclose(*logits)) == honoured
    assert (_refused(_hf(model_type, windowed)) is not None) == honoured


def test_every_supported_model_type_says_how_it_reads_a_window():
    assert set(SLIDING_LAYERS) == set(SUPPORTED_MODEL_TYPES)
