"""SFT data front end: row sources and tokenisation (loss mask, schemas, truncation, bad rows).

The tokenizer is character level (one token per character; ``<think>`` and the chat markers are
single special tokens), so expected token counts and boundaries are easy to state.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from pathlib import Path

import datasets
import datasets.config
import numpy as np
import pandas as pd
import pytest
import transformers

from hf_checkpoints import QWEN25_CHAT_TEMPLATE, QWEN25_DEFAULT_SYSTEM, make_tokenizer
from sftrl_jax.data import SFTDataOptions, SFTDataStats, SFTExample, build_prompt_text, load_rows, tokenize_sft

EOS = "<|im_end|>"
# A few rows of ../shared/data/luffy-eval/valid.all.parquet (tests/fixtures/luffy-eval/README.md)
LUFFY_EVAL = Path(__file__).resolve().parent / "fixtures" / "luffy-eval" / "valid.all.parquet"


def luffy_row(question: str = "what is 1+1?", answer: str = "<think>\none plus one.</think>\nthe answer is 2.",
              system: str | None = "think first.") -> dict:
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"data_source": "math", "prompt": prompt, "target": [{"role": "assistant", "content": answer}],
            "reward_model": {"ground_truth": "2", "style": "rule"}}


def user_prompt(text: str) -> str:
    """What the plain test template renders for one user message plus the generation prompt."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")  # fixtures: tests/conftest.py


@pytest.fixture(scope="module")
def qwen25_tokenizer(tmp_path_factory):
    directory = make_tokenizer(tmp_path_factory.mktemp("tok25"), chat_template=QWEN25_CHAT_TEMPLATE)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def one(row: dict, tokenizer, **options) -> SFTExample:
    examples, stats = tokenize_sft([("rows.parquet", 0, row)], tokenizer, SFTDataOptions(**options))
    assert stats.bad_rows == 0 and len(examples) == 1, stats
    return examples[0]


def split_text(example: SFTExample, tokenizer) -> tuple[str, str]:
    """(decoded unmasked tokens, decoded masked tokens); asserts the mask is one contiguous tail."""
    boundary = int(np.argmax(example.loss_mask)) if example.loss_mask.any() else len(example.loss_mask)
    assert not example.loss_mask[:boundary].any() and example.loss_mask[boundary:].all()
    return (tokenizer.decode(example.input_ids[:boundary].tolist()),
            tokenizer.decode(example.input_ids[boundary:].tolist()))


# ---------------------------------------------------------------------------------------------
# The loss mask


def test_loss_mask_is_exactly_response_plus_eos(tokenizer):
    row = luffy_row()
    answer = row["target"][0]["content"]
    example = one(row, tokenizer)

    prompt_text = build_prompt_text(row["prompt"], tokenizer)
    assert prompt_text == ("<|im_start|>system\nthink first.<|im_end|>\n" + user_prompt("what is 1+1?"))
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    n = len(prompt_ids)

    assert example.input_ids.dtype == np.int32 and example.loss_mask.dtype == np.bool_
    assert example.input_ids.tolist() == prompt_ids + response_ids + [eos_id]
    assert example.loss_mask.shape == example.input_ids.shape
    # The boundary, exactly: the last prompt token ("\n" after "assistant") is not supervised, the
    # first response token ("<think>") is.
    assert np.flatnonzero(example.loss_mask)[0] == n
    assert not example.loss_mask[:n].any()
    assert example.loss_mask[n:].all()
    assert tokenizer.decode([int(example.input_ids[n - 1])]) == "\n"
    assert int(example.input_ids[n]) == tokenizer.convert_tokens_to_ids("<think>")
    # The final token is the EOS and it is supervised.
    assert int(example.input_ids[-1]) == eos_id and example.loss_mask[-1]
    assert int(example.loss_mask.sum()) == len(response_ids) + 1
    assert tokenizer.decode(example.input_ids[example.loss_mask].tolist()) == answer + EOS
    assert tokenizer.decode(example.input_ids[~example.loss_mask].tolist()) == prompt_text


def test_plain_schema(tokenizer):
    example = one({"prompt": "what is 2+2?", "response": "4."}, tokenizer)
    assert split_text(example, tokenizer) == (user_prompt("what is 2+2?"), "4." + EOS)


