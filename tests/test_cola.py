"""CoLA as Paper B's task: the prepared rows feed SFT (prompt + label word) and RL (ground truth, ``reward.kind:
label``), and the Qwen3-0.6B CoLA pipelines load and run on a tiny stand-in model.

``tests/fixtures/cola/`` holds sentences written for these tests in CoLA's format (``sentence``, ``label``,
``idx``; the unlabelled file as GLUE's test split, label -1)."""

import json
from pathlib import Path

import numpy as np
import pytest

from sftrl_jax.cli import main
from sftrl_jax.config import load_config
from sftrl_jax.data.cola import QUESTION, cola_row, cola_rows, label_word
from sftrl_jax.data.prompts import PromptDataOptions, load_prompt_items
from sftrl_jax.data.sft import SFTDataOptions, tokenize_sft
from sftrl_jax.data.sources import load_rows
from sftrl_jax.pipeline import PipelineConfig, run_pipeline, stage_config
from sftrl_jax.rewards.kinds import grade, load_scorer

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

ROOT = Path(__file__).resolve().parents[1]
COLA = Path(__file__).parent / "fixtures" / "cola"


def test_a_cola_row_asks_for_the_label_word():
    row = cola_row("The cat sat on the mat.", 1, 7)
    assert row["prompt"] == [{"role": "user", "content": f"{QUESTION}\n\nSentence: The cat sat on the mat."}]
    assert row["target"] == [{"role": "assistant", "content": "acceptable"}]
    assert row["reward_model"]["ground_truth"] == "acceptable" and row["extra_info"] == {"idx": 7}
    assert label_word(0) == "unacceptable" and label_word(np.int64(1)) == "acceptable"
    for bad in (-1, 2, True, 0.5, "1", None, float("nan")):
        with pytest.raises(ValueError, match="is not 0 or 1"):
            label_word(bad)


def test_unlabelled_rows_are_skipped_and_counted():
    rows, skipped = cola_rows(str(COLA / "train.jsonl"))
    assert len(rows) == 24 and skipped == {"bad_rows": 0}
    rows, skipped = cola_rows(str(COLA / "test_unlabelled.jsonl"))
    assert rows == [] and skipped == {"bad_rows": 3}


def test_the_hub_source_names_glues_cola_config(monkeypatch):
    from sftrl_jax.data import sources

    asked = []
    rows = [{"sentence": "The cat sat.", "label": 1, "idx": 0}]
    monkeypatch.setattr(sources, "_load_dataset", lambda *args, **kwargs: asked.append((args, kwargs)) or rows)
    got, _ = cola_rows("nyu-mll/glue:cola", split="validation")
    assert asked == [(("nyu-mll/glue", "cola"), {"split": "validation"})] and len(got) == 1


def test_label_reward_reads_the_last_line():
    label = load_scorer("label")
    assert grade(label, "<think>\nThe verb agrees.\n</think>\n\nacceptable", "acceptable", False)[0] == 1.0
    assert grade(label, "Answer: Unacceptable.", "unacceptable", False)[0] == 1.0
    assert grade(label, "acceptable", "unacceptable", False)[0] == 0.0


def test_prepared_file_feeds_sft_and_rl(tmp_path, tokenizer, isolated_datasets_cache, capsys):
    out = tmp_path / "cola_train.parquet"
    assert main(["prepare", "cola", str(COLA / "train.jsonl"), "--out", str(out)]) == 0
    assert "24 rows" in capsys.readouterr().out
    examples, _ = tokenize_sft(load_rows([str(out)]), tokenizer, SFTDataOptions(max_length=256))
    assert len(examples) == 24
    supervised = tokenizer.decode(examples[0].input_ids[examples[0].loss_mask])
    assert supervised.startswith("acceptable")  # the label word, then the template's end of turn
    items, _ = load_prompt_items(PromptDataOptions(files=[str(out)]), tokenizer)
    assert [it.ground_truth for it in items[:2]] == ["acceptable", "unacceptable"]
    assert all(it.benchmark == "cola" for it in items)
    # no labelled row: refused, naming the source
    assert main(["prepare", "cola", str(COLA / "test_unlabelled.jsonl"), "--out", str(tmp_path / "x.jsonl")]) != 0


