"""Tiny random Hugging Face checkpoints (and a tiny tokenizer) built with ``transformers``.

Every parameter, biases and norm weights included, is drawn at random with a visible scale, so a
parity test cannot pass by accident (HF initialises biases to 0 and norms to 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)

# name -> (config class, config overrides, save kwargs)
FAMILIES = {
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True), {}),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False), {}),
    "llama3_rope": ("LlamaConfig", dict(
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)), {}),
    "llama_linear": ("LlamaConfig", dict(tie_word_embeddings=True, rope_scaling=dict(rope_type="linear", factor=4.0)),
                     {}),
    "qwen3_headdim": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=24), {}),
    "qwen2_sharded": ("Qwen2Config", dict(tie_word_embeddings=False), dict(max_shard_size="60KB")),
}


def make_hf_model(name: str, seed: int = 0):
    config_class, overrides, _ = FAMILIES[name]
    config = getattr(transformers, config_class)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in pname:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)
    return model.eval()


def make_hf_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    model = make_hf_model(name, seed)
    model.save_pretrained(directory, **FAMILIES[name][2])
    return Path(directory)


def load_hf(directory, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=dtype).eval()


def read_tensors(directory) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint, by name."""
    from sftrl_jax.models.hf_io import SafetensorsReader

    reader = SafetensorsReader(Path(directory))
    return {name: reader.get(name) for name in sorted(reader.names())}


def hf_logits(model, input_ids, attention_mask=None):
    """float32 logits of the PyTorch model; left padding handled with explicit position ids."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    kwargs = {}
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, dtype=torch.long)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, **kwargs).logits.float().numpy()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-style: with no system message the template injects its own default system block.
QWEN25_DEFAULT_SYSTEM = "please reason step by step, and put your final answer within \\boxed{}."
QWEN25_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>system\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if not (m['role'] == 'system' and loop.first) %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(directory: Path, chat_template: str = CHAT_TEMPLATE) -> Path:
    """A tiny character-level tokenizer with Qwen-style special tokens and a chat template (< 96 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 \n.,+-*/=()\\{}^_?:")
    vocab = {tok: i for i, tok in enumerate(specials + chars + ["[UNK]"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]")
    fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return Path(directory)
