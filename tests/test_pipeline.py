"""The stage pipeline: SFT→RL→SFT end to end, resume inside the RL stage, cross-stage outputs."""

import json
from pathlib import Path

import pytest

from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax.config import ConfigError, load_config
from sftrl_jax.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

CONFIGS = Path(__file__).parents[1] / "configs"


def contains_seven(responses, truths, token_ids):  # a reward random responses often vary on
    return [float(7 in ids or ids[0] % 2 == 0) for ids in token_ids]


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    write_parquet(luffy_rows(24, seed=5), root / "sft.parquet")
    write_parquet(luffy_rows(8, seed=6), root / "heldout.parquet")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"say {i}", "answer": "7"}) + "\n")
    return root, model_dir


def _config(workdir, out):
    root, model_dir = workdir
    return load_config(PipelineConfig, overrides=[
        f"model.path={model_dir}", f"output_dir={root / out}",
        "stages=[{kind: sft}, {kind: rl}, {kind: sft, settings: {train: {max_steps: 2}}}]",
        f"sft={{data: {{train_files: [{root / 'sft.parquet'}], max_length: 256}}, "
        "train: {global_batch_size: 8, max_steps: 3}, optimizer: {learning_rate: 1.0e-3}, "
        "checkpoint: {save_every: 1}}",
        f"rl={{data: {{files: [{root / 'prompts.jsonl'}]}}, rl: {{prompts_per_step: 4, mini_batches_per_step: 1}}, "
        "sampling: {n: 2, max_new_tokens: 4}, train: {max_steps: 4}, optimizer: {learning_rate: 1.0e-2}, "
        "checkpoint: {save_every: 1}}",
        f"probe={{every: 2, sft_files: [{root / 'heldout.parquet'}], max_length: 256, "
        f"prompt_files: [{root / 'prompts.jsonl'}], prompt_limit: 8, sampling: {{max_new_tokens: 4}}}}"])


@pytest.mark.slow
def test_sft_rl_sft_pipeline_resumes_inside_the_rl_stage(workdir):
    config = _config(workdir, "run")

    def kill_in_rl(stage, step, _):
        if stage == 1 and step == 3:
            raise KeyboardInterrupt("simulated kill inside the RL stage")

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, reward_fn=contains_seven, progress=False, on_step=kill_in_rl)
    out = Path(config.output_dir)
    assert json.loads((out / "pipeline_state.json").read_text())["completed"] == [0]
    with pytest.raises(FileExistsError, match="--resume"):
        run_pipeline(config, reward_fn=contains_seven, progress=False)

    resumed_at = []
    summary = run_pipeline(config, resume=True, reward_fn=contains_seven, progress=False,
                           on_step=lambda stage, step, _: resumed_at.append((stage, step)))
    # killed after RL step 3 was checkpointed: the RL stage continues at step 4, SFT stage 1 is not redone
    assert resumed_at[0] == (1, 4)
    assert [row["steps"] for row in summary["stages"]] == [3, 4, 2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "probe_sft_loss" in r]
    # measured at the start and end of every stage and every 2 steps in between, on one global axis
    assert [(r["stage"], r["step"]) for r in probes] == [(1, 0), (1, 2), (1, 3), (2, 0), (2, 2), (2, 4),
                                                         (3, 0), (3, 2)]
    assert all("probe_reward" in r for r in probes)
    assert [r["global_step"] for r in probes] == [0, 2, 3, 3, 5, 7, 7, 9]
    boundaries = json.loads((out / "boundaries.json").read_text())
    assert [b["kind"] for b in boundaries] == ["sft", "rl", "sft"]
    assert boundaries[1]["start"]["probe_sft_loss"] == pytest.approx(boundaries[0]["end"]["probe_sft_loss"])
    rl_probes = [r["probe_sft_loss"] for r in probes if r["stage"] == 2]
    assert rl_probes[0] != rl_probes[-1]  # the RL stage really moved the policy
    assert (out / "cross_stage.png").stat().st_size > 0
    assert (out / "stage3_sft" / "final" / "config.json").exists()


def test_stage_config_errors_name_the_stage(workdir):
    config = _config(workdir, "bad")
    config.stages[1].settings = {"rl": {"group_sise": 4}}
    with pytest.raises(ConfigError, match=r"stage 2 \(rl\): unknown config key 'rl.group_sise'"):
        run_pipeline(config, progress=False)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    from sftrl_jax.config import config_kind
    from sftrl_jax.kinds import config_class

    cls = config_class(config_kind(path))
    config = load_config(cls, path, ["model.path=/models/any"])
    if cls is PipelineConfig:
        from sftrl_jax.pipeline import stage_config

        for index in range(len(config.stages)):
            stage_config(config, index, "/models/any")
