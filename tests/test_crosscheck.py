"""``sftrl-jax crosscheck``: side by side with TRL (``run``), and the verdict on Hugging Face Trainer logs (``logs``).

The reference runs are real ``transformers.Trainer`` runs on the tiny model: the correct accumulation, a
mean of per-micro-batch means (a ``compute_loss`` that ignores ``num_items_in_batch``, as transformers did
before 4.46), one whose optimizer sees only the first and last micro-step's gradients (the DeepSpeed
defect the SFT trainer emulates: ``sftrl_jax.sft.step``), and a correct one with another learning rate.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sft_fixtures import make_model_dir  # noqa: E402
from sftrl_jax.cli import main  # noqa: E402
from sftrl_jax.crosscheck.common import crosscheck_config, load_train_examples  # noqa: E402
from sftrl_jax.crosscheck.logs import compare, logged_loss  # noqa: E402
from sftrl_jax.crosscheck.references import read_reference  # noqa: E402
from sftrl_jax.crosscheck.trl_run import hf_schedule  # noqa: E402
from sftrl_jax.jitted import compilation_cache  # noqa: E402
from sftrl_jax.models import load_tokenizer  # noqa: E402

STEPS = 4
GLOBAL = 16  # 8 devices x 2 micro-steps x 1 sequence here; the references: 1 rank x 4 micro-steps x 4 sequences
LAYOUT = (1, 4, 4)


def _rows(count: int, seed: int = 0) -> list[dict]:
    """Additions with 0 to 5 reasoning lines, the prompt padded to make up for the lines left out: every
    example 94 tokens (one padding bucket, one compiled shape), supervised tokens from 15 to 60 (so a mean of
    micro-batch means is far from the global mean)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(10, 50, 2))
        lines = int(rng.integers(0, 6))
        steps = "".join(f"{a}+{b}={a + b}\n" for _ in range(lines))
        rows.append({"prompt": [{"role": "user", "content": f"what is {a}+{b}?" + " ok" * (3 * (5 - lines))}],
                     "target": [{"role": "assistant", "content": f"<think>\n{steps}</think>\n\\boxed{{{a + b}}}"}]})
    return rows


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    """The tiny model, 64 rows, an SFT config; one compilation cache for the module (the TRL comparison and
    the replays compile the same programs) and one torch thread (the 2-core machine runs two test workers)."""
    root = tmp_path_factory.mktemp("crosscheck")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(64)))
    config = root / "sft.yaml"
    config.write_text(
        f"kind: sft\nmodel: {{path: {model_dir}, dtype: float32}}\n"
        f"data: {{train_files: [{data}], max_length: 128}}\n"
        "optimizer: {learning_rate: 1.0e-3, lr_schedule: cosine, warmup_ratio: 0.25, weight_decay: 0.1, "
        "max_grad_norm: 1.0}\n"
        f"train: {{global_batch_size: {GLOBAL}, micro_batch_size: 1, max_steps: {STEPS}, seed: 0}}\n"
        "mesh: {data: 1, fsdp: -1, tensor: 1}\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with compilation_cache(root / "xla_cache"):
            yield root, config
    finally:
        torch.set_num_threads(threads)


def hf_reference_run(config_path, out, *, kind: str = "correct", learning_rate: float | None = None,
                     logging_steps: int = 1):
    """A transformers Trainer run of the config's data (tokenised by the SFT data code) on ``LAYOUT``; returns
    its ``trainer_state.json``. ``kind``: ``correct``, ``mean_of_means`` or ``first_and_last``."""
    import datasets

    _, accumulation, per_device = LAYOUT

    class MeanOfMeans(transformers.Trainer):
        loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides it by the accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)  # no num_items_in_batch: the model's loss is this micro-batch's token mean
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    class FirstAndLastMicroStep(transformers.Trainer):
        """The middle micro-steps' gradients are dropped from the accumulated gradient."""

        micro = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            position, self.micro = self.micro % accumulation, self.micro + 1
            middle = 0 < position < accumulation - 1
            saved = [p.grad.clone() for p in model.parameters()] if middle else None
            loss = super().training_step(model, inputs, num_items_in_batch)
            if middle:
                with torch.no_grad():
                    for p, grad in zip(model.parameters(), saved):
                        p.grad.copy_(grad)
            return loss

    config = crosscheck_config(str(config_path), [])
    examples = load_train_examples(config, load_tokenizer(config.model.path))
    rows = [{"input_ids": e.input_ids.tolist(), "attention_mask": [1] * len(e.input_ids),
             "labels": np.where(e.loss_mask, e.input_ids, -100).tolist()} for e in examples[:STEPS * GLOBAL]]
    schedule, schedule_kwargs, warmup = hf_schedule(config.optimizer, STEPS)
    options = config.optimizer
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        max_steps=STEPS, learning_rate=learning_rate or options.learning_rate, lr_scheduler_type=schedule,
        lr_scheduler_kwargs=schedule_kwargs, warmup_steps=warmup, weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm, optim="adamw_torch", logging_steps=logging_steps, save_strategy="no",
        report_to=[], use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True, seed=0)
    trainer_class = {"correct": transformers.Trainer, "mean_of_means": MeanOfMeans,
                     "first_and_last": FirstAndLastMicroStep}[kind]
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float32)
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    return out / "trainer_state.json"


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


