"""``sftrl-jax repro mixed --quick``: the seven methods of Paper A's head-to-head from the pretrained base (its own
file, so that the test runner can run it beside the demo's other end-to-end runs)."""

from __future__ import annotations

import json

import pytest
from test_demo import _import_and_render

from sftrl_jax.cli import main
from sftrl_jax.tools import render_docs


@pytest.mark.slow
def test_repro_mixed_quick_compares_the_methods_at_matched_flops(tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(["repro", "mixed", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert {"base_accuracy", "seeds", "methods", "verdicts"} <= set(report) and report["base"] == "pretrained"
    methods = report["methods"]
    assert set(methods) == {"sft_then_rl", "sft_buggy_then_rl", "sft_both_bugs_then_rl", "luffy", "chord", "zero_rl",
                            "sft_then_rl_truncated"}
    for name, row in methods.items():
        assert len(row["per_seed"]) == 1 and 0.0 <= row["accuracy"] <= 1.0 and row["flops"] > 0, name
        assert row["curve_per_seed"][0], name  # validations during the RL stage: the accuracy-vs-FLOPs curve
    # every run but the truncated one stops once it reaches the correct SFT->RL run's FLOPs: within a step of it
    budget = methods["sft_then_rl"]["flops"]
    for name in ("luffy", "chord", "zero_rl"):
        steps = methods[name]["steps_per_seed"][0]["rl"]
        assert budget <= methods[name]["flops"] <= budget * (1 + 1.5 / steps), name
    assert methods["sft_then_rl_truncated"]["flops"] < budget
    # zero RL's curve starts at the base model (the same greedy grading of the same problems)
    assert methods["zero_rl"]["curve_per_seed"][0][0] == [0.0, pytest.approx(report["base_accuracy"])]
    # the buggy SFTs ran on the emulated layout (a quarter of each batch reaches the optimizer)
    bugs = report["settings"]["sft_bugs"]
    assert bugs["sft_buggy_then_rl"]["emulate_bug"] == "deepspeed_offload" and bugs["sft_both_bugs_then_rl"][
        "emulate_bug"] == "both"
    for verdict in report["verdicts"].values():
        assert {"holds", "margin", "spread"} <= set(verdict)
    # the pretrained base was made once and its inputs recorded (the key a later run reuses it by)
    assert (out / "pretrain" / "inputs.json").exists()
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    for line in report["findings"]:
        assert line in (out / "report.md").read_text() and line.removeprefix("- ") in printed
    page = _import_and_render(tmp_path, "repro-mixed", out / "report.json")
    assert "LUFFY" in page and report["findings"][1] in page
    with pytest.raises(SystemExit, match="a report of the pretrained base; import it with --import-repro-mixed$"):
        render_docs.main(["--root", str(tmp_path / "docs_copy"), "--import-repro-mixed-random-base",
                          str(out / "report.json"), "--allow-quick"])
