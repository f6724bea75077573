"""sftrl_jax.tools.render_docs (scripts/render_docs.py): the generated blocks of README.md and docs/*.md come
from docs/results/."""

import json
import shutil
from pathlib import Path

import pytest

from sftrl_jax.tools import render_docs

ROOT = Path(__file__).parents[1]


def _provenance(report: dict, kind: str, command: str) -> dict:
    return {"kind": kind, "command": command, "date": "2026-01-02", "imported": "2026-01-03",
            "source": "runs/x/report.json", "version": "0.1.0", "commit": "abc123",
            "machine": {"cpu": "Test CPU", "cpu_count": 4, "memory_gib": 16.0, "python": "3.11.0",
                        "packages": {"jax": "0.1", "jaxlib": "0.1"}},
            "report": report}


def _answers(stopped, three, wrong, steps):
    return {"stopped_after_two_steps": stopped, "three_step_problems": three, "wrong_steps": wrong, "steps": steps}


DEMO = {
    "base_accuracy": 0.0, "sft_accuracy": 0.5, "rl_accuracy": 0.75, "seed_spread_std": 0.05,
    "margin_sft_over_base": 0.5, "margin_rl_over_sft": 0.25, "accepted": True, "teacher_accuracy_on_sft_data": 0.8,
    "num_test_problems": 40, "seeds": [0, 1], "seconds": 123.4, "quick": False,
    "runs": [{"seed": 0, "sft_accuracy": 0.45, "rl_accuracy": 0.725,
              "answers": {"sft": _answers(9, 20, 1, 90), "rl": _answers(0, 20, 3, 100)}},
             {"seed": 1, "sft_accuracy": 0.55, "rl_accuracy": 0.775,
              "answers": {"sft": _answers(8, 20, 2, 91), "rl": _answers(1, 20, 4, 99)}}],
    "settings": {"seeds": [0, 1]},
}
BUGS = {
    "settings": {"seeds": [0, 1], "ranks": 8, "splits": {"test": 30, "heldout": 16},
                 "sft": {"train": {"max_steps": 12, "global_batch_size": 64}}},
    "seeds": [0, 1], "labels": {"none": "correct", "deepspeed_offload": "DeepSpeed offload"},
    "summary": {bug: {key: {"mean": m, "std": 0.01} for key, m in
                      (("accuracy", acc), ("heldout_loss", 0.5), ("final_train_loss", 0.4), ("mean_grad_norm", 1.0))}
                for bug, acc in (("none", 0.123), ("deepspeed_offload", 0.064))},
    "findings": ["- DeepSpeed offload: accuracy -5.9 points vs correct (spread 1.0 points): worse."],
    "seconds": 50.0, "quick": False,
}
COUPLING = {
    "settings": {"seeds": [0], "probe_every": 5, "splits": {"heldout": 8, "probe": 4}}, "seeds": [0],
    "boundaries": [{"stage": i + 1, "kind": kind, "steps": 10,
                    **{f"{when}_{key}": {"mean": v, "std": 0.0, "per_seed": [v]}
                       for when, key, v in (("start", "probe_sft_loss", 1.0 + i), ("end", "probe_sft_loss", 2.0 + i),
                                            ("start", "probe_reward", 0.1 * i),
                                            ("end", "probe_reward", 0.1 * i + 0.05))}}
                   for i, kind in enumerate(["sft", "rl", "sft"])],
    "findings": ["- RL after SFT raises the held-out SFT loss: reproduced (1/1 seeds)."],
    "seconds": 20.0, "quick": False,
}
PAGE = """# A page

intro
<!-- results:demo:start -->
hand-edited, to be replaced
<!-- results:demo:end -->
middle
<!-- results:repro-bugs:start -->
<!-- results:repro-bugs:end -->
<!-- results:repro-coupling:start -->
<!-- results:repro-coupling:end -->
end
"""


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "docs" / "results"
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps(_provenance(DEMO, "demo", "sftrl-jax demo")))
    (out / "repro_bugs.json").write_text(json.dumps(_provenance(BUGS, "repro-bugs", "sftrl-jax repro bugs")))
    return out


