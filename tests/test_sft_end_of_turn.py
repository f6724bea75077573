"""How an SFT response ends: ``data.response_end: openrlhf`` (the default) against OpenRLHF v0.7.5 by hand,
and ``eos`` (the response text, then the EOS).

The expected values come from reading OpenRLHF at tag v0.7.5 (commit 22697a1b7d7ad4561ca8aea38a9ff09fbe2216a0),
``openrlhf/datasets/sft_dataset.py`` with ``--apply_chat_template`` and an output key:

- ``preprocess_data`` (lines 21-22): the prompt is the chat template of the prompt messages with the generation
  prompt; the response is the template of prompt + response messages (no generation prompt) with the first
  ``len(prompt)`` characters cut off. Nothing checks that the conversation starts with the prompt.
- ``process_data`` (lines 145-158): the prompt is tokenised alone (no special tokens, truncated to ``max_len``)
  giving P tokens; the row is dropped when P >= max_len - 2.
- ``__getitem__`` (lines 178-180): text = prompt + response with trailing "\\n" stripped; when it does not end
  with ``tokenizer.eos_token``, " " + eos_token is appended. Lines 183-190 tokenise the text (no special tokens,
  truncated to ``max_len``); line 198 sets the last token id to ``tokenizer.eos_token_id`` ("to avoid
  EOS_token truncation"), on every row, so a cut row ends with the EOS in place of its last kept token.
- ``get_loss_mask`` (line 209): mask[P - 1 : -1] = 1. ``openrlhf/trainer/sft_trainer.py`` line 152 applies
  ``loss_mask[:, :-1]`` to the per-token log-probs of ``openrlhf/models/actor.py`` (line 191 rolls the
  sequence by one, line 220 drops the last position), whose position t is the log-prob of token t + 1; so the
  supervised tokens are P .. n-1: every token after the prompt, the final EOS included, none of the prompt.

Our mask is on the supervised tokens themselves (True on tokens P .. n-1). The tokenizers here are character
level (specials are single tokens), so the supervised tokens are listed one by one.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import transformers

from hf_checkpoints import CHAT_TEMPLATE, QWEN25_CHAT_TEMPLATE, QWEN25_DEFAULT_SYSTEM, make_tokenizer
from sftrl_jax.data import SFTDataOptions, SFTExample, tokenize_sft

IM_END, ENDOFTEXT = "<|im_end|>", "<|endoftext|>"
EOT, END_OF_TEXT = "<|eot_id|>", "<|end_of_text|>"
ANSWER = "the answer is 2."
QUESTION = "what is 1+1?"

# Meta-Llama-3-8B-Instruct's chat template: BOS, then each message as a header, the content trimmed, <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_PROMPT = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}{EOT}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
CHATML_PROMPT = f"<|im_start|>user\n{QUESTION}{IM_END}\n<|im_start|>assistant\n"


def make_llama3_tokenizer(directory, eos_token: str):
    """A character-level tokenizer with Llama-3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|begin_of_text|>", END_OF_TEXT, "<|start_header_id|>", "<|end_header_id|>", EOT]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 \n.,+-*/=()\\{}^_?:")
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars + ["[UNK]"])},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                                eos_token=eos_token, pad_token=END_OF_TEXT, unk_token="[UNK]")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def qwen_base_tokenizer(tmp_path_factory):
    """Qwen2.5 base (Qwen2.5-Math-7B): the ChatML template with its default system block, EOS <|endoftext|>."""
    directory = make_tokenizer(tmp_path_factory.mktemp("qwen_base"), chat_template=QWEN25_CHAT_TEMPLATE)
    return transformers.AutoTokenizer.from_pretrained(str(directory), eos_token=ENDOFTEXT)


@pytest.fixture(scope="module")
def llama3_instruct_tokenizer(tmp_path_factory):
    return make_llama3_tokenizer(tmp_path_factory.mktemp("llama3_instruct"), eos_token=EOT)


@pytest.fixture(scope="module")
def llama3_base_tokenizer(tmp_path_factory):
    return make_llama3_tokenizer(tmp_path_factory.mktemp("llama3_base"), eos_token=END_OF_TEXT)