# --- crosscheck run ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_crosscheck_run_agrees_with_trl_under_gradient_accumulation(workdir, capsys):
    trl = pytest.importorskip("trl")
    root, config = workdir
    out = root / "run"
    assert main(["crosscheck", "run", "--config", str(config), "--steps", str(STEPS), "--out", str(out)]) == 0
    assert "crosscheck run: trl" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == f"trl {trl.__version__}"
    assert [r["step"] for r in report["steps"]] == list(range(1, STEPS + 1))
    for row in report["steps"]:
        assert {"step", "loss", "loss_reference", "grad_norm", "grad_norm_reference"} <= set(row)
        assert abs(row["loss"] - row["loss_reference"]) <= 1e-4 * abs(row["loss_reference"])
        assert abs(row["grad_norm"] - row["grad_norm_reference"]) <= 1e-4 * row["grad_norm_reference"]
    assert report["max_weight_rel_diff"] <= 1e-4
    assert report["max_update_rel_diff"] <= 1e-3  # relative to what training moved each tensor
    # TRL accumulates 16 micro-batches of 1 sequence; our side 2 micro-steps x 8 devices
    assert report["layout"]["trl"]["gradient_accumulation_steps"] == GLOBAL
    assert report["layout"]["sftrl_jax"]["micro_steps"] == 2
    norm = report["loss_normalisation"]
    assert norm["same_as_global_token_count"] and norm["num_items_in_batch"] == norm["sftrl_jax_tokens"]
    assert norm["compared_with"] == "correct"
    assert "Loss normalisation" in (out / "report.md").read_text()
    assert (out / "curves.png").stat().st_size > 0


# --- crosscheck logs --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(workdir):
    root, config = workdir
    return {name: hf_reference_run(config, root / f"ref_{name}", kind=kind, learning_rate=lr)
            for name, kind, lr in [("correct", "correct", None), ("mean_of_means", "mean_of_means", None),
                                   ("deepspeed", "first_and_last", None), ("other_lr", "correct", 3e-3)]}