def test_renders_blocks_from_result_files_and_says_what_is_missing(results):
    rendered = render_docs.render_text(PAGE, results)
    assert "hand-edited" not in rendered
    assert rendered.startswith("# A page\n\nintro\n<!-- results:demo:start -->\n"
                               "Measured with `sftrl-jax demo` on 2026-01-02")
    assert "middle\n<!-- results:repro-bugs:start -->\n" in rendered and rendered.endswith("end\n")
    # the demo table, margins and verdict come from the report
    assert "| held-out accuracy (40 problems) | base | SFT | SFT→RL |" in rendered
    assert ("| seed 0 | 0.0 % | 45.0 % | 72.5 % |\n| seed 1 | 0.0 % | 55.0 % | 77.5 % |\n"
            "| mean | 0.0 % | 50.0 % | 75.0 % |") in rendered
    assert "SFT→RL − SFT = 25.0 points (per seed: +27.5, +22.5)" in rendered and "**PASSED**" in rendered
    assert "| 1 | SFT→RL | 1 / 20 | 4 / 99 |" in rendered
    assert "4 CPU cores (Test CPU)" in rendered and "commit abc123" in rendered and "123 s wall" in rendered
    # repro bugs: the report's labels, mean ± std, and its findings verbatim
    assert "| correct | 12.3 ± 1.0 | 0.500 ± 0.010 | 0.400 ± 0.010 | 1.00 ± 0.01 |" in rendered
    assert "| DeepSpeed offload | 6.4 ± 1.0 |" in rendered
    assert BUGS["findings"][0] in rendered
    # no repro_coupling.json: the block names the commands instead of figures
    assert ("<!-- results:repro-coupling:start -->\n*Not yet measured with this version: run `sftrl-jax repro "
            "coupling`, then `python scripts/render_docs.py --import-repro-coupling "
            "runs/repro_coupling/report.json`.*\n"
            "<!-- results:repro-coupling:end -->") in rendered
    # deterministic, and rendering a rendered page changes nothing
    assert render_docs.render_text(rendered, results) == rendered == render_docs.render_text(PAGE, results)

    (results / "repro_coupling.json").write_text(
        json.dumps(_provenance(COUPLING, "repro-coupling", "sftrl-jax repro coupling --seeds 0")))
    rendered = render_docs.render_text(PAGE, results)
    assert "| 2 | RL | 10 | 2.000 → **3.000** ± 0.000 | 0.100 → 0.150 ± 0.000 |" in rendered
    assert "| 3 | SFT | 10 | 3.000 → 4.000 ± 0.000 | 0.200 → **0.250** ± 0.000 |" in rendered
    assert COUPLING["findings"][0] in rendered


def test_bad_markers_are_refused(results):
    with pytest.raises(SystemExit, match="unknown results block"):
        render_docs.render_text("<!-- results:nope:start -->\n<!-- results:nope:end -->\n", results)
    with pytest.raises(SystemExit, match="without its end marker"):
        render_docs.render_text("<!-- results:demo:start -->\nno end\n", results)


def test_import_records_provenance_refuses_quick_runs_and_renders(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text(PAGE)
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(DEMO))
    monkeypatch.chdir(tmp_path)
    assert render_docs.main(["--root", str(root), "--import-demo", "runs/demo/report.json",
                             "--machine", "a test box"]) == 0
    result = json.loads((root / "docs" / "results" / "demo.json").read_text())
    assert result["report"] == DEMO and result["command"] == "sftrl-jax demo"  # default seeds and folder
    assert result["machine"]["description"] == "a test box" and result["date"] and result["source"]
    readme = (root / "README.md").read_text()
    assert "Measured with `sftrl-jax demo` on" in readme and "a test box" in readme
    assert render_docs.main(["--root", str(root), "--check"]) == 0
    (root / "README.md").write_text(readme.replace("| mean | 0.0 % | 50.0 % |", "| mean | 0.0 % | 51.0 % |"))
    assert render_docs.main(["--root", str(root), "--check"]) == 1  # a hand edit of a rendered block fails

    quick = dict(DEMO, quick=True, seeds=[3])
    (run_dir / "report.json").write_text(json.dumps(quick))
    with pytest.raises(SystemExit, match="set-up check"):
        render_docs.main(["--root", str(root), "--import-demo", "runs/demo/report.json"])
    render_docs.main(["--root", str(root), "--import-demo", "runs/demo/report.json", "--allow-quick"])
    result = json.loads((root / "docs" / "results" / "demo.json").read_text())
    assert result["command"] == "sftrl-jax demo --quick --seeds 3"
    assert "quick mode" in (root / "README.md").read_text()
    with pytest.raises(SystemExit, match="not a `sftrl-jax repro bugs` report"):
        render_docs.main(["--root", str(root), "--import-repro-bugs", "runs/demo/report.json"])


def test_readme_and_docs_are_up_to_date_with_docs_results(tmp_path):
    """A hand edit of a rendered block (or a result file without its rendering) fails here."""
    assert render_docs.stale_docs(ROOT) == [], "run: python scripts/render_docs.py"
    # every page with a results block is one the renderer looks at, and the compile table is among them
    pages = {p.name: p.read_text() for p in render_docs.doc_paths(ROOT)}
    assert "<!-- results:demo:start -->" in pages["README.md"]
    assert "<!-- compile-table:start -->" in pages["scaling.md"]
    # the check itself: a copy with one rendered cell changed is reported stale
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "README.md", copy / "README.md")
    text = (copy / "docs" / "scaling.md").read_text()
    start = text.index("<!-- compile-table:start -->")
    row = text.index("| yes (", start)
    (copy / "docs" / "scaling.md").write_text(text[:row] + "| no (" + text[row + len("| yes ("):])
    assert render_docs.stale_docs(copy) == [copy / "docs" / "scaling.md"]