def test_plain_text_rows_train_every_token_without_a_template(tokenizer, caplog):
    # data.text_field (TRL's dataset_text_field): pretraining text, no chat template, every token a target,
    # then the EOS id (not response_end's " " + EOS); the other fields are not read
    row = {"text": "3+4=7. q: 2+2? a: 4", "prompt": "not this", "response": "nor this"}
    for response_end in ("openrlhf", "eos"):
        example = one(row, tokenizer, text_field="text", response_end=response_end)
        assert tokenizer.decode(example.input_ids.tolist()) == row["text"] + EOS
        assert example.loss_mask.all()
    cut = one(row, tokenizer, text_field="text", max_length=6)
    assert tokenizer.decode(cut.input_ids.tolist()) == row["text"][:6]
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.data"):
        examples, stats = tokenize_sft([("corpus.jsonl", 0, {"prompt": "q", "response": "a"}),
                                        ("corpus.jsonl", 1, {"text": "  "})], tokenizer,
                                       SFTDataOptions(text_field="text"))
    assert not examples and stats.bad_rows == 2
    assert "corpus.jsonl row 0: field 'text' must be a non-empty string, got nothing" in caplog.text
    assert "corpus.jsonl row 1: field 'text' must be a non-empty string" in caplog.text


def test_plain_string_prompt_is_one_user_message(tokenizer):
    assert build_prompt_text("hi", tokenizer) == build_prompt_text([{"role": "user", "content": "hi"}], tokenizer)
    assert build_prompt_text("hi", tokenizer) == user_prompt("hi")


def test_custom_field_names(tokenizer):
    decoy = [{"role": "assistant", "content": "wrong"}]
    row = {"question": "q?", "answer": "a.", "target": decoy, "prompt": "not this"}
    options = dict(prompt_field="question", response_field="answer")
    assert split_text(one(row, tokenizer, **options), tokenizer) == (user_prompt("q?"), "a." + EOS)
    # A custom response field may also hold the LUFFY form (one assistant message).
    row = {"question": [{"role": "user", "content": "q?"}], "answer": [{"role": "assistant", "content": "b."}]}
    assert split_text(one(row, tokenizer, **options), tokenizer) == (user_prompt("q?"), "b." + EOS)


def test_auto_field_prefers_target_and_falls_back_per_row(tokenizer):
    # A JSON file mixing the schemas loads with both columns in every row, the absent one None.
    rows = [("mixed.jsonl", 0, {"prompt": "a", "target": [{"role": "assistant", "content": "x"}], "response": None}),
            ("mixed.jsonl", 1, {"prompt": "b", "target": None, "response": "y"}),
            ("mixed.jsonl", 2, {"prompt": "c", "target": [{"role": "assistant", "content": "z"}], "response": "no"})]
    examples, stats = tokenize_sft(rows, tokenizer, SFTDataOptions())
    assert stats.bad_rows == 0
    assert [split_text(e, tokenizer)[1] for e in examples] == ["x" + EOS, "y" + EOS, "z" + EOS]


def test_eos_token_option(tokenizer):
    example = one({"prompt": "q", "response": "a"}, tokenizer, eos_token="<|endoftext|>")
    assert int(example.input_ids[-1]) == tokenizer.convert_tokens_to_ids("<|endoftext|>") and example.loss_mask[-1]
    with pytest.raises(ValueError, match="not-a-token"):
        tokenize_sft([], tokenizer, SFTDataOptions(eos_token="not-a-token"))


def test_many_rows_keep_their_order(tokenizer):
    """More rows than one tokenisation batch: examples stay in row order."""
    rows = [("many.jsonl", i, {"prompt": f"q{i}", "response": f"a{i}"}) for i in range(700)]
    examples, stats = tokenize_sft(rows, tokenizer, SFTDataOptions())
    assert stats.rows == stats.examples == 700
    assert [split_text(e, tokenizer) for e in examples] == [(user_prompt(f"q{i}"), f"a{i}{EOS}") for i in range(700)]


