"""The pipeline's cross-stage probe cannot be degenerate: its reward set is the distinct (prompt, ground truth)
pairs of its file, a file of repeats is refused by name, and a sampled mean@1 is measured beside the greedy one."""

import json

import pytest
from flax import nnx

from sft_fixtures import make_model_dir
from sftrl_jax.config import RewardOptions, SamplingOptions
from sftrl_jax.models import load_pretrained, load_tokenizer
from sftrl_jax.probe import CrossStageProbe, ProbeOptions
from sftrl_jax.sharding import make_mesh


def _write(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    return path


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory):
    return make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path_factory.mktemp("probe") / "model")


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, texts, truths, token_ids):
        self.calls.append(list(truths))
        return [float(t == "1") for t in truths]


def _probe(model_dir, files, **options):
    sampling = SamplingOptions(temperature=0.0, max_new_tokens=3, batch_size=8)
    recorder = Recorder()
    probe = CrossStageProbe(ProbeOptions(prompt_files=[str(f) for f in files], sampling=sampling, **options),
                            tokenizer=load_tokenizer(model_dir), mesh=make_mesh({"fsdp": -1}),
                            reward=RewardOptions(), reward_fn=recorder)
    return probe, recorder


@pytest.mark.slow  # samples with the tiny model on 8 devices
def test_the_reward_set_is_the_distinct_pairs(model_dir, tmp_path, caplog):
    # 6 rows: "a" with truth 1 three times (one problem), "b" with truths 0 and 1 (two problems), "c"
    pairs = [("say a", "1"), ("say a", "1"), ("say b", "0"), ("say a", "1"), ("say b", "1"), ("say c", "0")]
    data = _write(tmp_path / "probe.jsonl", pairs)
    with caplog.at_level("INFO", logger="sftrl_jax.probe"):
        probe, recorder = _probe(model_dir, [data], sampled_temperature=1.0)
    assert [(it.prompt_text.count("say a"), it.ground_truth) for it in probe.reward.items] == \
        [(1, "1"), (0, "0"), (0, "1"), (0, "0")]
    assert "4 distinct (prompt, ground truth) pairs of 6 rows" in caplog.text
    model, _ = load_pretrained(model_dir, mesh=make_mesh({"fsdp": -1}))
    out = probe.measure(nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model)))
    probe.close()
    # greedy and sampled, one response per distinct pair each: half of the truths are "1"
    assert out["probe_reward"] == pytest.approx(0.5) and out["probe_reward_sampled"] == pytest.approx(0.5)
    assert recorder.calls == [["1", "0", "1", "0"]] * 2


def test_a_probe_file_of_repeats_is_refused_by_name(model_dir, tmp_path):
    # 30 problems repeated 8 times each (AIME-style rows): 30 distinct of 240
    data = _write(tmp_path / "repeats.jsonl", [(f"say {i % 30}", str(i % 2)) for i in range(240)])
    with pytest.raises(ValueError, match=r"probe.prompt_files \(.*repeats.jsonl\): only 30 of 240 rows are distinct"):
        _probe(model_dir, [data])
    # the share is a setting: a probe that wants the repeats anyway says so
    probe, _ = _probe(model_dir, [data], min_distinct_share=0.1)
    assert len(probe.reward.items) == 30
