"""``sftrl-jax crosscheck run``: the same SFT with TRL's ``SFTTrainer`` (PyTorch) and with sftrl-jax.

Both sides get identical tokens: the config's rows are tokenised once by the SFT data code (chat
template, loss mask on the response tokens including the EOS) and handed to TRL pre-tokenised, as
``input_ids`` and ``labels`` (-100 outside the mask), with TRL's dataset preparation skipped. Both walk
the examples in file order (our ``data.shuffle`` off; transformers' sequential sampler), and TRL is
given exactly the examples our steps consume. The optimizer settings map one to one: AdamW (lr, betas,
eps, weight decay on everything but biases and norms on both sides), the warmup + decay schedule
(transformers' ``constant_with_warmup``, ``cosine``, ``cosine_with_min_lr`` and ``linear``), global-norm
clipping (``max_grad_norm: 0``, no clipping, is a bound too large to act on TRL's side, so that TRL still
logs the norm). TRL runs in one process: ``train.micro_batch_size`` sequences per micro-batch and
``global_batch_size / micro_batch_size`` gradient-accumulation steps; our side runs on the config's mesh
(its data-parallel shards and micro-steps). The correct accumulation makes the two the same computation.

torch, transformers' Trainer and trl are imported here only, when the command runs (``.[crosscheck]``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from ..data.batching import EpochSampler
from ..models import load_tokenizer
from ..models.hf_io import SafetensorsReader
from ..sharding import data_parallel_size, make_mesh
from .common import FixedExamplesSFT, crosscheck_config, fmt, load_train_examples, relative, run_ours, write_report

log = logging.getLogger("sftrl_jax.crosscheck")

DEFAULT_STEPS = 10
# max_grad_norm handed to TRL for "no clipping": it still computes (and logs) the norm, and never clips
_NO_CLIPPING = 1e30


def hf_schedule(options, total_steps: int) -> tuple[str, dict, int]:
    """transformers' ``(lr_scheduler_type, lr_scheduler_kwargs, warmup_steps)`` for our schedule
    (:func:`sftrl_jax.optim.make_schedule`: linear warmup over ``ceil(warmup_ratio * steps)`` steps, then the decay)."""
    warmup = math.ceil(options.warmup_ratio * total_steps)
    if options.lr_schedule == "constant":
        return "constant_with_warmup", {}, warmup
    if options.lr_schedule == "cosine":
        if options.min_lr_ratio > 0:
            return "cosine_with_min_lr", {"min_lr_rate": options.min_lr_ratio}, warmup
        return "cosine", {}, warmup
    if options.min_lr_ratio > 0:
        raise ValueError(f"optimizer.lr_schedule=linear with optimizer.min_lr_ratio={options.min_lr_ratio}: "
                         "transformers has no linear decay to a floor; crosscheck with min_lr_ratio=0 or a cosine")
    return "linear", {}, warmup


def consumed_order(count: int, global_batch_size: int, steps: int, seed: int) -> list[int]:
    """Indices of the examples our ``steps`` steps consume, in order (the SFT batcher's sampler, unshuffled)."""
    sampler = EpochSampler(count, global_batch_size, seed=seed, shuffle=False)
    return [int(i) for _ in range(steps) for i in sampler.next()]


def _labels(example) -> list[int]:
    return np.where(example.loss_mask, example.input_ids, -100).astype(np.int64).tolist()


def run_trl(config, examples: list, steps: int, out: Path) -> dict:
    """TRL's SFTTrainer on ``examples`` (exactly those, in order), ``steps`` optimizer steps. Returns the
    per-step records, the final weights by Hugging Face name, the versions and the loss normalisers."""
    try:
        import datasets
        import torch
        import transformers
        import trl
    except ImportError as err:
        raise RuntimeError(f"crosscheck run needs torch and trl ({err}); pip install -e '.[crosscheck]'") from None
    from trl import SFTConfig as TRLConfig, SFTTrainer

    train, options = config.train, config.optimizer
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.model.dtype]
    schedule, schedule_kwargs, warmup = hf_schedule(options, steps)
    cuda = torch.cuda.is_available()
    fields = {f.name for f in dataclasses.fields(TRLConfig)}
    if "train_sampling_strategy" not in fields:
        raise RuntimeError(f"transformers {transformers.__version__} has no train_sampling_strategy (a sequential "
                           "sampler); crosscheck run needs a newer transformers")
    # TRL turns activation checkpointing on by default: the same numbers, recomputed; off, as on our side
    recompute = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.global_batch_size // train.micro_batch_size, max_steps=steps,
        learning_rate=options.learning_rate, lr_scheduler_type=schedule, lr_scheduler_kwargs=schedule_kwargs,
        warmup_steps=warmup, weight_decay=options.weight_decay, adam_beta1=options.adam_b1,
        adam_beta2=options.adam_b2, adam_epsilon=options.adam_eps,
        max_grad_norm=options.max_grad_norm if options.max_grad_norm > 0 else _NO_CLIPPING, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda, train_sampling_strategy="sequential",
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, packing=False, padding_free=False,
        seed=train.seed, bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0, **{recompute: False})
    model = transformers.AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype, trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.path, trust_remote_code=False)
    dataset = datasets.Dataset.from_list([{"input_ids": e.input_ids.astype(np.int64).tolist(), "labels": _labels(e)}
                                          for e in examples])
    normalisers: list[float | None] = []

    class RecordingSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer, recording the ``num_items_in_batch`` each training micro-batch's loss is divided by."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                normalisers.append(None if num_items_in_batch is None else float(num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    trainer = RecordingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    records = [{"step": int(h["step"]), "loss": float(h["loss"]), "grad_norm": h.get("grad_norm")}
               for h in trainer.state.log_history if "loss" in h and "step" in h]
    per_step = args.gradient_accumulation_steps
    weights = {name: tensor.detach().float().cpu().numpy() for name, tensor in trainer.model.state_dict().items()}
    return {
        "records": records, "weights": weights,
        "normalisers": [normalisers[i * per_step] for i in range(len(normalisers) // per_step)],
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "device": "cuda" if cuda else "cpu",
        "model_accepts_loss_kwargs": bool(getattr(trainer, "model_accepts_loss_kwargs", False)),
        "average_tokens_across_devices": bool(getattr(args, "average_tokens_across_devices", False)),
        "processes": int(args.world_size), "gradient_accumulation_steps": per_step,
        "per_device_train_batch_size": train.micro_batch_size,
        "scheduler": {"lr_scheduler_type": schedule, "lr_scheduler_kwargs": schedule_kwargs, "warmup_steps": warmup},
    }


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(Path(directory))
    return {name: np.asarray(reader.get(name), np.float32) for name in sorted(reader.names())}


def weight_differences(ours: dict, theirs: dict, initial: dict) -> tuple[dict, list[str]]:
    """Per tensor ``{rel_diff: |ours - theirs| / |theirs|, update_rel_diff: |ours - theirs| / |theirs - initial|}``
    (Frobenius norms) over the names both have, and the names only one side has (a tied LM head that one
    side does not store separately is not counted)."""
    table = {}
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name].astype(np.float64), theirs[name].astype(np.float64)
        if a.shape != b.shape:
            raise ValueError(f"tensor {name}: shape {a.shape} (sftrl-jax) vs {b.shape} (TRL)")
        diff = float(np.linalg.norm(a - b))
        update = float(np.linalg.norm(b - initial[name])) if name in initial else None
        table[name] = {"rel_diff": diff / max(float(np.linalg.norm(b)), 1e-30),
                       "update_rel_diff": None if not update else diff / update}
    only = sorted((set(ours) ^ set(theirs)) - {"lm_head.weight"})
    return table, only


def run_crosscheck(config_path: str, *, steps: int | None = None, out: str | Path = "runs/crosscheck_run",
                   overrides=()) -> dict:
    """``sftrl-jax crosscheck run``: both runs, the comparison, and ``report.md``, ``report.json`` and
    ``curves.png`` in ``out``. Returns the report's data."""
    out = Path(out)
    original = crosscheck_config(config_path, overrides)
    bug = original.train.emulate_bug
    examples = load_train_examples(original, load_tokenizer(original.model.path))
    per_epoch = len(examples) // original.train.global_batch_size
    if per_epoch < 1:
        raise ValueError(f"data.train_files: {len(examples)} examples, fewer than train.global_batch_size "
                         f"({original.train.global_batch_size})")
    steps = steps if steps is not None else min(DEFAULT_STEPS, original.train.max_steps or per_epoch)
    if steps < 1:
        raise ValueError(f"--steps {steps}: at least 1")
    config = crosscheck_config(config_path, overrides, [f"train.max_steps={steps}", "train.emulate_bug=none"])
    hf_schedule(config.optimizer, steps)  # an unsupported schedule is refused before anything runs
    consumed = [examples[i] for i in consumed_order(len(examples), config.train.global_batch_size, steps,
                                                    config.train.seed)]
    records, _ = run_ours(config, FixedExamplesSFT(examples), out / "sftrl_jax")
    theirs = run_trl(config, consumed, steps, out / "trl")
    tokens = [r["tokens"] for r in records]
    same_normaliser = all(n is not None and abs(n - t) <= 0.5 for n, t in zip(theirs["normalisers"], tokens)) \
        and len(theirs["normalisers"]) == len(tokens)
    compared_to = "correct"
    if not same_normaliser:
        # TRL divided each micro-batch by its own tokens: compare with our emulation of that mean of means
        log.warning("TRL's loss normaliser is not the global batch's token count: comparing with sftrl-jax's "
                    "openrlhf_mean_of_means emulation on 1 rank x %d micro-steps",
                    theirs["gradient_accumulation_steps"])
        config = crosscheck_config(config_path, overrides, [
            f"train.max_steps={steps}", "train.emulate_bug=openrlhf_mean_of_means", "train.emulate_ranks=1",
            f"train.emulate_micro_batch_size={config.train.micro_batch_size}"])
        records, _ = run_ours(config, FixedExamplesSFT(examples), out / "sftrl_jax")
        compared_to = "openrlhf_mean_of_means"
    theirs_by_step = {r["step"]: r for r in theirs["records"]}
    rows = []
    for r in records:
        t = theirs_by_step.get(r["step"], {})
        rows.append({"step": r["step"], "loss": r["loss"], "loss_reference": t.get("loss"),
                     "grad_norm": r["grad_norm"], "grad_norm_reference": t.get("grad_norm"),
                     "loss_rel_diff": relative(r["loss"], t.get("loss")),
                     "grad_norm_rel_diff": relative(r["grad_norm"], t.get("grad_norm")),
                     "tokens": r["tokens"], "lr": r["lr"]})
    table, only = weight_differences(_read_weights(out / "sftrl_jax" / "final"), theirs["weights"],
                                     _read_weights(Path(config.model.path)))
    shards = data_parallel_size(make_mesh(config.mesh))
    micro_steps = config.train.global_batch_size // (config.train.micro_batch_size * shards)
    worst = max(table, key=lambda n: table[n]["rel_diff"])
    result = {
        "reference": f"trl {theirs['versions']['trl']}",
        "steps": rows,
        "max_weight_rel_diff": table[worst]["rel_diff"],
        "max_weight_rel_diff_tensor": worst,
        "max_update_rel_diff": max((v["update_rel_diff"] for v in table.values() if v["update_rel_diff"] is not None),
                                   default=None),
        "max_loss_rel_diff": max((r["loss_rel_diff"] for r in rows if r["loss_rel_diff"] is not None), default=None),
        "max_grad_norm_rel_diff": max((r["grad_norm_rel_diff"] for r in rows if r["grad_norm_rel_diff"] is not None),
                                      default=None),
        "weights": table, "tensors_on_one_side_only": only,
        "versions": theirs["versions"], "trl_device": theirs["device"],
        "loss_normalisation": {
            "num_items_in_batch": theirs["normalisers"], "sftrl_jax_tokens": tokens,
            "same_as_global_token_count": same_normaliser,
            "model_accepts_loss_kwargs": theirs["model_accepts_loss_kwargs"],
            "average_tokens_across_devices": theirs["average_tokens_across_devices"],
            "compared_with": compared_to},
        "layout": {"trl": {"processes": theirs["processes"], "gradient_accumulation_steps":
                           theirs["gradient_accumulation_steps"],
                           "per_device_train_batch_size": theirs["per_device_train_batch_size"]},
                   "sftrl_jax": {"data_parallel_shards": shards, "micro_steps": micro_steps,
                                 "micro_batch_size": config.train.micro_batch_size}},
        "scheduler": theirs["scheduler"], "config": str(config_path), "ignored_emulate_bug": bug,
        "examples_consumed": len(consumed),
    }
    curves = {f"TRL {theirs['versions']['trl']}": [{"step": r["step"], "loss": r["loss_reference"],
                                                      "grad_norm": r["grad_norm_reference"]} for r in rows],
              "sftrl-jax": [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in rows]}
    write_report(out, _markdown(result, config), result, curves, title="TRL vs sftrl-jax")
    return result


def _markdown(result: dict, config) -> str:
    versions, norm = result["versions"], result["loss_normalisation"]
    trl_layout, our_layout = result["layout"]["trl"], result["layout"]["sftrl_jax"]
    opt = config.optimizer
    lines = [
        "# crosscheck run: TRL SFTTrainer vs sftrl-jax", "",
        f"Config `{result['config']}`, {len(result['steps'])} optimizer steps of {config.train.global_batch_size} "
        f"sequences ({result['examples_consumed']} examples in file order, identical tokens and loss mask on both "
        f"sides). TRL {versions['trl']}, transformers {versions['transformers']}, torch {versions['torch']} on "
        f"{result['trl_device']}: {trl_layout['processes']} process x {trl_layout['gradient_accumulation_steps']} "
        f"accumulation steps x {trl_layout['per_device_train_batch_size']} sequences. sftrl-jax: "
        f"{our_layout['data_parallel_shards']} data-parallel shards x {our_layout['micro_steps']} micro-steps x "
        f"{our_layout['micro_batch_size']} sequences. Parameters in {config.model.dtype} on both sides"
        + (f"; sftrl-jax's matmuls in {config.model.compute_dtype}, TRL's in {config.model.dtype} (expect rounding "
           "differences of that size)" if config.model.compute_dtype not in (None, config.model.dtype) else "")
        + ".", "",
        f"AdamW lr {opt.learning_rate:g}, betas ({opt.adam_b1:g}, {opt.adam_b2:g}), eps {opt.adam_eps:g}, weight "
        f"decay {opt.weight_decay:g}; schedule {opt.lr_schedule} (transformers "
        f"`{result['scheduler']['lr_scheduler_type']}`, {result['scheduler']['warmup_steps']} warmup steps); "
        f"max_grad_norm {opt.max_grad_norm:g}.", "",
        f"**Largest relative weight difference per tensor: {fmt(result['max_weight_rel_diff'], 3)}** "
        f"(`{result['max_weight_rel_diff_tensor']}`; relative to the training update: "
        f"{fmt(result['max_update_rel_diff'], 3)}). Largest per-step relative difference: loss "
        f"{fmt(result['max_loss_rel_diff'], 3)}, grad norm {fmt(result['max_grad_norm_rel_diff'], 3)}.", "",
        "| step | loss (TRL) | loss (sftrl-jax) | rel. diff | grad norm (TRL) | grad norm (sftrl-jax) | rel. diff |",
        "|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['step']} | {fmt(r['loss_reference'], 8)} | {fmt(r['loss'], 8)} | "
                     f"{fmt(r['loss_rel_diff'], 2)} | {fmt(r['grad_norm_reference'], 8)} | {fmt(r['grad_norm'], 8)} | "
                     f"{fmt(r['grad_norm_rel_diff'], 2)} |")
    lines += ["", "## Loss normalisation", "",
              f"TRL {versions['trl']}'s SFTTrainer with transformers {versions['transformers']} divides each "
              "micro-batch's summed token loss by `num_items_in_batch`: the supervised tokens (labels after the "
              "first position that are not -100) of all gradient-accumulation micro-batches of the optimizer step"
              + (", counted over all processes (`average_tokens_across_devices` is true; the loss is then "
                 "multiplied by the process count to undo DDP's gradient averaging)"
                 if norm["average_tokens_across_devices"] else
                 " of this process only (`average_tokens_across_devices` is false)")
              + ". Trainer passes it because the model accepts loss kwargs (`model_accepts_loss_kwargs`: "
              f"{norm['model_accepts_loss_kwargs']}). sftrl-jax divides by the supervised tokens of the whole "
              "global batch.", "",
              f"Measured: `num_items_in_batch` per step {norm['num_items_in_batch']}; sftrl-jax's token count per "
              f"step {[int(t) for t in norm['sftrl_jax_tokens']]}: "
              + ("the same at every step, so both sides minimise the global-token mean."
                 if norm["same_as_global_token_count"] else
                 "NOT the same: TRL's loss is a mean of per-micro-batch means here, so sftrl-jax's side ran its "
                 "`openrlhf_mean_of_means` emulation on 1 rank x the accumulation steps for this comparison."),
              ""]
    if result["ignored_emulate_bug"] != "none":
        lines += [f"The config's `train.emulate_bug: {result['ignored_emulate_bug']}` was not used: this compares "
                  "the correct accumulation (`sftrl-jax crosscheck logs` tests a run for the bugs).", ""]
    if result["tensors_on_one_side_only"]:
        lines += [f"Tensors on one side only (not compared): {', '.join(result['tensors_on_one_side_only'])}.", ""]
    return "\n".join(lines)