def row(answer: str = ANSWER, question: str = QUESTION) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "target": [{"role": "assistant", "content": answer}]}


def one(data: dict, tokenizer, **options) -> SFTExample:
    examples, stats = tokenize_sft([("rows.parquet", 0, data)], tokenizer, SFTDataOptions(**options))
    assert stats.bad_rows == stats.dropped_too_long == 0 and len(examples) == 1, stats
    return examples[0]


def split(example: SFTExample, tokenizer) -> tuple[str, list[str]]:
    """(decoded prompt, the supervised tokens decoded one by one); asserts the mask is one contiguous tail."""
    boundary = int(np.argmax(example.loss_mask))
    assert example.loss_mask.any() and not example.loss_mask[:boundary].any() and example.loss_mask[boundary:].all()
    ids = example.input_ids.tolist()
    return tokenizer.decode(ids[:boundary]), [tokenizer.decode([i]) for i in ids[boundary:]]


def test_default_is_openrlhf():
    assert SFTDataOptions().response_end == "openrlhf"
    with pytest.raises(ValueError, match="response_end"):
        SFTDataOptions(response_end="text")


# ---------------------------------------------------------------------------------------------
# Qwen (ChatML): end of turn <|im_end|>, then "\n"


def test_chatml_eos_is_the_end_of_turn(tokenizer):
    """Qwen2.5-Instruct / Qwen3: EOS = <|im_end|>. The response renders as ANSWER + "<|im_end|>\\n"; the "\\n" is
    stripped and the text ends with the EOS, so nothing is appended: ANSWER then <|im_end|>, which here is also
    what "eos" supervises."""
    assert tokenizer.eos_token == IM_END
    example = one(row(), tokenizer)
    assert split(example, tokenizer) == (CHATML_PROMPT, [*ANSWER, IM_END])
    assert int(example.input_ids[-1]) == tokenizer.convert_tokens_to_ids(IM_END)
    n_prompt = len(tokenizer(CHATML_PROMPT, add_special_tokens=False)["input_ids"])
    assert example.loss_mask.tolist() == [False] * n_prompt + [True] * (len(ANSWER) + 1)
    eos = one(row(), tokenizer, response_end="eos")
    assert np.array_equal(eos.input_ids, example.input_ids) and np.array_equal(eos.loss_mask, example.loss_mask)


def test_chatml_base_model_eos_differs(qwen_base_tokenizer, tokenizer):
    """Qwen2.5 base (Qwen2.5-Math-7B): EOS = <|endoftext|>, end of turn <|im_end|>. The text ANSWER + "<|im_end|>"
    does not end with the EOS, so " <|endoftext|>" is appended: supervised ANSWER, <|im_end|>, " ", <|endoftext|>.
    The template's default system block is part of the prompt (and goes with remove_system_prompt)."""
    tok = qwen_base_tokenizer
    default_system = f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}{IM_END}\n"
    example = one(row(), tok)
    assert split(example, tok) == (default_system + CHATML_PROMPT, [*ANSWER, IM_END, " ", ENDOFTEXT])
    assert int(example.input_ids[-1]) == tok.convert_tokens_to_ids(ENDOFTEXT) == tok.eos_token_id
    removed = one(row(), tok, remove_system_prompt=True)
    assert split(removed, tok) == (CHATML_PROMPT, [*ANSWER, IM_END, " ", ENDOFTEXT])
    # "eos": the response text, then the EOS; the end of turn is never supervised
    assert split(one(row(), tok, response_end="eos"), tok) == (default_system + CHATML_PROMPT, [*ANSWER, ENDOFTEXT])
    # data.eos_token stands for the tokenizer's EOS in OpenRLHF's rule
    assert split(one(row(), tokenizer, eos_token=ENDOFTEXT), tokenizer) == (
        CHATML_PROMPT, [*ANSWER, IM_END, " ", ENDOFTEXT])


