"""Measurements of the current parameters during training, on held-out data: the reward on a fixed prompt
set (:class:`HeldOutReward`), the pipeline's cross-stage probe (:class:`CrossStageProbe`: held-out SFT loss
and reward) and an RL run's validation (:class:`Validation`: LUFFY's trainer's, with the best checkpoint
kept). Each is a :class:`sftrl_jax.training.Hook` of the one training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

from .config import RewardOptions, SamplingOptions
from .data.prompts import PromptDataOptions, PromptItem, load_prompt_items
from .data.sft import SFTDataOptions, tokenize_sft
from .data.sources import load_rows
from .jitted import JitSpec
from .metrics import is_writer
from .sampling import TextSampler
from .sft import heldout_loss
from .sft.step import eval_spec
from .sharding import data_parallel_size, rows_sharding

log = logging.getLogger("sftrl_jax.probe")


class HeldOutReward:
    """The reward of the current parameters on fixed prompts: one sampled response per prompt (``sampling.n``
    per prompt when it is above 1), graded by the run's grader and scaled by ``reward.scale``.

    The grader opens on the first measurement (grading workers are slow to start) and stays open until
    :meth:`close`; ``reward_fn`` (an already open grader) is used instead when given.
    """

    def __init__(self, items: list[PromptItem], *, tokenizer, sampling: SamplingOptions, reward: RewardOptions,
                 reward_fn=None):
        self.items, self.tokenizer, self.sampling = items, tokenizer, sampling
        self.reward, self.reward_fn, self._score = reward, reward_fn, None
        self._resources = contextlib.ExitStack()

    def rewards(self, graphdef, params) -> np.ndarray:
        """One reward per sample, prompt-major (``sampling.n`` per item)."""
        sampler = TextSampler(nnx.merge(graphdef, params), self.tokenizer, self.sampling)
        seed = self.sampling.seed if self.sampling.seed is not None else 0
        samples, texts = sampler.sample([it.prompt_ids for it in self.items], seed=seed)
        truths = [it.ground_truth for it in self.items for _ in range(self.sampling.n)]
        if self._score is None:
            from .rewards import open_reward

            self._score = open_reward(self.reward, self._resources, self.reward_fn)
        scores = self._score(texts, truths, [s.tokens for s in samples])
        return self.reward.scale(np.asarray(scores, np.float64))

    def benchmark_means(self, rewards: np.ndarray) -> dict[str, float]:
        """Mean reward per benchmark (the rows' ``data_source``), in order of first appearance."""
        per_item = np.asarray(rewards, np.float64).reshape(len(self.items), self.sampling.n).mean(axis=1)
        names = list(dict.fromkeys(it.benchmark for it in self.items))
        return {name: float(np.mean([r for r, it in zip(per_item, self.items) if it.benchmark == name]))
                for name in names}

    def close(self) -> None:
        self._resources.close()
        self._score = None


@dataclasses.dataclass
class ProbeOptions:
    every: int = 10  # steps between measurements inside every stage (also at each stage's start and end)
    sft_files: list[str] = dataclasses.field(default_factory=list)  # held-out SFT split (LUFFY SFT schema)
    sft_limit: int = 256
    max_length: int = 2048
    prompt_files: list[str] = dataclasses.field(default_factory=list)  # held-out prompts with ground truths
    prompt_limit: int = 128
    max_prompt_length: int = 1024
    # every probe sampling setting must match to resume a pipeline
    sampling: SamplingOptions = dataclasses.field(default_factory=lambda: SamplingOptions(temperature=0.0,
                                                                                         max_new_tokens=1024))
    # also the reward of one sample per prompt at this temperature (probe_reward_sampled; mean@1 sampled beside
    # the greedy probe_reward); null: greedy only
    sampled_temperature: float | None = None
    # refuse a prompt file whose distinct (prompt, ground truth) pairs are fewer than this share of its rows (a
    # file of repeats measures few problems); the probe measures each distinct pair once
    min_distinct_share: float = 0.5

    _ranges = {"every": ">= 1", "sft_limit": ">= 1", "max_length": ">= 2", "prompt_limit": ">= 1",
               "max_prompt_length": ">= 1", "sampled_temperature": "> 0", "min_distinct_share": "[0, 1]"}


PROBE_ROWS_PER_SHARD = 4  # held-out rows per data-parallel shard in one probe evaluation batch


def probe_eval_spec(options: ProbeOptions, graphdef, mesh, params, *, model_config=None, resident=None) -> JitSpec:
    """The probe's held-out loss function (:func:`sftrl_jax.sft.step.eval_spec`), declared once for the probe and
    ``sftrl-jax compile``."""
    return eval_spec(graphdef, mesh, params, rows=data_parallel_size(mesh) * PROBE_ROWS_PER_SHARD,
                     length=options.max_length, model_config=model_config, resident=resident)


class CrossStageProbe:
    """Held-out SFT loss and held-out reward of the current parameters (the pipeline's probe)."""

    def __init__(self, options: ProbeOptions, *, tokenizer, mesh, reward: RewardOptions, reward_fn=None):
        self.options, self.every, self.mesh = options, options.every, mesh
        self.shards = data_parallel_size(mesh)
        self.examples = []
        if options.sft_files:
            examples, _ = tokenize_sft(load_rows(options.sft_files, split="test"), tokenizer,
                                       SFTDataOptions(max_length=options.max_length))
            self.examples = examples[:options.sft_limit]
        self.reward = self.sampled = None
        if options.prompt_files:
            items, _ = load_prompt_items(PromptDataOptions(files=options.prompt_files,
                                                           max_prompt_length=options.max_prompt_length), tokenizer)
            items = distinct_items(items, options)[:options.prompt_limit]
            self.reward = HeldOutReward(items, tokenizer=tokenizer, sampling=options.sampling, reward=reward,
                                        reward_fn=reward_fn)
            if options.sampled_temperature is not None:
                sampled = dataclasses.replace(options.sampling, temperature=options.sampled_temperature, n=1)
                self.sampled = HeldOutReward(items, tokenizer=tokenizer, sampling=sampled, reward=reward,
                                             reward_fn=reward_fn)
        self._eval_steps: dict = {}

    def measure(self, graphdef, params) -> dict[str, float]:
        out = {}
        if self.examples:
            if graphdef not in self._eval_steps:
                self._eval_steps[graphdef] = probe_eval_spec(self.options, graphdef, self.mesh, params).jit()
            out["probe_sft_loss"] = heldout_loss(self._eval_steps[graphdef], params, self.examples,
                                                 rows=self.shards * PROBE_ROWS_PER_SHARD,
                                                 max_length=self.options.max_length,
                                                 sharding=rows_sharding(self.mesh, 2))
        if self.reward is not None:
            out["probe_reward"] = float(np.mean(self.reward.rewards(graphdef, params)))
        if self.sampled is not None:
            out["probe_reward_sampled"] = float(np.mean(self.sampled.rewards(graphdef, params)))
        return out

    def close(self) -> None:
        for reward in (self.reward, self.sampled):
            if reward is not None:
                reward.close()


def distinct_items(items: list[PromptItem], options: ProbeOptions) -> list[PromptItem]:
    """``items`` with each (prompt, ground truth) pair once, in order of first appearance; refuses a file set where
    fewer than ``probe.min_distinct_share`` of the rows are distinct, and logs the probe's size."""
    seen, distinct = set(), []
    for item in items:
        key = (item.prompt_text, str(item.ground_truth))
        if key not in seen:
            seen.add(key)
            distinct.append(item)
    files = ", ".join(map(str, options.prompt_files))
    if items and len(distinct) < options.min_distinct_share * len(items):
        raise ValueError(f"probe.prompt_files ({files}): only {len(distinct)} of {len(items)} rows are distinct "
                         f"(prompt, ground truth) pairs, below probe.min_distinct_share={options.min_distinct_share}; "
                         "a probe of repeats measures few problems: choose a file of distinct problems")
    log.info("probe reward set: %d distinct (prompt, ground truth) pairs of %d rows in %s; measuring the first %d",
             len(distinct), len(items), files, min(len(distinct), options.prompt_limit))
    return distinct


BEST_DIR, BEST_RECORD = "best", "validation.json"


class Validation:
    """An RL run's validation, as LUFFY's trainer does it: every ``validation.every`` steps the reward on
    ``validation.files`` (one sample per prompt at ``validation.sampling``), averaged per benchmark (the rows'
    ``data_source``) and then over benchmarks (``val_score``, LUFFY's ``avg_score``); when that is above the
    best so far, the parameters are saved to ``output_dir/best`` (an HF folder, with ``validation.json``:
    the score and step). After the last step it validates once more, recorded but not a candidate for the
    best (as LUFFY's final validation). The best so far is read back from ``best/validation.json``, so a
    resumed run keeps choosing against it.
    """

    def __init__(self, options, items: list[PromptItem], *, tokenizer, out: Path, model_dir: str,
                 reward: RewardOptions, reward_fn=None):
        self.options, self.out, self.model_dir = options, Path(out), model_dir
        self.reward = HeldOutReward(items, tokenizer=tokenizer, sampling=options.sampling, reward=reward,
                                    reward_fn=reward_fn)
        record = self.out / BEST_DIR / BEST_RECORD
        self.best = json.loads(record.read_text())["val_score"] if record.exists() else -float("inf")

    def __call__(self, graphdef, params, step: int) -> dict[str, float]:
        means = self.reward.benchmark_means(self.reward.rewards(graphdef, params))
        score = float(np.mean(list(means.values())))
        out = {"val_score": score, **{f"val_score/{name}": value for name, value in means.items()}}
        if self.options.keep_best and step > 0 and step % self.options.every == 0 and score > self.best:
            self.best = score
            self._save_best(graphdef, params, {"val_score": score, "step": step, "benchmarks": means})
            log.info("validation at step %d: %.4f, the best so far (saved to %s)", step, score, self.out / BEST_DIR)
        if self.options.keep_best:
            out["val_best_score"] = self.best
        return out

    def _save_best(self, graphdef, params, record: dict) -> None:
        """Write the parameters to ``best.partial`` then swap it in, so a kill never leaves ``best`` half written
        (every process calls this: gathering sharded weights is collective)."""
        from .models import save_pretrained

        partial, best, old = (self.out / f"{BEST_DIR}{suffix}" for suffix in (".partial", "", ".old"))
        if is_writer():
            shutil.rmtree(partial, ignore_errors=True)
        save_pretrained(nnx.merge(graphdef, params), partial, tokenizer_dir=self.model_dir)
        if is_writer():
            (partial / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            shutil.rmtree(old, ignore_errors=True)
            if best.exists():
                best.rename(old)
            partial.rename(best)
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        self.reward.close()
