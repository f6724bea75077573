"""The embedded task, and `sftrl-jax demo --quick` end to end."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from sftrl_jax.cli import main
from sftrl_jax.experiments.task import make_problem, make_splits, pretrain_corpus, trace_stats
from sftrl_jax.models import load_pretrained
from sftrl_jax.rewards import RewardPool
from sftrl_jax.tools import render_docs


def _import_and_render(tmp_path, name: str, report_json) -> str:
    """A real report.json through scripts/render_docs.py --import-NAME into a scratch page; the page."""
    root = tmp_path / "docs_copy"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text(f"<!-- results:{name}:start -->\n<!-- results:{name}:end -->\n")
    with pytest.raises(SystemExit, match="set-up check"):  # quick runs stay out of the real README
        render_docs.main(["--root", str(root), f"--import-{name}", str(report_json)])
    assert render_docs.main(["--root", str(root), f"--import-{name}", str(report_json), "--allow-quick"]) == 0
    assert render_docs.main(["--root", str(root), "--check"]) == 0
    return (root / "README.md").read_text()


def test_splits_are_disjoint_and_reference_solutions_score_1():
    splits = make_splits(1234, {"sft": 500, "rl": 300, "test": 100})
    questions = {name: {p.question for p in problems} for name, problems in splits.items()}
    assert [len(q) for q in questions.values()] == [500, 300, 100]
    assert not (questions["sft"] & questions["rl"] or questions["sft"] & questions["test"]
                or questions["rl"] & questions["test"])
    problems = [p for ps in splits.values() for p in ps]
    with RewardPool(num_workers=2) as pool:
        result = pool.score_batch([p.solution for p in problems], [str(p.answer) for p in problems],
                                  require_think=True)
    assert result.scores == [1.0] * len(problems)
    # the teacher slips (stops after two of three operations) on some problems, and only there
    slips = [p for p in problems if p.teacher_solution != p.solution]
    assert 0.1 < len(slips) / len(problems) < 0.4
    assert all(p.solution.count("\n") - p.teacher_solution.count("\n") == 1 for p in slips)
    # the steps really compute the answer
    rng = np.random.default_rng(0)
    for _ in range(50):
        problem = make_problem(rng)
        last_step = problem.solution.split("</think>")[0].strip().splitlines()[-1]
        assert eval(last_step.split("=")[0]) == problem.answer == int(last_step.split("=")[1])


def test_pretraining_corpus_teaches_facts_and_bare_answers_but_not_the_solution_format():
    held_out = make_splits(1234, {"test": 200})["test"]
    documents = pretrain_corpus(1235, 3000, {p.question for p in held_out})
    assert len(documents) == 3000 and documents == pretrain_corpus(1235, 3000, {p.question for p in held_out})
    assert not any(marker in d for d in documents for marker in ("<think>", "</think>", "\\boxed", "<|im_start|>"))
    # an excluded question is never in it: take some of its own questions and exclude them
    some = {d.split("\n")[0].split(": ", 1)[-1].split(" now?")[0] + " now?" for d in documents[:400]
            if "How many" in d}
    assert len(some) > 100
    assert not any(q in d for d in pretrain_corpus(1235, 3000, some) for q in some)
    # every fact and every bare answer is right
    facts = [f for d in documents if "How many" not in d for f in d.split()]
    assert len(facts) > 1000 and all(eval(f.rstrip(".").split("=")[0]) == int(f.rstrip(".").split("=")[1])
                                     for f in facts)
    answered = [d for d in documents if "How many" in d and not d.endswith("now?")]
    assert 0.5 < len(answered) / len(documents) < 0.7
    for document in answered[:200]:
        question = document[:document.index("now?") + 4].split(": ", 1)[-1]
        problem_answer = int("".join(c for c in document[document.index("now?"):] if c.isdigit()))
        value = None
        for clause in question.removesuffix(" now?").split(". How many")[0].split(", "):
            number = int("".join(c for c in clause if c.isdigit()))
            gain = any(word in clause for word in ("buys", "finds", "gets"))
            value = number if value is None else value + number if gain else value - number
        assert problem_answer == value, document


def test_trace_stats_counts_the_teachers_slip_and_wrong_steps():
    splits = make_splits(1234, {"test": 60})["test"]
    three = next(i for i, p in enumerate(splits) if p.solution.count("=") == 3)
    two = next(i for i, p in enumerate(splits) if p.solution.count("=") == 2)
    slip = "<think>\n" + "\n".join(splits[three].solution.split("\n")[1:3]) + "\n</think>\n\\boxed{0}"
    responses = {three: slip, two: "<think>\n2+2=5\n5-1=4\n</think>\n\\boxed{4}"}
    stats = trace_stats([splits[three], splits[two]], {0: responses[three], 1: responses[two]})
    assert stats == {"three_step_problems": 1, "stopped_after_two_steps": 1, "steps": 4, "wrong_steps": 1}
    # the reference solutions: every step right, nothing stopped early
    exact = trace_stats(splits, {i: p.solution for i, p in enumerate(splits)})
    assert exact["wrong_steps"] == exact["stopped_after_two_steps"] == 0
    assert exact["three_step_problems"] == sum(p.solution.count("=") == 3 for p in splits) > 0


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_sft_beats_base(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "demo: held-out accuracy base" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("base_accuracy", "sft_accuracy", "rl_accuracy", "num_test_problems", "seconds"):
        assert key in report
    assert report["sft_accuracy"] > report["base_accuracy"]
    for name in ("report.md", "sft_loss.png", "rl_reward.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert "| held-out accuracy" in (out / "report.md").read_text()
    answers = report["runs"][0]["answers"]
    assert set(answers) == {"sft", "rl"} and answers["sft"]["three_step_problems"] > 0
    assert "three-step problems stopped after two steps" in (out / "report.md").read_text()
    # compiled programs were cached in the report folder for the run, and the setting restored after it
    assert any((out / "xla_cache").iterdir())
    assert not jax.config.jax_compilation_cache_dir
    model, _ = load_pretrained(report["final_model"])
    # the RL stage trained: its final weights differ from the SFT model it started from, by real updates
    run = report["runs"][0]
    sft_weights = load_file(str(Path(run["sft_dir"]) / "final" / "model.safetensors"))
    rl_weights = load_file(str(Path(run["final_model"]) / "model.safetensors"))
    assert set(sft_weights) == set(rl_weights)
    assert max(float(np.abs(rl_weights[k] - sft_weights[k]).max()) for k in sft_weights) > 0
    rl_records = [json.loads(line) for line in (Path(run["rl_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rl_records if "grad_norm" in r]
    assert steps and all(r["grad_norm"] > 0 and r["response_len_mean"] > 0 for r in steps)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(report["final_model"])
    page = _import_and_render(tmp_path, "demo", out / "report.json")
    assert f"Measured with `sftrl-jax demo --quick --out {out.resolve()}`" in page and "quick mode" in page
    assert f"| mean | 0.0 % | {100 * report['sft_accuracy']:.1f} % |" in page


@pytest.mark.slow
def test_repro_bugs_quick_writes_the_staircase(tmp_path, capsys):
    out = tmp_path / "bugs"
    assert main(["repro", "bugs", "--quick", "--out", str(out)]) == 0
    assert "repro bugs: report" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]) == {"none", "openrlhf_mean_of_means", "deepspeed_offload", "both"}
    # LUFFY's layout: 8 ranks x 8 micro-steps x 1 sequence
    assert report["settings"]["sft"]["train"]["global_batch_size"] == 64
    # the DeepSpeed bug hands the optimizer (g_0 + g_7) / 8: a much smaller gradient norm
    summary = report["summary"]
    assert summary["deepspeed_offload"]["mean_grad_norm"]["mean"] < 0.5 * summary["none"]["mean_grad_norm"]["mean"]
    assert summary["both"]["mean_grad_norm"]["mean"] < 0.5 * summary["none"]["mean_grad_norm"]["mean"]
    text = (out / "report.md").read_text()
    for label in ("| correct |", "| OpenRLHF mean of means |", "| DeepSpeed offload |", "| both bugs |"):
        assert label in text
    for name in ("staircase.png", "grad_norm.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    bugs = {json.loads(line)["bug"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert len(bugs) == 4
    page = _import_and_render(tmp_path, "repro-bugs", out / "report.json")
    for label in ("| correct |", "| OpenRLHF mean of means |", "| DeepSpeed offload |", "| both bugs |"):
        assert label in page
    assert report["findings"][0] in page