def _cola_pipeline(name, model_dir, data, out, *extra):
    return load_config(PipelineConfig, path=ROOT / "configs" / name, overrides=[
        f"model.path={model_dir}", "model.dtype=float32", "model.compute_dtype=null", "model.remat=none",
        f"output_dir={out}",
        f"sft.data.train_files=[{data['train']}]", "sft.data.max_length=256", "sft.train.global_batch_size=8",
        "sft.train.micro_batch_size=1", "sft.train.max_steps=2", "sft.checkpoint.save_every=0",
        f"rl.data.files=[{data['train']}]", "rl.rl.prompts_per_step=4", "rl.rl.mini_batches_per_step=1",
        "rl.sampling.n=2", "rl.sampling.max_new_tokens=4", "rl.sampling.batch_size=8", "rl.train.micro_batch_size=1",
        "rl.train.max_steps=2", "rl.checkpoint.save_every=0",
        f"probe.sft_files=[{data['validation']}]", f"probe.prompt_files=[{data['validation']}]", "probe.every=2",
        "probe.max_length=256", "probe.sampling.max_new_tokens=4", "probe.sampling.batch_size=8",
        "reward.num_workers=1", *extra])


@pytest.fixture(scope="module")
def cola_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cola")
    data = {}
    for split in ("train", "validation"):
        data[split] = root / f"cola_{split}.parquet"
        assert main(["prepare", "cola", str(COLA / f"{split}.jsonl"), "--out", str(data[split])]) == 0
    return data


@pytest.mark.parametrize("name, kinds", [("pipeline_qwen3-0.6b_cola_sft_rl.yaml", ["sft", "rl"]),
                                         ("pipeline_qwen3-0.6b_cola_rl_sft.yaml", ["rl", "sft"])])
def test_cola_pipeline_configs_load_with_a_label_reward_on_one_file(name, kinds):
    config = load_config(PipelineConfig, path=ROOT / "configs" / name)
    assert [s.kind for s in config.stages] == kinds
    assert config.reward.kind == "label" and (config.reward.correct, config.reward.wrong) == (1.0, -1.0)
    sft, rl = (stage_config(config, kinds.index(kind), config.model.path) for kind in ("sft", "rl"))
    assert sft.data.train_files == rl.data.files  # the same data for both stages
    assert config.probe.prompt_files == config.probe.sft_files  # the validation split
    assert config.probe.sampled_temperature is not None


@pytest.mark.slow
def test_cola_pipeline_runs_end_to_end_on_a_tiny_model(hf_checkpoint, tmp_path, cola_data):
    from sft_fixtures import make_model_dir

    model_dir = make_model_dir(hf_checkpoint("qwen3_headdim"), tmp_path / "model")
    config = _cola_pipeline("pipeline_qwen3-0.6b_cola_sft_rl.yaml", model_dir, cola_data, tmp_path / "run")
    summary = run_pipeline(config, progress=False)
    probes = [r for r in summary["metrics"] if "probe_reward" in r]
    assert probes and all({"probe_sft_loss", "probe_reward", "probe_reward_sampled"} <= set(r) for r in probes)
    # rewards on the correct 1 / wrong -1 scale
    assert all(-1.0 <= r["probe_reward"] <= 1.0 for r in probes)
    table = json.loads((Path(config.output_dir) / "boundaries.json").read_text())
    assert [row["kind"] for row in table] == ["sft", "rl"]


def test_the_embedded_cola_task_follows_its_rule():
    from sftrl_jax.experiments import cola_task

    splits = cola_task.make_splits(0, {"sft": 400, "probe": 100})
    sentences = [j.question for split in splits.values() for j in split]
    assert len(set(sentences)) == 500  # disjoint, no repeats
    for j in splits["sft"]:
        order_broken = "order: subject object verb" in j.solution
        agreement_broken = "agreement: no" in j.solution
        assert j.answer == ("unacceptable" if order_broken or agreement_broken else "acceptable")
        assert j.solution.endswith("\n" + j.answer)
        if j.teacher_solution != j.solution:  # the skip: no order line, a verdict from agreement alone
            assert "order:" not in j.teacher_solution
            assert j.teacher_solution.endswith("\nunacceptable" if agreement_broken else "\nacceptable")
    # the teacher is wrong exactly on the skipped word-order violations: about 1/4 x 1/2 of the sentences
    assert 0.82 < cola_task.teacher_accuracy(splits["sft"]) < 0.93
    row = cola_task.sft_row(splits["sft"][0])
    assert row["reward_model"]["ground_truth"] == splits["sft"][0].answer
