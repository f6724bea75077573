"""The demo's tokenizer and base model, built offline and saved in Hugging Face format.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the task's own text (digits kept
as single tokens so arithmetic is learnable), wrapped as a ``PreTrainedTokenizerFast`` with a
Qwen-style chat template. The model is a small Llama-family decoder initialised at random with
our own initialiser and written with ``save_pretrained``, so the demo loads it through exactly
the code path of a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build_tokenizer(texts: list[str], directory: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_base_model(directory: Path, tokenizer, *, seed: int = 0, hidden_size: int = 128, num_layers: int = 2,
                     intermediate_size: int = 384) -> Path:
    from ..models import ModelConfig, init_model, save_pretrained

    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=hidden_size // 4, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hf_config={"initializer_range": 0.02}, source_dir=str(directory))
    save_pretrained(init_model(config, seed=seed), directory)
    return directory
