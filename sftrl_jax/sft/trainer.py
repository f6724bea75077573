"""SFT as an algorithm of the one training loop (:mod:`sftrl_jax.training`): data -> sharded jit step."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from ..data.batching import SFTBatcher, eval_batches
from ..data.sft import tokenize_sft
from ..data.sources import load_rows
from ..flops import train_flops
from ..models import read_config
from ..models.config import require_positions
from ..sharding import local_batch_shards, place, place_local
from ..training import Algorithm, Hook, LoopContext, TrainResult, probe_hook, run_loop
from .config import SFTConfig
from .step import bug_example_weights, sft_functions, supervised_token_counts

log = logging.getLogger("sftrl_jax.sft")


def heldout_loss(eval_step, params, examples, *, rows: int, max_length: int, sharding) -> float:
    """Global-token-mean SFT loss over ``examples`` (``eval_step`` from ``make_eval_step``, jitted)."""
    nll_total = tokens_total = 0.0
    for batch in eval_batches(examples, rows=rows, max_length=max_length):
        nll, tokens = eval_step(params, {k: place(v, sharding) for k, v in batch.items()})
        nll_total += float(nll)
        tokens_total += float(tokens)
    return nll_total / max(tokens_total, 1.0)


def load_examples(config: SFTConfig, tokenizer):
    """Tokenised train and held-out examples, with the data statistics logged."""
    data = config.data
    if not data.train_files:
        raise ValueError("data.train_files: no training data given")
    train, stats = tokenize_sft(load_rows(data.train_files, split=data.train_split), tokenizer, data)
    log.info("train data: %s", stats.summary())
    held_out: list = []
    if data.eval_files:
        held_out, eval_stats = tokenize_sft(load_rows(data.eval_files, split="test"), tokenizer, data)
        log.info("eval data: %s", eval_stats.summary())
    elif data.eval_fraction > 0:
        order = np.random.default_rng([config.train.seed, 7]).permutation(len(train))
        count = max(1, int(round(data.eval_fraction * len(train))))
        held = set(order[:count].tolist())
        held_out = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
        log.info("held out %d of the training examples for evaluation", count)
    _require_supervised_tokens(train, "data.train_files", data.train_files, config.model.path)
    if data.eval_files:
        _require_supervised_tokens(held_out, "data.eval_files", data.eval_files, config.model.path)
    return train, held_out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _require_supervised_tokens(examples, key: str, files, model_path: str) -> None:
    """A split without a single supervised token would train (or evaluate) on nothing, with loss 0: refuse it."""
    if supervised_token_counts(examples).sum():
        return
    missing = [name for name in _TOKENIZER_FILES if not (Path(model_path) / name).exists()]
    hint = (f"the model directory {model_path} has no {' / '.join(missing)}, so the tokenizer it loads turns "
            f"text into no tokens" if missing else
            f"check the rows' prompt/response fields and the tokenizer of the model directory {model_path}")
    raise ValueError(f"{key} ({', '.join(map(str, files))}): no supervised tokens in {len(examples)} examples "
                     f"(a run would train on nothing with loss 0); {hint}")


def emulated_layout(train, shards: int) -> tuple[int, int, int] | None:
    """``(ranks, micro_steps, micro_batch_size)`` of the virtual DeepSpeed layout a bug is emulated on
    (``train.emulate_ranks`` / ``train.emulate_micro_batch_size``, by default our mesh's ``shards`` and
    ``train.micro_batch_size``); None without ``train.emulate_bug`` (the two keys are then unused,
    which is logged: a config may name LUFFY's layout and switch the bug off by an override)."""
    if train.emulate_bug == "none":
        unused = [key for key in ("emulate_ranks", "emulate_micro_batch_size") if getattr(train, key) is not None]
        if unused:
            log.info("%s set but unused: train.emulate_bug is none", " and ".join(f"train.{k}" for k in unused))
        return None
    ranks = train.emulate_ranks or shards
    micro = train.emulate_micro_batch_size or train.micro_batch_size
    if train.global_batch_size % (ranks * micro):
        raise ValueError(
            f"train.global_batch_size ({train.global_batch_size}) must be a multiple of train.emulate_ranks "
            f"({ranks}{'' if train.emulate_ranks else ', the mesh default'}) x train.emulate_micro_batch_size "
            f"({micro}{'' if train.emulate_micro_batch_size else ', from train.micro_batch_size'})")
    return ranks, train.global_batch_size // (ranks * micro), micro


def _example_weights(examples, **layout) -> np.ndarray:
    """The emulated bug's loss weight of each example of a global batch (:func:`bug_example_weights`)."""
    return bug_example_weights(supervised_token_counts(examples), **layout)


class SFTAlgorithm(Algorithm):
    """Supervised fine-tuning for :func:`sftrl_jax.training.run_loop`: exact global-token-mean accumulation
    over ``[micro_steps, shards * rows, length]`` batches, optionally with a PyTorch-stack bug emulated on
    a virtual layout (:func:`emulated_layout`, :mod:`sftrl_jax.sft.step`). Its metrics include the
    cumulative ``flops_train`` (:func:`sftrl_jax.flops.train_flops` of every real sequence trained on)."""

    name, plot_name, plot_title = "sft", "loss", "SFT"
    plot_keys = ("loss", "eval_loss", "grad_norm", "lr")
    postfix_keys = ("loss", "grad_norm")

    def setup(self, ctx: LoopContext) -> int:
        config = self.config = ctx.config
        train = config.train
        require_positions(read_config(config.model.path), config.data.max_length, "data.max_length")
        layout = emulated_layout(train, ctx.shards)
        weights = None
        if layout is not None:
            self.name = f"sft [BUG: {train.emulate_bug}]"
            log.warning("=" * 72 + "\nBUG EMULATION ON: train.emulate_bug=%s -- the gradient is deliberately WRONG "
                        "(it reproduces the PyTorch stacks' arithmetic)\n" + "=" * 72, train.emulate_bug)
            ranks, micro_steps, micro = layout
            log.info("bug emulated on a virtual layout of %d ranks x %d micro-steps x %d sequences "
                     "(train.emulate_ranks / train.emulate_micro_batch_size)", ranks, micro_steps, micro)
            weights = functools.partial(_example_weights, emulate_bug=train.emulate_bug, ranks=ranks,
                                        micro_batch_size=micro)
        self.train_examples, self.eval_examples = self.load_examples(config, ctx.tokenizer)
        self.batcher = SFTBatcher(self.train_examples, global_batch_size=train.global_batch_size,
                                  micro_batch_size=train.micro_batch_size, shards=ctx.shards,
                                  max_length=config.data.max_length, pack=config.data.pack, seed=train.seed,
                                  shuffle=config.data.shuffle, shard_ids=local_batch_shards(ctx.mesh, ctx.shards),
                                  example_weights=weights)
        self.total_steps = train.max_steps or train.num_epochs * self.batcher.steps_per_epoch
        self.flops_train = 0.0
        log.info("%d steps: global batch %d = %d micro-steps x %d shards x %d sequences", self.total_steps,
                 train.global_batch_size, self.batcher.micro_steps, ctx.shards, train.micro_batch_size)
        return self.total_steps

    def load_examples(self, config: SFTConfig, tokenizer) -> tuple[list, list]:
        """The tokenised training examples, in the order the batcher walks them (shuffled or not as
        ``data.shuffle`` says), and the held-out ones (:func:`load_examples`)."""
        return load_examples(config, tokenizer)

    def build(self, ctx: LoopContext, state: dict) -> None:
        self.ctx = ctx
        functions = sft_functions(ctx)
        self.step_fn = functions["train_step"].jit()
        self.batch_sharding = functions["train_step"].in_shardings[1]  # where the declaration takes the batch
        if "eval_step" in functions:
            self.eval_fn = functions["eval_step"].jit()
            self.eval_sharding = functions["eval_step"].in_shardings[1]

    def train_step(self, state: dict, step: int) -> tuple[dict, dict]:
        tick = time.perf_counter()
        host_batch = self.batcher.next()  # this process's rows only
        batch = {k: place_local(v, self.batch_sharding, self.batcher.global_shape(v)) for k, v in host_batch.items()}
        state, metrics = self.step_fn(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # every sequence of the global batch, at its real (unpadded) length, forward + backward
        self.flops_train += sum(train_flops(self.ctx.model_config, int(n)) for n in self.batcher.last_lengths)
        seconds = time.perf_counter() - tick
        return state, {"epoch": self.batcher.epoch, **metrics, "tokens_per_s": metrics["tokens"] / seconds,
                       "seconds": seconds, "flops_train": self.flops_train}

    def evaluate(self, params) -> float:
        """The held-out loss (global token mean) of ``params``."""
        return heldout_loss(self.eval_fn, params, self.eval_examples,
                            rows=self.ctx.shards * self.config.train.micro_batch_size,
                            max_length=self.config.data.max_length, sharding=self.eval_sharding)

    def hooks(self) -> list[Hook]:
        """The held-out loss every ``train.eval_every`` steps (before the last; :meth:`finish` does that one)."""
        if not (self.eval_examples and self.config.train.eval_every):
            return []
        return [Hook(lambda _graphdef, params, step: {"eval_loss": self.evaluate(params)}
                     if step < self.total_steps else None, every=self.config.train.eval_every)]

    def data_files(self) -> dict[str, list[str]]:
        data = self.config.data
        return {"data.train_files": list(data.train_files), "data.eval_files": list(data.eval_files)}

    def state_dict(self) -> dict:
        return {"data": self.batcher.state_dict(), "seed": self.config.train.seed, "flops_train": self.flops_train}

    def load_state_dict(self, meta: dict) -> None:
        self.batcher.load_state_dict(meta["data"])
        if "flops_train" not in meta:
            log.warning("the checkpoint has no flops_train (written before SFT counted FLOPs): counting from 0")
        self.flops_train = float(meta.get("flops_train", 0.0))

    def finish(self, state: dict, step: int) -> dict | None:
        if not self.eval_examples:
            return None
        final = self.evaluate(state["params"])
        log.info("final eval loss %.4f", final)
        return {"eval_loss": final}


def run_sft(config: SFTConfig, *, resume: bool = False, progress: bool | None = None,
            on_step: Callable[[int, dict], None] | None = None, probe=None, force: bool = False) -> TrainResult:
    """Run (or with ``resume`` continue) SFT as configured. ``on_step(step, metrics)`` runs after each step.

    ``probe`` (optional, see :mod:`sftrl_jax.pipeline`) is measured before the first step, every
    ``probe.every`` steps and at the end; its values go into ``metrics.jsonl``. ``progress=False``
    hides the progress bar (default: ``logging.progress``); ``force`` resumes despite changed settings
    (:func:`sftrl_jax.run_folder.check_continuity`).
    """
    algorithm = SFTAlgorithm()
    hooks = [probe_hook(probe)] if probe is not None else []
    return run_loop(config, algorithm, resume=resume, hooks=hooks, on_step=on_step,
                    progress=progress, force=force)