@pytest.fixture(scope="module")
def logs_cli(workdir, references):
    """``crosscheck logs`` on the mean-of-means reference, with its data order given (the rows in file order, as
    the Trainer's sequential sampler took them): the report, and the four replays' curves it holds (a loss logged
    every step is the replay's own loss), which the other references are compared with."""
    root, config = workdir
    out = root / "logs_cli"
    order = root / "order.json"
    order.write_text(json.dumps(list(range(STEPS * GLOBAL))))
    argv = ["crosscheck", "logs", "--config", str(config), "--reference", str(references["mean_of_means"]),
            "--layout", "1x4x4", "--order", str(order), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    curves = {name: [{"step": r["step"], "loss": r[f"loss_{name}"], "grad_norm": r[f"grad_norm_{name}"]}
                     for r in report["steps"]] for name in report["candidates"]}
    return out, report, curves


@pytest.mark.slow
def test_logs_cli_writes_the_report(logs_cli):
    out, report, _ = logs_cli
    assert report["verdict"] == "openrlhf_mean_of_means"
    assert set(report["candidates"]) == {"correct", "openrlhf_mean_of_means", "deepspeed_offload", "both"}
    assert all({"loss_distance", "grad_norm_distance"} <= set(c) for c in report["candidates"].values())
    assert [r["step"] for r in report["steps"]] == list(range(1, STEPS + 1))
    assert report["layout"] == {"ranks": 1, "micro_steps": 4, "micro_batch_size": 4}
    assert report["order"].endswith("order.json")
    markdown = (out / "report.md").read_text()
    assert "Verdict: openrlhf_mean_of_means" in markdown and "data order" in markdown and "2/N" in markdown
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name, verdict", [("correct", "correct"), ("mean_of_means", "openrlhf_mean_of_means"),
                                           ("deepspeed", "deepspeed_offload"), ("other_lr", "none")])
def test_logs_verdict_on_hf_trainer_runs(references, logs_cli, name, verdict):
    result = compare(read_reference(references[name]), logs_cli[2], micro_steps=LAYOUT[1])
    assert result["verdict"] == verdict
    best = result["candidates"][result["best"]]
    if verdict != "none":
        assert result["best"] == verdict
        assert best["loss_distance"] <= 1e-4 and best["grad_norm_distance"] <= 1e-4  # float32 on both sides
        # the next semantics is thousands of times further off (mean of means vs correct: ~5e-3 this early,
        # while the gradient is mostly the direction every token shares)
        assert result["margin"] > max(1e-3, 100 * best["score"])
    else:
        assert best["score"] > result["tolerance"]
    ratio = result["grad_norm_ratio"]["median"]
    if name == "deepspeed":  # 2 of 4 micro-steps kept: about half the correct norm
        assert ratio < 0.7
    elif name == "correct":
        assert ratio == pytest.approx(1.0, rel=1e-4)


# --- fast: formats, arithmetic, errors ---------------------------------------------------------------------------


def test_reference_formats(tmp_path):
    state = {"log_history": [{"loss": 2.5, "grad_norm": 1.5, "learning_rate": 1e-3, "step": 1},
                             {"eval_loss": 2.4, "step": 1},
                             {"loss": 2.25, "grad_norm": 1.25, "step": 2},
                             {"train_loss": 2.3, "train_runtime": 1.0, "step": 2}]}
    expected = [{"step": 1, "loss": 2.5, "grad_norm": 1.5}, {"step": 2, "loss": 2.25, "grad_norm": 1.25}]
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert read_reference(tmp_path / "trainer_state.json") == expected
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.5, "grad_norm": 1.5}\n\n'
                                        '{"step": 2, "loss": 2.25, "grad_norm": 1.25}\n')
    assert read_reference(tmp_path / "log.jsonl") == expected
    (tmp_path / "wandb.csv").write_text(
        '"Step","run - train/loss","run - train/loss__MIN","run - train/grad_norm","run - eval/loss"\n'
        '"0","","","",""\n"1","2.5","2.5","1.5",""\n"2","2.25","2.25","1.25","2.4"\n')
    assert read_reference(tmp_path / "wandb.csv") == expected