def test_only_newlines_after_the_end_of_turn_are_stripped(tokenizer, qwen_base_tokenizer):
    """ChatML writes the content verbatim: its own trailing newlines stay, before <|im_end|>; the "\\n" after
    the end of turn is what the strip removes."""
    assert split(one(row("2\n\n"), tokenizer, response_end="openrlhf"), tokenizer)[1] == ["2", "\n", "\n", IM_END]
    assert split(one(row("2\n\n"), qwen_base_tokenizer), qwen_base_tokenizer)[1] == [
        "2", "\n", "\n", IM_END, " ", ENDOFTEXT]


def test_template_without_end_of_turn(tmp_path):
    """A template that writes nothing after the assistant's content: the content's own trailing newlines are
    stripped and " " + EOS appended."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if m['role'] != 'assistant' %}<|im_end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path, chat_template=template)))
    assert split(one(row("2\n\n"), tok), tok) == (CHATML_PROMPT, ["2", " ", IM_END])


# ---------------------------------------------------------------------------------------------
# Llama-3: end of turn <|eot_id|>, nothing after it, the content trimmed by the template


def test_llama3_instruct_eos_is_the_end_of_turn(llama3_instruct_tokenizer):
    """Llama-3-Instruct: EOS = <|eot_id|>. The response renders as the trimmed content + <|eot_id|>, which ends
    with the EOS: ANSWER then <|eot_id|>. The template's trim is supervised as rendered."""
    tok = llama3_instruct_tokenizer
    example = one(row(), tok)
    assert split(example, tok) == (LLAMA3_PROMPT, [*ANSWER, EOT])
    n_prompt = len(tok(LLAMA3_PROMPT, add_special_tokens=False)["input_ids"])
    assert example.loss_mask.tolist() == [False] * n_prompt + [True] * (len(ANSWER) + 1)
    assert split(one(row(f"  {ANSWER}\n\n"), tok), tok) == (LLAMA3_PROMPT, [*ANSWER, EOT])
    # "eos" supervises the row's text as it is
    assert split(one(row(f"  {ANSWER}\n\n"), tok, response_end="eos"), tok) == (
        LLAMA3_PROMPT, [" ", " ", *ANSWER, "\n", "\n", EOT])


def test_llama3_base_model_eos_differs(llama3_base_tokenizer):
    """Llama-3 base: EOS = <|end_of_text|>, end of turn <|eot_id|>: ANSWER, <|eot_id|>, " ", <|end_of_text|>."""
    tok = llama3_base_tokenizer
    example = one(row(), tok)
    assert split(example, tok) == (LLAMA3_PROMPT, [*ANSWER, EOT, " ", END_OF_TEXT])
    assert int(example.input_ids[-1]) == tok.convert_tokens_to_ids(END_OF_TEXT)
    assert split(one(row(), tok, response_end="eos"), tok) == (LLAMA3_PROMPT, [*ANSWER, END_OF_TEXT])


# ---------------------------------------------------------------------------------------------
# Lengths: OpenRLHF's prompt filter (P >= max_len - 2 dropped) and its EOS on a cut response


