"""``sftrl-jax repro coupling --quick`` on the arithmetic and CoLA-like tasks (their own file, so that the test
runner can run them beside the demo's other end-to-end runs)."""

import json

import pytest
from test_demo import _import_and_render

from sftrl_jax.cli import main
from sftrl_jax.tools import render_docs


@pytest.mark.slow
def test_repro_coupling_quick_writes_the_boundary_table(tmp_path):
    from sftrl_jax.experiments.repro_coupling import run_repro_coupling

    def reward_fn(texts, truths, tokens):  # the grading itself is tested elsewhere; skip the worker pool here
        return [float(t.rsplit("\\boxed{", 1)[-1].split("}")[0] == g) for t, g in zip(texts, truths)]

    out = tmp_path / "coupling"
    report = run_repro_coupling(out, quick=True, progress=False, reward_fn=reward_fn)
    rows = report["boundaries"]
    assert [r["kind"] for r in rows] == ["sft", "rl", "sft"]
    assert rows[0]["end_probe_sft_loss"]["mean"] < rows[0]["start_probe_sft_loss"]["mean"]  # SFT learns
    # each stage starts from the previous stage's exported weights: the boundary values agree
    assert abs(rows[1]["start_probe_sft_loss"]["mean"] - rows[0]["end_probe_sft_loss"]["mean"]) < 1e-4
    assert len(report["findings"]) == 2
    for name in ("report.md", "cross_stage.png", "boundaries.json", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert "| 2 | RL |" in (out / "report.md").read_text()
    page = _import_and_render(tmp_path, "repro-coupling", out / "report.json")
    assert "| 2 | RL |" in page and report["findings"][1] in page


def test_repro_coupling_takes_the_task_from_the_command_line(tmp_path, monkeypatch, capsys):
    from sftrl_jax.experiments import repro_coupling

    asked = []

    def fake_run(out, **options):
        asked.append(options)
        return {"findings": ["- found"], "seconds": 1.0}

    monkeypatch.setattr(repro_coupling, "run_repro_coupling", fake_run)
    assert main(["repro", "coupling", "--task", "cola", "--quick", "--out", str(tmp_path)]) == 0
    assert asked == [{"quick": True, "seeds": None, "task": "cola"}]
    assert main(["repro", "bugs", "--task", "cola", "--out", str(tmp_path)]) != 0  # only coupling has tasks
    assert "only repro coupling" in capsys.readouterr().err


@pytest.mark.slow
def test_repro_coupling_quick_runs_the_cola_task(tmp_path):
    from sftrl_jax.experiments.repro_coupling import run_repro_coupling
    from sftrl_jax.rewards.kinds import label_score

    def reward_fn(texts, truths, tokens):  # the label grader in-process (the worker pool is tested elsewhere)
        return [label_score(t, g) for t, g in zip(texts, truths)]

    out = tmp_path / "coupling_cola"
    report = run_repro_coupling(out, quick=True, progress=False, reward_fn=reward_fn, task="cola")
    assert report["findings"][1].startswith("- SFT after RL lowers the held-out reward")
    assert report["settings"]["task"] == "cola" and report["settings"]["rl"]["reward"]["kind"] == "label"
    assert [r["kind"] for r in report["boundaries"]] == ["sft", "rl", "sft"]
    assert all(-1.0 <= r["end_probe_reward"]["mean"] <= 1.0 for r in report["boundaries"])  # correct 1 / wrong -1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("probe_reward_sampled" in r for r in records)
    assert "CoLA-like" in (out / "report.md").read_text()
    page = _import_and_render(tmp_path, "repro-coupling-cola", out / "report.json")
    assert "a sampled mean@1 at temperature 1" in page and report["findings"][1] in page
    with pytest.raises(SystemExit, match="import it with --import-repro-coupling-cola"):  # not the arithmetic block
        render_docs.main(["--root", str(tmp_path / "docs_copy"), "--import-repro-coupling", str(out / "report.json"),
                          "--allow-quick"])
