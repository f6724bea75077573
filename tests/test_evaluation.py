"""The evaluation harness: the real benchmark files, a perfect fake model, resume, metrics."""

import json
from pathlib import Path

import pandas as pd
import pytest

from sft_fixtures import make_model_dir
from sftrl_jax.cli import main
from sftrl_jax.config import load_config
from sftrl_jax.evaluation import Completion, EvalConfig, pass_at_k, run_eval, summarize

# A few rows per benchmark of ../shared/data/luffy-eval (tests/fixtures/luffy-eval/README.md)
LUFFY = Path(__file__).parent / "fixtures" / "luffy-eval"


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory):
    return make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path_factory.mktemp("eval") / "model")


def perfect(items, n):
    """A fake model that writes the ground truth in the reference recipe's answer format."""
    out = []
    for item in items:
        multiple_choice = item.benchmark in ("gpqa", "arc_c")
        answer = f"ANSWER: {item.ground_truth}" if multiple_choice else f"The answer is \\boxed{{{item.ground_truth}}}."
        out += [Completion(f"<think>\nworking</think>\n{answer}", 12, False)] * n
    return out


def test_cli_eval_on_the_real_benchmark_files(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--config", str(Path(__file__).parents[1] / "configs" / "eval_luffy.yaml"),
                 f"model.path={model_dir}", "model.dtype=float32", f"data.files=[{LUFFY / 'valid.parquet'}]",
                 "data.limit_per_benchmark=2", "data.remove_system_prompt=true", "data.max_prompt_length=2048",
                 "sampling.max_new_tokens=6", "sampling.batch_size=16", "sampling.engine=paged", "reward.num_workers=1",
                 f"output_dir={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "math average" in printed and "results.json" in printed
    assert "grader: reward.kind=luffy_eval" in printed  # the table names the grader LUFFY's table was scored by
    results = json.loads((out / "results.json").read_text())
    assert results["grader"] == "luffy_eval"
    assert set(results["benchmarks"]) == {"aime", "amc", "math", "minerva", "olympiad_bench"}
    for metrics in results["benchmarks"].values():
        assert metrics["prompts"] == 2 and metrics["truncated_share"] == 1.0  # 6 random tokens never stop
        assert metrics["mean_response_tokens"] == 6
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 10
    assert {"prompt_id", "benchmark", "response", "extracted_answer", "score"} <= set(records[0])
    assert (out / "accuracy.png").stat().st_size > 0
    # the generation's figures, from the engine the settings chose
    generation = results["generation"]
    assert generation["useful_tokens_per_s"] > 0 and 0 < generation["slot_utilisation"] <= 1
    assert generation["max_pages_in_use"] > 0 and "generation (paged engine)" in printed


def test_a_model_that_writes_the_ground_truth_scores_100_percent_on_every_benchmark(model_dir, tmp_path):
    files = [LUFFY / "valid.parquet", LUFFY / "valid.gpqa.parquet", LUFFY / "valid.arc_c.parquet"]
    config = load_config(EvalConfig, overrides=[
        f"model.path={model_dir}", f"data.files=[{','.join(map(str, files))}]", "data.max_prompt_length=100000",
        "reward.require_think=true", "reward.num_workers=2", "chunk_size=4096", f"output_dir={tmp_path}"])
    results = run_eval(config, generator=perfect, progress=False)
    assert set(results["benchmarks"]) == {"aime", "amc", "math", "minerva", "olympiad_bench", "gpqa", "arc_c"}
    assert sum(m["prompts"] for m in results["benchmarks"].values()) == 38 + 4 + 4  # the fixture's rows
    for name, metrics in results["benchmarks"].items():
        assert metrics["accuracy"] == 1.0, name
    assert results["math_average"] == 1.0


def _plain_jsonl(path, rows=20):
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"what is {i}+1?", "answer": str(i + 1)}) + "\n")
    return path


