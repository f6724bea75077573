"""One LUFFY-format parquet file serves both stages (Paper B's "same data set for both stages" option):
SFT reads ``prompt`` + ``target``, RL reads ``prompt`` + ``reward_model.ground_truth``; and LUFFY's
``<think>`` handling (its SFT preparation strips the targets' leading ``<think>\\n``; the chat template
of Qwen2.5-Math-7B-16k-think opens the block) is ``data.think_prefix: prompt``."""

from pathlib import Path

import numpy as np
import pytest
import transformers

from hf_checkpoints import CHAT_TEMPLATE, make_tokenizer
from sft_fixtures import luffy_rows, write_parquet
from sftrl_jax.config import load_config
from sftrl_jax.data.prompts import PromptDataOptions, load_prompt_items
from sftrl_jax.data.sft import SFTDataOptions, tokenize_sft
from sftrl_jax.pipeline import PipelineConfig, stage_config
from sftrl_jax.sft import SFTConfig
from sftrl_jax.sft.trainer import load_examples

ROOT = Path(__file__).resolve().parents[1]
# the test template with the generation prompt opening the think block, as LUFFY's 16k-think model's does
THINK_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                        "<|im_start|>assistant\n<think>\n{% endif %}")


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


def test_one_luffy_parquet_feeds_sft_and_rl(tmp_path, tokenizer, isolated_datasets_cache):
    rows = luffy_rows(12, seed=1)
    data = write_parquet(rows, tmp_path / "openr1.parquet")

    sft = load_config(SFTConfig, overrides=[f"model.path={tmp_path}", f"data.train_files=[{data}]",
                                            "data.max_length=512", "data.shuffle=false"])
    train, held_out = load_examples(sft, tokenizer)
    assert len(train) == len(rows) and held_out == []
    for example, row in zip(train, rows):  # the response is the target's assistant message, then EOS
        response = _decode(tokenizer, example.input_ids[example.loss_mask])
        assert response == row["target"][0]["content"] + tokenizer.eos_token
        assert _decode(tokenizer, example.input_ids[~example.loss_mask]).endswith(
            row["prompt"][0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")

    items, skipped = load_prompt_items(PromptDataOptions(files=[str(data)], max_prompt_length=256), tokenizer)
    assert skipped == {"bad_rows": 0, "prompt_too_long": 0}
    assert [item.ground_truth for item in items] == [row["reward_model"]["ground_truth"] for row in rows]
    assert all(item.prompt_text.endswith(row["prompt"][0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
               for item, row in zip(items, rows))


@pytest.mark.parametrize("name", ["pipeline_qwen3-0.6b_sft_rl.yaml", "pipeline_qwen3-0.6b_rl_sft.yaml"])
def test_pipeline_configs_take_one_file_for_both_stages(name):
    config = load_config(PipelineConfig, ROOT / "configs" / name, [
        "model.path=/m", "sft.data.train_files=[data/openr1.parquet]", "rl.data.files=[data/openr1.parquet]"])
    stages = {config.stages[i].kind: stage_config(config, i, "/m") for i in range(len(config.stages))}
    assert stages["sft"].data.train_files == stages["rl"].data.files == ["data/openr1.parquet"]
    # Paper B's reward scale (ours: correct 1 / wrong -1), for the RL stage and the probe alike
    assert (config.reward.correct, config.reward.wrong) == (1.0, -1.0)
    assert (stages["rl"].reward.correct, stages["rl"].reward.wrong) == (1.0, -1.0)
    # the probe's held-out SFT file is carved out of the SFT stage's training file by `sftrl-jax split`
    text = (ROOT / "configs" / name).read_text()
    assert "sftrl-jax split" in text and all(f in text for f in config.probe.sft_files)


def test_think_prefix_prompt_is_luffys_preparation(tmp_path):
    """LUFFY's prepare_sft.py drops ``target[0].content[len("<think>\\n"):]`` and lets the template open the
    block: with such a template, ``prompt`` mode gives exactly that text; without one, the marker moves to
    the prompt, so the model is conditioned on the same tokens."""
    luffy_tok = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "t", THINK_TEMPLATE)))
    row = luffy_rows(3, seed=2)[2]
    content = row["target"][0]["content"]
    assert content.startswith("<think>\n")
    luffy_prompt = luffy_tok.apply_chat_template(list(row["prompt"]), tokenize=False, add_generation_prompt=True)
    assert luffy_prompt.endswith("<|im_start|>assistant\n<think>\n")

    (example,), _ = tokenize_sft([("f", 0, row)], luffy_tok, SFTDataOptions(think_prefix="prompt"))
    prompt = _decode(luffy_tok, example.input_ids[~example.loss_mask])
    response = _decode(luffy_tok, example.input_ids[example.loss_mask])
    assert (prompt, response) == (luffy_prompt, content[len("<think>\n"):] + luffy_tok.eos_token)
    assert prompt.count("<think>") == 1  # not opened twice

    # "keep" on that template: with response_end openrlhf (the default) the response is what the template renders
    # after its own "<think>\n", so the same example; with "eos" it supervises a second <think>
    (kept,), _ = tokenize_sft([("f", 0, row)], luffy_tok, SFTDataOptions(think_prefix="keep"))
    assert np.array_equal(kept.input_ids, example.input_ids) and np.array_equal(kept.loss_mask, example.loss_mask)
    (kept,), _ = tokenize_sft([("f", 0, row)], luffy_tok, SFTDataOptions(think_prefix="keep", response_end="eos"))
    assert _decode(luffy_tok, kept.input_ids).count("<think>") == 2

    # a template that does not open the block: the model is still conditioned on "<think>\n"
    plain_tok = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "p")))
    (plain,), _ = tokenize_sft([("f", 0, row)], plain_tok, SFTDataOptions(think_prefix="prompt"))
    assert np.array_equal(plain.input_ids, example.input_ids) and np.array_equal(plain.loss_mask, example.loss_mask)