def test_truncation_ends_with_a_supervised_eos(tokenizer, qwen_base_tokenizer):
    n_prompt = len(tokenizer(CHATML_PROMPT, add_special_tokens=False)["input_ids"])
    data = row("0123456789")  # supervised: 10 digits + <|im_end|> = 11 tokens

    def run(max_length, tok=tokenizer, data=data, **options):
        return tokenize_sft([("f", 0, data)], tok, SFTDataOptions(max_length=max_length, **options))

    (example,), stats = run(n_prompt + 11)
    assert split(example, tokenizer)[1] == [*"0123456789", IM_END] and stats.truncated == 0
    # One token too many: cut to max_length, then the last kept token ("9") becomes the EOS, supervised.
    (example,), stats = run(n_prompt + 10)
    assert split(example, tokenizer) == (CHATML_PROMPT, [*"012345678", IM_END]) and stats.truncated == 1
    assert len(example.input_ids) == n_prompt + 10
    # ("eos" cuts the EOS first: a cut response never ends in it.)
    (cut,), _ = run(n_prompt + 10, response_end="eos")
    assert split(cut, tokenizer)[1] == list("0123456789")
    # The shortest kept: a prompt of max_length - 3 tokens, two response tokens and the EOS.
    (example,), stats = run(n_prompt + 3)
    assert split(example, tokenizer)[1] == ["0", "1", IM_END] and stats.truncated == 1
    # A prompt of max_length - 2 tokens or more is dropped, even when the whole row fits ("1" + <|im_end|>);
    # "eos" keeps what has room for one response token.
    examples, stats = run(n_prompt + 2, data=row("1"))
    assert (examples, stats.dropped_too_long, stats.truncated) == ([], 1, 0)
    (example,), _ = run(n_prompt + 2, data=row("1"), response_end="eos")
    assert split(example, tokenizer)[1] == ["1", IM_END]
    # overlong: drop still drops what does not fit
    examples, stats = run(n_prompt + 10, overlong="drop")
    assert (examples, stats.dropped_too_long) == ([], 1)

    # A base model's cut inside the appended " <|endoftext|>": the EOS replaces the " ".
    tok = qwen_base_tokenizer
    n_base = len(tok(tok.apply_chat_template(row()["prompt"], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"])
    (example,), stats = run(n_base + 6, tok=tok, data=row("0123"))  # 0 1 2 3 <|im_end|> " " <|endoftext|>
    assert split(example, tok)[1] == [*"0123", IM_END, ENDOFTEXT] and stats.truncated == 1


# ---------------------------------------------------------------------------------------------
# Templates whose conversation is not the prompt followed by the response


# the generation prompt opens the think block, as LUFFY's Qwen2.5-Math-7B-16k-think's does
THINK_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                       "<|im_start|>assistant\n<think>\n{% endif %}")


def test_unseparable_template_is_an_error_naming_the_row(tmp_path, tokenizer):
    # The generation prompt names another role than the assistant's turn.
    other_role = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>model\n{% endif %}")
    tok = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "r", chat_template=other_role)))
    rows = [("data/sft.jsonl", 2, row()), ("data/sft.jsonl", 3, row())]
    for on_bad_row in ("skip", "error"):  # not the row's fault: never skipped
        with pytest.raises(ValueError, match=re.escape("data/sft.jsonl row 2: the chat template does not render") +
                           r".*\|>model\\n'.*\|>assistant\\nthe answer.*data\.response_end: eos"):
            tokenize_sft(rows, tok, SFTDataOptions(on_bad_row=on_bad_row))
    examples, _ = tokenize_sft(rows, tok, SFTDataOptions(response_end="eos"))
    assert [split(e, tok)[1] for e in examples] == [[*ANSWER, IM_END]] * 2

    # A template that opens <think> at the generation prompt, and a response without the marker.
    think = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "t", THINK_TEMPLATE)))
    with pytest.raises(ValueError, match=r"data/sft\.jsonl row 2: the chat template does not render"):
        tokenize_sft(rows, think, SFTDataOptions(think_prefix="prompt"))


def test_think_prefix_combinations(tmp_path, tokenizer):
    """A template that does not open <think>: "keep" supervises the marker, "prompt" conditions on it. One that
    opens it at the generation prompt has written the response's marker already: it is supervised under
    neither (under "eos", "keep" supervises a second one)."""
    data = row("<think>\nhmm.</think>\n2")
    assert split(one(data, tokenizer, think_prefix="keep"), tokenizer) == (
        CHATML_PROMPT, ["<think>", *"\nhmm.", "</think>", *"\n2", IM_END])
    assert split(one(data, tokenizer, think_prefix="prompt"), tokenizer) == (
        CHATML_PROMPT + "<think>\n", [*"hmm.", "</think>", *"\n2", IM_END])

    think = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path, chat_template=THINK_TEMPLATE)))
    opened = CHATML_PROMPT + "<think>\n"
    for think_prefix in ("keep", "prompt"):
        assert split(one(data, think, think_prefix=think_prefix), think) == (
            opened, [*"hmm.", "</think>", *"\n2", IM_END])
    assert split(one(data, think, think_prefix="keep", response_end="eos"), think) == (
        opened, ["<think>", *"\nhmm.", "</think>", *"\n2", IM_END])