def test_interrupted_evaluation_resumes_without_regenerating(model_dir, tmp_path):
    data = _plain_jsonl(tmp_path / "plain.jsonl")
    settings = [f"model.path={model_dir}", f"data.files=[{data}]", "chunk_size=6", "sampling.n=2",
                "reward.num_workers=1"]
    expected = run_eval(load_config(EvalConfig, overrides=settings + [f"output_dir={tmp_path / 'full'}"]),
                        generator=perfect, progress=False)

    calls = []

    def flaky(items, n):
        calls.append([item.prompt_id for item in items])
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return perfect(items, n)

    config = load_config(EvalConfig, overrides=settings + [f"output_dir={tmp_path / 'resumed'}"])
    with pytest.raises(KeyboardInterrupt):
        run_eval(config, generator=flaky, progress=False)
    assert len((tmp_path / "resumed" / "generations.jsonl").read_text().splitlines()) == 2 * 12
    calls.clear()
    resumed = run_eval(config, generator=flaky, progress=False)
    assert calls == [[12, 13, 14, 15, 16, 17], [18, 19]]  # only what was missing
    assert resumed == expected
    assert json.loads((tmp_path / "resumed" / "results.json").read_text()) == \
        json.loads((tmp_path / "full" / "results.json").read_text())
    assert expected["benchmarks"]["plain"]["pass@2"] == 1.0


def test_bad_rows_are_skipped_with_file_and_row(model_dir, tmp_path, caplog):
    path = tmp_path / "mixed.parquet"
    pd.DataFrame([{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": None},
                  {"prompt": None, "answer": "5"}]).to_parquet(path)
    config = load_config(EvalConfig, overrides=[f"model.path={model_dir}", f"data.files=[{path}]",
                                                f"output_dir={tmp_path / 'out'}", "reward.num_workers=1"])
    results = run_eval(config, generator=perfect, progress=False)
    assert results["skipped"]["bad_rows"] == 2
    assert f"{path} row 1" in caplog.text and f"{path} row 2" in caplog.text
    assert results["benchmarks"]["mixed"]["accuracy"] == 1.0


def test_pass_at_k_and_summary_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    records = [{"prompt_id": p, "benchmark": b, "score": s, "num_tokens": 10, "truncated": t, "timed_out": False}
               for p, b, s, t in [(0, "math", 1.0, False), (0, "math", 0.0, True), (1, "math", 0.0, False),
                                  (1, "math", 0.0, False), (2, "aime", 1.0, False), (2, "aime", 1.0, False)]]
    summary = summarize(records, ["math", "aime", "amc"])
    assert summary["benchmarks"]["math"]["accuracy"] == 0.25
    assert summary["benchmarks"]["math"]["pass@2"] == 0.5
    assert summary["benchmarks"]["math"]["truncated_share"] == 0.25
    assert summary["math_average"] == pytest.approx((0.25 + 1.0) / 2)  # unweighted over present benchmarks
    assert summary["math_benchmarks"] == ["math", "aime"]


def test_math_verify_grades_the_real_ground_truths(tmp_path):
    """Every benchmark's ground truth wrapped in an extra brace group (so the exact-string shortcut does
    not apply and math-verify must parse both sides) is graded correct, bar three known misses."""
    from sftrl_jax.rewards import RewardPool

    # The fixture's ground truths that math-verify does not match in this form (a tuple, a \text{} name, a
    # Python expression; math-verify 0.9.0); any other miss is a regression.
    known_misses = {r"\left( 3, \frac{\pi}{2} \right)", r"\text{Evelyn}", "np.arcsin(10/13)"}
    rows = pd.read_parquet(LUFFY / "valid.parquet")
    assert set(rows["data_source"]) == {"aime", "amc", "math", "minerva", "olympiad_bench"}
    truths = [r["ground_truth"] for r in rows["reward_model"]]
    with RewardPool(num_workers=2, timeout_s=10) as pool:
        result = pool.score_batch([f"so \\boxed{{{{{t}}}}}" for t in truths], truths)
    misses = {t for t, s in zip(truths, result.scores) if s < 1}
    assert misses <= known_misses, misses - known_misses