def test_options_are_validated():
    for bad in (dict(overlong="cut"), dict(on_bad_row="ignore"), dict(think_prefix="drop"), dict(max_length=1),
                dict(response_end="text")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SFTDataOptions(**bad)


# ---------------------------------------------------------------------------------------------
# Over-long rows


def test_truncate_and_drop(tokenizer):
    """``response_end: eos``: a cut response loses its EOS (OpenRLHF's cut ends in one:
    tests/test_sft_end_of_turn.py)."""
    n_prompt = len(tokenizer(user_prompt("ab"), add_special_tokens=False)["input_ids"])
    digits = "0123456789"  # 10 response tokens + EOS = 11
    row = {"prompt": "ab", "response": digits}

    def run(max_length, **options):
        return tokenize_sft([("f", 0, row)], tokenizer, SFTDataOptions(max_length=max_length, response_end="eos",
                                                                       **options))

    # Exactly max_length: kept whole, EOS included.
    (example,), _ = run(n_prompt + 11)
    assert len(example.input_ids) == n_prompt + 11 and split_text(example, tokenizer)[1] == digits + EOS

    # One token too many: the response is cut from the end (the EOS goes first).
    examples, stats = run(n_prompt + 10)
    assert (stats.truncated, stats.dropped_too_long, stats.examples) == (1, 0, 1)
    assert len(examples[0].input_ids) == n_prompt + 10
    assert split_text(examples[0], tokenizer) == (user_prompt("ab"), digits)

    # Room for one response token: kept with exactly one supervised token.
    examples, stats = run(n_prompt + 1)
    assert stats.truncated == 1 and split_text(examples[0], tokenizer)[1] == "0"
    assert int(examples[0].loss_mask.sum()) == 1

    # The prompt alone fills max_length: nothing to supervise, dropped even when truncating.
    examples, stats = run(n_prompt)
    assert (stats.examples, stats.truncated, stats.dropped_too_long) == (0, 0, 1)

    # overlong="drop" drops instead of cutting.
    examples, stats = run(n_prompt + 10, overlong="drop")
    assert (stats.examples, stats.truncated, stats.dropped_too_long) == (0, 0, 1) and examples == []


def test_truncate_vs_drop_counts(tokenizer, caplog):
    n_prompt = len(tokenizer(user_prompt("ab"), add_special_tokens=False)["input_ids"])
    rows = [("f.jsonl", i, {"prompt": "ab", "response": "x" * n}) for i, n in enumerate((3, 10, 20, 30))]
    rows.append(("f.jsonl", 4, {"prompt": "ab" * 20, "response": "x"}))  # prompt alone is too long
    max_length = n_prompt + 11

    examples, stats = tokenize_sft(rows, tokenizer, SFTDataOptions(max_length=max_length))
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped_too_long, stats.bad_rows) == (5, 4, 2, 1, 0)
    assert [len(e.input_ids) for e in examples] == [n_prompt + 4, n_prompt + 11, max_length, max_length]
    assert all(len(e.input_ids) <= max_length for e in examples)

    caplog.set_level(logging.INFO, logger="sftrl_jax.data")
    examples, stats = tokenize_sft(rows, tokenizer, SFTDataOptions(max_length=max_length, overlong="drop"))
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped_too_long) == (5, 2, 0, 3)
    summary = stats.summary()
    assert "5 rows" in summary and "2 examples" in summary and "3 dropped" in summary
    assert any(summary in r.getMessage() for r in caplog.records if r.name == "sftrl_jax.data")


# ---------------------------------------------------------------------------------------------
# Bad rows

GOOD = {"prompt": "q", "response": "a"}
BAD_ROWS = {
    "prompt missing": ({"response": "a"}, "field 'prompt' missing"),
    "response missing": ({"prompt": "q"}, "field 'response' missing"),
    "target missing": ({"prompt": "q", "target": None}, "field 'target' missing"),
    "prompt wrong type": ({"prompt": 5, "response": "a"}, "field 'prompt' must be"),
    "prompt message not a dict": ({"prompt": ["q"], "response": "a"}, "field 'prompt' message 0"),
    "prompt message without content": ({"prompt": [{"role": "user"}], "response": "a"}, "field 'prompt' message 0"),
    "prompt no messages": ({"prompt": [], "response": "a"}, "field 'prompt' has no messages"),
    "prompt empty": ({"prompt": "", "response": "a"}, "field 'prompt' is empty"),
    "target two messages": ({"prompt": "q", "target": [{"role": "assistant", "content": "a"}] * 2},
                            "field 'target' must hold exactly one assistant message"),
    "target user role": ({"prompt": "q", "target": [{"role": "user", "content": "a"}]},
                         "field 'target' message has role"),
    "target content not str": ({"prompt": "q", "target": [{"role": "assistant", "content": 3}]},
                               "field 'target' message content must be a string"),
    "target wrong type": ({"prompt": "q", "target": {"role": "assistant", "content": "a"}}, "field 'target' must be"),
    "target empty": ({"prompt": "q", "target": [{"role": "assistant", "content": ""}]}, "field 'target' is empty"),
    "response wrong type": ({"prompt": "q", "response": 7}, "field 'response' must be a string"),
    "response empty": ({"prompt": "q", "response": ""}, "field 'response' is empty"),
}


