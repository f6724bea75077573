"""FLOP counts used in the logs (Paper A plots reward against compute) and in the benchmarks.

Conventions (the usual MFU ones, e.g. PaLM / MaxText):

* ``N`` = parameters that take part in matmuls: every projection of every layer plus the LM head
  (the tied embedding counts once, as the head; norms and biases are ignored).
* A forward pass over a sequence of ``T`` tokens costs ``2·N·T + 4·L·H·D·T²`` (the second term is
  QKᵀ and AV over the full square, not halved for causality; ``L`` layers, ``H`` query heads of
  width ``D``). Forward + backward is 3× the forward.
* Generating token ``t`` with ``c`` tokens of context costs ``2·N + 4·L·H·D·c``; the prompt's
  prefill is one forward pass over it.
"""

from __future__ import annotations

from .models.config import ModelConfig

# the metrics under which the trainers report their cumulative counted FLOPs (SFT: training; RL: training
# and generation); ``train.max_flops`` stops a run when their sum reaches it
COUNTED_FLOPS = ("flops_train", "flops_generate")


def matmul_params(config: ModelConfig) -> int:
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attention + mlp) + c.vocab_size * c.hidden_size


def forward_flops(config: ModelConfig, tokens: int) -> float:
    c = config
    return 2.0 * matmul_params(c) * tokens + 4.0 * c.num_layers * c.num_heads * c.head_dim * tokens**2


def train_flops(config: ModelConfig, tokens: int) -> float:
    """Forward + backward over one sequence of ``tokens`` tokens."""
    return 3.0 * forward_flops(config, tokens)


def generation_flops(config: ModelConfig, prompt_tokens: int, new_tokens: int, *, prefill: bool = True) -> float:
    """Prefill of the prompt (optional: shared by the samples of a prompt) plus ``new_tokens`` decode steps."""
    c = config
    total = forward_flops(c, prompt_tokens) if prefill else 0.0
    # sum over decode steps of the context length: prompt + 0 .. new_tokens - 1
    context_sum = new_tokens * prompt_tokens + new_tokens * (new_tokens - 1) / 2
    return total + 2.0 * matmul_params(c) * new_tokens + 4.0 * c.num_layers * c.num_heads * c.head_dim * context_sum
