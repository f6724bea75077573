"""An RL run's validation (``validation.*``, LUFFY's trainer): the score is the mean over benchmarks of each
benchmark's mean reward, measured every ``validation.every`` steps and after the last, and the parameters
of the best score (strictly above the best so far, at a multiple of ``every``) are kept in
``output_dir/best``, also across a resume."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from sft_fixtures import make_model_dir
from sftrl_jax.config import ConfigError, load_config
from sftrl_jax.rl import RLConfig, run_rl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("module_xla_cache")]  # trains GRPO end to end


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"say {i % 10}", "answer": str(i % 2)}) + "\n")
    # two benchmarks of unequal size: "big" (3 prompts) and "small" (1 prompt)
    rows = [("big", "a"), ("big", "a"), ("big", "b"), ("small", "a")]
    with open(root / "valid.jsonl", "w") as f:
        for k, (source, truth) in enumerate(rows):
            f.write(json.dumps({"prompt": f"check {k}", "answer": f"val-{truth}", "data_source": source}) + "\n")
    return root, model_dir


class ScriptedReward:
    """Training responses score by the parity of their token ids (so groups differ and training moves the
    parameters); validation responses score by their ground truth ("val-a" 1, "val-b" 0), times the factor
    scripted for that validation (one per call)."""

    def __init__(self, factors):
        self.factors, self.calls = list(factors), 0

    def __call__(self, responses, truths, token_ids):
        if not truths[0].startswith("val-"):
            return [float(sum(ids) % 2) for ids in token_ids]
        factor = self.factors[self.calls]
        self.calls += 1
        return [factor * float(t == "val-a") for t in truths]


def _config(workdir, out, *overrides):
    root, model_dir = workdir
    return load_config(RLConfig, overrides=[
        f"model.path={model_dir}", f"data.files=[{root / 'prompts.jsonl'}]", f"output_dir={root / out}",
        "rl.prompts_per_step=4", "sampling.n=2", "rl.mini_batches_per_step=1", "train.micro_batch_size=1",
        "sampling.max_new_tokens=4", "train.seed=0", "checkpoint.save_every=1",
        f"validation.files=[{root / 'valid.jsonl'}]", "validation.every=2", "validation.sampling.max_new_tokens=4",
        *overrides])


def _validations(result):
    return {r["step"]: r for r in result.metrics if "val_score" in r}


def test_validation_scores_per_benchmark_keeps_the_best_and_resumes_against_it(workdir):
    root, _ = workdir
    config = _config(workdir, "best_run", "train.max_steps=5", "validation.at_start=true")

    def interrupt(step, _record):
        if step == 3:
            raise KeyboardInterrupt

    # validations at step 0 (at_start) and 2, then the run is interrupted after step 3
    with pytest.raises(KeyboardInterrupt):
        run_rl(config, progress=False, reward_fn=ScriptedReward([0.9, 0.8]), on_step=interrupt)
    kept = json.loads((root / "best_run" / "best" / "validation.json").read_text())
    assert kept["step"] == 2  # step 0 (before training) is not a candidate, as in LUFFY's trainer
    # resumed: step 4 scores below the kept best (not saved), step 5 is the final validation (never a candidate)
    result = run_rl(config, resume=True, progress=False, reward_fn=ScriptedReward([0.5, 1.0]))
    seen = _validations(result)  # the run's records, those before the resume included
    assert sorted(seen) == [0, 2, 4, 5]
    for step, factor in zip([0, 2, 4, 5], [0.9, 0.8, 0.5, 1.0]):
        # big: (1 + 1 + 0) / 3, small: 1; the score is their mean, not the pooled mean 3/4
        assert seen[step]["val_score"] == pytest.approx(factor * (2 / 3 + 1) / 2)
        assert seen[step]["val_score/big"] == pytest.approx(factor * 2 / 3)
        assert seen[step]["val_score/small"] == pytest.approx(factor)
    assert seen[4]["val_best_score"] == seen[5]["val_best_score"] == pytest.approx(kept["val_score"])
    best = json.loads((root / "best_run" / "best" / "validation.json").read_text())
    assert best == kept
    # the kept parameters are step 2's: they differ from the final ones (training moved them since)
    kept_weights = load_file(str(root / "best_run" / "best" / "model.safetensors"))
    final = load_file(str(root / "best_run" / "final" / "model.safetensors"))
    assert kept_weights.keys() == final.keys()
    assert any(not np.array_equal(kept_weights[k], final[k]) for k in kept_weights)
    assert not (root / "best_run" / "best.partial").exists()


def test_validation_files_without_a_usable_prompt_are_refused(workdir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "no answer here"}) + "\n")
    with pytest.raises(ValueError, match="validation.files .*empty.jsonl.*no usable prompts"):
        run_rl(_config(workdir, "refused", "train.max_steps=1", f"validation.files=[{empty}]"), progress=False,
               reward_fn=ScriptedReward([]))


def test_validation_settings_are_range_checked(workdir):
    with pytest.raises(ConfigError, match="validation.every"):
        _config(workdir, "bad", "validation.every=0")