def _rows_with_bad(bad: dict) -> list:
    return [("data/train.parquet", 15, GOOD), ("data/train.parquet", 16, GOOD),
            ("data/train.parquet", 17, bad), ("data/train.parquet", 18, GOOD)]


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_skip(kind, tokenizer, caplog):
    bad, problem = BAD_ROWS[kind]
    caplog.set_level(logging.WARNING, logger="sftrl_jax.data")
    examples, stats = tokenize_sft(_rows_with_bad(bad), tokenizer, SFTDataOptions(on_bad_row="skip"))
    assert (stats.rows, stats.examples, stats.bad_rows) == (4, 3, 1) and len(examples) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "sftrl_jax.data" and r.levelno == logging.WARNING]
    assert any("data/train.parquet row 17" in m and problem in m for m in warnings), warnings
    assert not any("row 15" in m or "row 16" in m or "row 18" in m for m in warnings)


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_error(kind, tokenizer):
    bad, problem = BAD_ROWS[kind]
    with pytest.raises(ValueError, match=re.escape(f"data/train.parquet row 17: {problem}")):
        tokenize_sft(_rows_with_bad(bad), tokenizer, SFTDataOptions(on_bad_row="error"))


def test_many_bad_rows_are_all_counted_but_not_all_logged(tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="sftrl_jax.data")
    rows = [("f.jsonl", i, {"prompt": "q"}) for i in range(100)] + [("f.jsonl", 100, GOOD)]
    examples, stats = tokenize_sft(rows, tokenizer, SFTDataOptions())
    assert (stats.rows, stats.examples, stats.bad_rows) == (101, 1, 100)
    messages = [r.getMessage() for r in caplog.records if r.name == "sftrl_jax.data"]
    assert 20 <= len(messages) <= 25 and "f.jsonl row 0:" in messages[0]
    assert stats.summary() in messages[-1]


def test_chat_template_refusal_is_a_bad_row(tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path, chat_template=template)))
    rows = [("f.jsonl", 0, luffy_row()), ("f.jsonl", 1, luffy_row(system=None))]
    examples, stats = tokenize_sft(rows, tokenizer, SFTDataOptions())
    assert (stats.examples, stats.bad_rows) == (1, 1)
    with pytest.raises(ValueError, match=r"f\.jsonl row 0: field 'prompt': .*no system role"):
        tokenize_sft(rows, tokenizer, SFTDataOptions(on_bad_row="error"))


# ---------------------------------------------------------------------------------------------
# System prompts and <think>


def test_remove_explicit_system_prompt(tokenizer):
    row = luffy_row(question="1+1?", system="be brief.")
    kept = split_text(one(row, tokenizer), tokenizer)[0]
    assert kept == "<|im_start|>system\nbe brief.<|im_end|>\n" + user_prompt("1+1?")
    removed = split_text(one(row, tokenizer, remove_system_prompt=True), tokenizer)[0]
    assert removed == user_prompt("1+1?")
    # A template without a default system block: a user-only prompt is left exactly as it was.
    assert build_prompt_text("hi", tokenizer, remove_system_prompt=True) == user_prompt("hi")


def test_remove_template_injected_system_prompt(qwen25_tokenizer):
    tok = qwen25_tokenizer
    injected = f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"
    assert build_prompt_text("hi", tok) == injected + user_prompt("hi")
    assert build_prompt_text("hi", tok, remove_system_prompt=True) == user_prompt("hi")

    row = luffy_row(question="1+1?", system="be brief.")
    assert build_prompt_text(row["prompt"], tok) == "<|im_start|>system\nbe brief.<|im_end|>\n" + user_prompt("1+1?")
    # The explicit system message goes, and the default the template would put in its place too.
    assert build_prompt_text(row["prompt"], tok, remove_system_prompt=True) == user_prompt("1+1?")
    example = one(row, tok, remove_system_prompt=True)
    assert split_text(example, tok) == (user_prompt("1+1?"), row["target"][0]["content"] + EOS)