def test_logged_loss_of_each_semantics():
    nll = np.array([2.0, 6.0, 1.0, 9.0])
    tokens = np.array([1.0, 1.0, 2.0, 4.0])
    # the global-token mean whatever is dropped from the gradient
    assert logged_loss(nll, tokens, "correct", ranks=1, micro_batch_size=2) == pytest.approx(18 / 8)
    assert logged_loss(nll, tokens, "deepspeed_offload", ranks=1, micro_batch_size=2) == pytest.approx(18 / 8)
    # micro-batches {0, 1} and {2, 3}: (8/2 + 10/6) / 2; on 2 ranks x 1 sequence: 4 groups of one example
    assert logged_loss(nll, tokens, "openrlhf_mean_of_means", ranks=1, micro_batch_size=2) == pytest.approx(
        (4 + 10 / 6) / 2)
    assert logged_loss(nll, tokens, "both", ranks=2, micro_batch_size=1) == pytest.approx((2 + 6 + 0.5 + 2.25) / 4)


def test_compare_averages_the_loss_over_hf_logging_windows_and_says_none_beyond_the_tolerance():
    replayed = {"correct": [{"step": s, "loss": float(s), "grad_norm": 1.0} for s in range(1, 5)],
                "deepspeed_offload": [{"step": s, "loss": float(s), "grad_norm": 0.5} for s in range(1, 5)]}
    # logged every 2 steps, as HF Trainer logs: the loss averaged since the last log, the last step's grad norm
    reference = [{"step": 2, "loss": 1.5, "grad_norm": 1.0}, {"step": 4, "loss": 3.5, "grad_norm": 1.0}]
    result = compare(reference, replayed, micro_steps=4)
    assert result["verdict"] == "correct" and result["candidates"]["correct"]["score"] == 0.0
    assert result["margin"] == pytest.approx(0.5)
    assert result["grad_norm_ratio"]["median"] == 1.0 and result["grad_norm_ratio"]["two_over_n"] == 0.5
    off = [{"step": 2, "loss": 1.5, "grad_norm": 0.75}, {"step": 4, "loss": 3.5, "grad_norm": 0.75}]
    assert compare(off, replayed)["verdict"] == "none"


def test_bad_inputs_are_one_line_errors_naming_the_culprit(workdir, tmp_path, capsys):
    _, config = workdir
    logs = ["crosscheck", "logs", "--config", str(config), "--out", str(tmp_path / "out")]
    missing = tmp_path / "nope.json"
    assert f"--reference {missing}: no such file" in cli_error(capsys, [*logs, "--reference", str(missing)])
    bad = tmp_path / "log.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0, "grad_norm": 1.0}\n{"step": 2, "loss": \n')
    assert f"{bad}: line 2: not JSON" in cli_error(capsys, [*logs, "--reference", str(bad)])
    bad.write_text('{"step": 1, "grad_norm": 1.0}\n')
    assert f"{bad}: line 1: no 'loss'" in cli_error(capsys, [*logs, "--reference", str(bad)])
    good = tmp_path / "good.jsonl"
    good.write_text('{"step": 1, "loss": 2.0, "grad_norm": 1.0}\n')
    assert "--layout '8by8': expected RANKSxMICROSxBATCH" in cli_error(
        capsys, [*logs, "--reference", str(good), "--layout", "8by8"])
    error = cli_error(capsys, [*logs, "--reference", str(good), "--layout", "2x4x1"])
    assert "--layout 2x4x1: 2 x 4 x 1 = 8 sequences" in error and "train.global_batch_size is 16" in error
    order = tmp_path / "order.json"
    order.write_text(json.dumps(list(range(15)) + [64]))
    error = cli_error(capsys, [*logs, "--reference", str(good), "--layout", "1x4x4", "--order", str(order)])
    assert f"--order {order}: entry 15 is 64, outside the 64 rows" in error
    order.write_text('{"rows": [1, 2]}')
    assert "expected a JSON list of row indices" in cli_error(
        capsys, [*logs, "--reference", str(good), "--order", str(order)])
    with pytest.raises(SystemExit):  # argparse: "the following arguments are required: --reference"
        main(logs)