def test_prompt_of_only_system_messages_is_bad_with_removal(tokenizer):
    row = {"prompt": [{"role": "system", "content": "s"}], "response": "a"}
    assert one(row, tokenizer).loss_mask.any()
    with pytest.raises(ValueError, match=r"row 0: field 'prompt': only system messages"):
        tokenize_sft([("f", 0, row)], tokenizer, SFTDataOptions(remove_system_prompt=True, on_bad_row="error"))


def test_think_prefix(tokenizer):
    answer = "<think>\nhmm.</think>\n2"
    row = {"prompt": "q", "response": answer}
    example = one(row, tokenizer, think_prefix="keep")
    assert split_text(example, tokenizer) == (user_prompt("q"), answer + EOS)
    assert int(example.input_ids[example.loss_mask][0]) == tokenizer.convert_tokens_to_ids("<think>")

    example = one(row, tokenizer, think_prefix="prompt")
    assert split_text(example, tokenizer) == (user_prompt("q") + "<think>\n", "hmm.</think>\n2" + EOS)
    assert tokenizer.convert_tokens_to_ids("<think>") not in example.input_ids[example.loss_mask].tolist()

    # "<think>" without the newline moves too; a response without it is unchanged.
    example = one({"prompt": "q", "response": "<think>x"}, tokenizer, think_prefix="prompt")
    assert split_text(example, tokenizer) == (user_prompt("q") + "<think>", "x" + EOS)
    example = one({"prompt": "q", "response": "x<think>"}, tokenizer, think_prefix="prompt")
    assert split_text(example, tokenizer) == (user_prompt("q"), "x<think>" + EOS)

    # Nothing left to supervise after the move: a bad row.
    examples, stats = tokenize_sft([("f", 0, {"prompt": "q", "response": "<think>\n"})], tokenizer,
                                   SFTDataOptions(think_prefix="prompt"))
    assert (stats.examples, stats.bad_rows) == (0, 1)


# ---------------------------------------------------------------------------------------------
# Sources


def _write_rows(tmp_path) -> dict[str, list[dict]]:
    """The same kind of rows as parquet, JSONL, a JSON list and JSON lines in a .json file."""
    luffy = [luffy_row(question=f"q{i}", answer=f"a{i}") for i in range(3)]
    plain = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(4)]
    files = {str(tmp_path / "luffy.parquet"): luffy, str(tmp_path / "plain.jsonl"): plain,
             str(tmp_path / "list.json"): plain[:2], str(tmp_path / "lines.json"): luffy[:2]}
    pd.DataFrame(luffy).to_parquet(tmp_path / "luffy.parquet")
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    (tmp_path / "list.json").write_text(json.dumps(plain[:2]))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in luffy[:2]))
    return files


def test_local_files_load_with_names_and_row_indices(tmp_path, monkeypatch):
    files = _write_rows(tmp_path)
    calls = []
    real_load = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    for path, expected in files.items():
        calls.clear()
        got = list(load_rows(path))
        assert [(name, index) for name, index, _ in got] == [(path, i) for i in range(len(expected))]
        assert [row for _, _, row in got] == expected
        builder = "parquet" if path.endswith(".parquet") else "json"
        assert len(calls) == 1 and calls[0][0] == (builder,)
        kwargs = calls[0][1]
        assert (kwargs["data_files"], kwargs["split"]) == (path, "train")
        assert "sftrl_jax-by-content" in kwargs["cache_dir"]  # the Arrow cache is keyed on the file's bytes


def test_glob_and_list_of_sources(tmp_path, tokenizer):
    for k, n in ((2, 3), (0, 2), (1, 1)):
        pd.DataFrame([{"prompt": f"f{k}q{i}", "response": f"a{i}"} for i in range(n)]).to_parquet(
            tmp_path / f"part-{k}.parquet")
    (tmp_path / "extra.jsonl").write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    got = [(Path(name).name, index) for name, index, _ in load_rows(str(tmp_path / "part-*.parquet"))]
    assert got == [("part-0.parquet", 0), ("part-0.parquet", 1), ("part-1.parquet", 0),
                   ("part-2.parquet", 0), ("part-2.parquet", 1), ("part-2.parquet", 2)]

    spec = [tmp_path / "part-1.parquet", str(tmp_path / "extra.jsonl")]
    got = [(Path(name).name, index, row["prompt"]) for name, index, row in load_rows(spec)]
    assert got == [("part-1.parquet", 0, "f1q0"), ("extra.jsonl", 0, "x")]

    examples, stats = tokenize_sft(load_rows(str(tmp_path / "*")), tokenizer, SFTDataOptions())
    assert (stats.rows, stats.examples, stats.bad_rows) == (7, 7, 0)


def test_missing_path_errors(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        list(load_rows(missing))
    empty_glob = str(tmp_path / "*.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(empty_glob)):
        list(load_rows(empty_glob))
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        list(load_rows("./no/such/dir"))


def test_unknown_extension_errors(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt,response\nq,a\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "rows.csv"))):
        list(load_rows(str(tmp_path / "rows.csv")))
    # A glob that picks up an unsupported file fails before reading anything.
    pd.DataFrame([GOOD]).to_parquet(tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"rows\.csv"):
        list(load_rows(str(tmp_path / "rows.*")))


def test_hub_id_uses_load_dataset_with_split(monkeypatch, tokenizer):
    calls = []
    rows = [luffy_row(question=f"q{i}", answer=f"a{i}") for i in range(3)]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = list(load_rows("Elliott/Openr1-Math-46k-8192"))
    assert calls == [(("Elliott/Openr1-Math-46k-8192",), {"split": "train"})]
    assert [(name, index) for name, index, _ in got] == [("Elliott/Openr1-Math-46k-8192", i) for i in range(3)]
    assert [row["target"] for _, _, row in got] == [r["target"] for r in rows]

    calls.clear()
    examples, stats = tokenize_sft(load_rows(["Elliott/Openr1-Math-48k-Complement"], split="test"), tokenizer,
                                   SFTDataOptions())
    assert calls == [(("Elliott/Openr1-Math-48k-Complement",), {"split": "test"})]
    assert stats.examples == 3


def test_tfds_needs_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails whether installed or not
    with pytest.raises(ImportError, match=re.escape("pip install 'sftrl-jax[tfds]'")):
        list(load_rows("tfds:gsm8k"))


def test_tfds_source_decodes_bytes(monkeypatch):
    loaded = []
    fake = types.ModuleType("tensorflow_datasets")
    fake.load = lambda name, split: loaded.append((name, split)) or "dataset"
    fake.as_numpy = lambda dataset: iter([{"question": b"1+1?", "answer": np.bytes_(b"2"), "id": np.int64(4),
                                           "tags": np.array([b"a", b"b"], dtype=object)}])
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    assert list(load_rows("tfds:gsm8k/test")) == [
        ("tfds:gsm8k/test", 0, {"question": "1+1?", "answer": "2", "id": 4, "tags": ["a", "b"]})]
    assert list(load_rows("tfds:gsm8k", split="train"))[0][0] == "tfds:gsm8k/train"
    assert loaded == [("gsm8k", "test"), ("gsm8k", "train")]


def test_real_luffy_prompts_render(tokenizer):
    """The real verl/LUFFY parquet: chat-message prompts with a system message load and render."""
    rows = list(load_rows(str(LUFFY_EVAL)))
    assert [index for _, index, _ in rows] == list(range(12))  # the fixture's 12 rows, in order
    for name, _, row in rows:
        assert name == str(LUFFY_EVAL) and row["prompt"][0]["role"] == "system"
        with_system = build_prompt_text(row["prompt"], tokenizer)
        without = build_prompt_text(row["prompt"], tokenizer, remove_system_prompt=True)
        assert with_system.startswith("<|im_start|>system\n") and with_system.endswith(without)
        assert without.startswith("<|im_start|>user\n") and without.endswith("<|im_start|>assistant\n")


def test_stats_summary_is_one_line():
    # distinct counts (none a substring of another), so each must appear beside its own label
    stats = SFTDataStats(rows=10, examples=7, bad_rows=3, truncated=4, dropped_too_long=5)
    summary = stats.summary()
    assert "\n" not in summary
    for phrase in ("10 rows", "7 examples", "3 bad rows", "4 truncated", "5 dropped"):
        assert re.search(rf"(?<!\d){phrase}", summary), (phrase, summary)
