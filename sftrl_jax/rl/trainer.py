"""RL as an algorithm of the one training loop (:mod:`sftrl_jax.training`), for any ``rl.method``.

Each step samples ``rl.prompts_per_step`` prompts x ``sampling.n`` responses from the current
policy (:mod:`sftrl_jax.rl.rollouts`; with a method that uses demonstrations, ``sampling.n - 1``
samples and the prompt's demonstration), scores them with the shared reward (or a ``reward_fn``
given by the caller), and updates the policy in ``rl.mini_batches_per_step`` mini-batches for
``rl.ppo_epochs`` epochs, each mini-batch with exact accumulation over micro-batches. The method
(:mod:`sftrl_jax.rl.methods`) supplies the advantages, its extra inputs and its loss.

With several processes each update places only the process's own rows on its devices, and the
gradient step is over the global batch (the rollouts are identical on every process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data.batching import EpochSampler, micro_step_layout
from ..data.prompts import load_prompt_items
from ..flops import generation_flops, train_flops
from ..models import read_config
from ..models.config import require_positions
from ..probe import Validation
from ..sampling import TextSampler, generation_metrics, pad_token_id
from ..sharding import micro_batch_sharding, place, to_host
from ..training import Algorithm, Hook, LoopContext, TrainResult, probe_hook, run_loop
from .algorithms import kl_penalty
from .config import RLConfig
from .demonstrations import load_demonstrations
from .expert_data import ExpertData, mini_batch_order, with_expert_rows
from .methods import get_method
from .rollouts import (
    RewardFn,
    check_batch_sizes,
    collect_rollouts,
    demonstrations_in_groups,
    expert_rows_per_step,
    groups_per_step,
    rollout_arrays,
)
from .step import ROLLOUT_KEYS, rl_functions, update_batch_keys
from .verl_layout import verl_step_layout

log = logging.getLogger("sftrl_jax.rl")


def load_prompts(config: RLConfig, tokenizer) -> list:
    """The RL prompts; refuses a run with none (or none that tokenises to anything)."""
    items, skipped = load_prompt_items(config.data, tokenizer)
    files = ", ".join(map(str, config.data.files))
    if not items:
        raise ValueError(f"data.files ({files}): no usable prompts ({skipped['bad_rows']} bad rows, "
                         f"{skipped['prompt_too_long']} longer than data.max_prompt_length); nothing to train on")
    if not any(item.prompt_ids for item in items):  # e.g. a model directory without its tokenizer files
        raise ValueError(f"data.files ({files}): all {len(items)} prompts tokenise to no tokens with the tokenizer "
                         f"of {config.model.path} (are its tokenizer.json / tokenizer_config.json missing?); "
                         f"nothing to train on")
    return items


def load_validation_prompts(config: RLConfig, tokenizer) -> list:
    """The prompts of ``validation.files`` (read as the run's ``data`` section reads its own), the first
    ``validation.limit``; none when validation is off. Refuses files without a usable prompt."""
    options = config.validation
    if not options.files:
        return []
    data = dataclasses.replace(config.data, files=list(options.files), split=options.split)
    items, skipped = load_prompt_items(data, tokenizer)
    if not items:
        raise ValueError(f"validation.files ({', '.join(map(str, options.files))}): no usable prompts "
                         f"({skipped['bad_rows']} bad rows, {skipped['prompt_too_long']} longer than "
                         "data.max_prompt_length)")
    return items[:options.limit]


class RLAlgorithm(Algorithm):
    """Sample -> score -> advantages -> old/ref log-probs -> mini-batch updates of ``rl.method``.

    A method with demonstrations in its groups (LUFFY; CHORD with ``rl.expert_source=group``) gets groups of
    ``sampling.n - 1`` samples and the prompt's demonstration (:mod:`sftrl_jax.rl.demonstrations`); CHORD with
    ``rl.expert_source=expert_data`` gets fewer groups of ``sampling.n`` samples and rows of ``rl.expert_data``
    in the place of the rest (:mod:`sftrl_jax.rl.expert_data`), which are trained but not generated, graded or
    counted in the reward metrics.
    """

    name, plot_name = "rl", "rl"
    plot_keys = ("reward_mean", "accuracy", "response_len_mean", "entropy", "kl_ref", "grad_norm")
    finite_keys = ("pg_loss", "entropy", "kl_ref", "grad_norm")
    postfix_keys = ("reward_mean", "response_len_mean")

    def __init__(self, reward_fn: RewardFn | None = None):
        self.reward_fn = reward_fn
        self.resources = contextlib.ExitStack()

    def setup(self, ctx: LoopContext) -> int:
        config = self.config = ctx.config
        self.method = get_method(config.rl.method)
        self.plot_title = config.rl.method.upper()
        self.rows_per_micro = config.train.micro_batch_size * ctx.shards
        check_batch_sizes(config, ctx.shards)
        self.pad_id = pad_token_id(ctx.tokenizer)
        self.items = load_prompts(config, ctx.tokenizer)
        self.demonstrations = self.expert = None
        if self.method.demonstrations is not None and ctx.tokenizer.eos_token_id is None:
            raise ValueError(f"rl.method={config.rl.method}: the tokenizer of {config.model.path} has no EOS "
                             "token to end demonstrations with")
        if expert_rows_per_step(config):
            self.expert = ExpertData(config, ctx.tokenizer, eos_id=ctx.tokenizer.eos_token_id)
        longest = max(len(item.prompt_ids) for item in self.items)
        if self.expert is not None:
            longest = max(longest, self.expert.longest_prompt)
        require_positions(read_config(config.model.path), longest + config.sampling.max_new_tokens,
                          f"the longest prompt ({longest} tokens) + sampling.max_new_tokens")
        if demonstrations_in_groups(config.rl):
            self.demonstrations = load_demonstrations(
                self.items, config.data, ctx.tokenizer, eos_id=ctx.tokenizer.eos_token_id,
                max_new_tokens=config.sampling.max_new_tokens, response_field=config.rl.demonstration_field)
        self.prompt_sampler = EpochSampler(len(self.items), groups_per_step(config), seed=config.train.seed,
                                           shuffle=config.data.shuffle)
        self.total_steps = config.train.max_steps or config.train.num_epochs * self.prompt_sampler.batches_per_epoch
        self.flops = {"flops_train": 0.0, "flops_generate": 0.0}
        self.validation_items = load_validation_prompts(config, ctx.tokenizer)
        self.validation = None
        return self.total_steps * config.rl.mini_batches_per_step * config.rl.ppo_epochs

    def build(self, ctx: LoopContext, state: dict) -> None:
        config, self.ctx = self.config, ctx
        # frozen reference: the starting parameters (copied before any restore, so a resumed run has it too)
        self.ref_params = jax.tree.map(jnp.copy, state["params"]) if config.rl.kl_coef > 0 else None
        functions = rl_functions(ctx)
        self.update = functions["policy_update"].jit()
        self.logprobs_of = functions["logprobs"].jit()
        self.update_keys = set(update_batch_keys(config.rl))
        from ..rewards import open_reward

        self.reward_fn = open_reward(config.reward, self.resources, self.reward_fn)

    def hooks(self) -> list[Hook]:
        """Validation (``validation.files``) every ``validation.every`` steps and after the last, keeping the
        best parameters (:class:`sftrl_jax.probe.Validation`)."""
        if not self.validation_items:
            return []
        options = self.config.validation
        self.validation = Validation(options, self.validation_items, tokenizer=self.ctx.tokenizer, out=self.ctx.out,
                                     model_dir=self.config.model.path, reward=self.config.reward,
                                     reward_fn=self.reward_fn)
        return [Hook(self.validation, every=options.every, at_start=options.at_start, at_end=True)]

    def _on_devices(self, arrays: dict) -> dict:
        laid = micro_step_layout(arrays, self.rows_per_micro)
        return {k: place(v, micro_batch_sharding(self.ctx.mesh, v.ndim)) for k, v in laid.items()}

    def train_step(self, state: dict, step: int) -> tuple[dict, dict]:
        config = self.config
        tick = time.perf_counter()
        sampler = TextSampler(nnx.merge(self.ctx.graphdef, state["params"]), self.ctx.tokenizer, config.sampling)
        rollouts = collect_rollouts(sampler, self.items, self.prompt_sampler, self.reward_fn, config, step,
                                    self.demonstrations)
        generation = sampler.stats
        del sampler  # its decode-layout copy of the weights
        timing = {"generate": time.perf_counter() - tick - rollouts.score_seconds, "score": rollouts.score_seconds}
        tick = time.perf_counter()
        # the trained batch: the sampled groups, then the step's expert rows (CHORD with rl.expert_data)
        batch = rollouts if self.expert is None else with_expert_rows(rollouts, self.expert.next())
        arrays, mismatch = self._update_arrays(state, batch)
        arrays.update(self.method.step_inputs(config.rl, step, self.total_steps, len(batch.responses)))
        if self.expert is not None:  # every mini-batch gets its share of the sampled rows and of the expert rows
            order = mini_batch_order(len(rollouts.responses), self.expert.per_step, config.rl.mini_batches_per_step)
            arrays = {k: v[order] for k, v in arrays.items()}
        if config.rl.verl_ranks is not None:
            arrays = self._as_verl_lays_out(arrays)
        if set(arrays) != self.update_keys:  # what rl_functions declared (and sftrl-jax compile compiles)
            raise RuntimeError(f"rl.method={config.rl.method}: the update batch has {sorted(arrays)}, the declared "
                               f"update takes {sorted(self.update_keys)}")
        state, update_metrics = self._updates(state, arrays)
        timing["train"] = time.perf_counter() - tick
        summary = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
        lengths = np.array([len(r) for r in rollouts.responses])  # the sampled rows (expert rows are not)
        self._count_flops(rollouts, batch)
        groups = np.asarray(rollouts.correctness).reshape(-1, config.sampling.n)
        if self.expert is not None:
            expert_lengths = [len(r) for r in batch.responses[len(rollouts.responses):]]
            summary.update(expert_rows=len(expert_lengths), expert_response_len_mean=float(np.mean(expert_lengths)))
        return state, {
            "reward_mean": float(np.mean(rollouts.rewards)), "accuracy": float(np.mean(rollouts.correctness)),
            "all_correct_share": float(np.mean(groups.min(axis=1) >= 1.0)),
            "all_wrong_share": float(np.mean(groups.max(axis=1) <= 0.0)),
            "response_len_mean": float(lengths.mean()), "response_len_max": int(lengths.max()),
            "truncated_share": float(np.mean(rollouts.truncated)),
            "generation_rounds": rollouts.rounds, "dropped_groups": rollouts.dropped_groups,
            **summary, **mismatch, **{f"time_{k}": v for k, v in timing.items()},
            "tokens_per_s": float(lengths.sum()) / sum(timing.values()), **self.flops,
            **generation_metrics(generation, prefix="rollout_"),
        }

    def _as_verl_lays_out(self, arrays: dict) -> dict:
        """The step's arrays in verl's mini-batch order over ``rl.verl_ranks`` ranks, with the entropy's per-row
        weights when ``rl.entropy_agg`` is ``micro_batch_token_mean`` (:mod:`sftrl_jax.rl.verl_layout`)."""
        cfg = self.config.rl
        order, entropy_weight = verl_step_layout(arrays["attention_mask"].sum(axis=1),
                                                 arrays["response_mask"].sum(axis=1), ranks=cfg.verl_ranks,
                                                 mini_batches=cfg.mini_batches_per_step,
                                                 max_token_len=cfg.verl_max_token_len)
        if "entropy_weight" in self.update_keys:
            arrays["entropy_weight"] = entropy_weight
        return {k: v[order] for k, v in arrays.items()}

    def _update_arrays(self, state: dict, rollouts) -> tuple[dict, dict]:
        """The step's arrays with advantages, old (and reference) log-probs and the truncated importance
        sampling weights; the sampler/trainer mismatch metrics."""
        cfg = self.config.rl
        arrays = rollout_arrays(rollouts, max_new_tokens=self.config.sampling.max_new_tokens,
                                mask_truncated=cfg.mask_truncated, pad_id=self.pad_id)
        sampler_logp = arrays.pop("sampler_logp")
        off_policy = np.asarray(rollouts.off_policy or [False] * len(rollouts.rewards))
        arrays["advantages"] = self.method.advantages(np.asarray(rollouts.rewards, np.float32), off_policy,
                                                      self.config.sampling.n, cfg)
        laid = self._on_devices({k: arrays[k] for k in ROLLOUT_KEYS})
        recomputed = to_host(self.logprobs_of(state["params"], laid)).reshape(sampler_logp.shape)
        sampled = (arrays["response_mask"] > 0) & (arrays["response_off_policy"] == 0)  # sampled tokens only
        kl = np.asarray(kl_penalty(jnp.asarray(recomputed), jnp.asarray(sampler_logp)))
        gap = np.abs(recomputed - sampler_logp)
        metrics = {"logprob_mismatch_abs": float(gap[sampled].mean()) if sampled.any() else 0.0,
                   "logprob_mismatch_kl": float(kl[sampled].mean()) if sampled.any() else 0.0}
        arrays["old_logp"] = recomputed if cfg.old_logprobs == "recompute" else sampler_logp
        if cfg.tis_cap is not None:
            arrays["tis_weight"], tis_metrics = truncated_is_weights(recomputed, sampler_logp, sampled, cfg.tis_cap)
            metrics.update(tis_metrics)
        if self.ref_params is not None:
            arrays["ref_logp"] = to_host(self.logprobs_of(self.ref_params, laid)).reshape(sampler_logp.shape)
        return arrays, metrics

    def _updates(self, state: dict, arrays: dict) -> tuple[dict, list[dict]]:
        """``rl.ppo_epochs`` passes of ``rl.mini_batches_per_step`` optimizer updates over the step's arrays."""
        cfg = self.config.rl
        mini = len(arrays["input_ids"]) // cfg.mini_batches_per_step
        metrics = []
        for _ in range(cfg.ppo_epochs):
            for j in range(cfg.mini_batches_per_step):
                state, update_metrics = self.update(state, self._on_devices(
                    {k: v[j * mini:(j + 1) * mini] for k, v in arrays.items()}))
                metrics.append(jax.device_get(update_metrics))
        return state, metrics

    def _count_flops(self, rollouts, batch) -> None:
        """Generation FLOPs of ``rollouts``' sampled tokens; training FLOPs of every row of ``batch`` (the
        rollouts and any expert rows)."""
        model_config, group = self.ctx.model_config, self.config.sampling.n
        lengths = np.array([len(r) for r in rollouts.responses])
        sampled = np.where(np.asarray(rollouts.off_policy, bool), 0, lengths) if rollouts.off_policy else lengths
        for prompt, response in zip(rollouts.prompts[::group], np.split(sampled, len(sampled) // group)):
            # demonstrations are not generated (0 new tokens)
            self.flops["flops_generate"] += sum(generation_flops(model_config, len(prompt), int(n), prefill=k == 0)
                                                for k, n in enumerate(response))
        forward_passes = 3 * self.config.rl.ppo_epochs + 1 + (self.ref_params is not None)  # updates, old (+ ref)
        self.flops["flops_train"] += sum(train_flops(model_config, len(p) + len(r)) / 3 * forward_passes
                                         for p, r in zip(batch.prompts, batch.responses))

    def data_files(self) -> dict[str, list[str]]:
        return {"data.files": list(self.config.data.files), "rl.expert_data": list(self.config.rl.expert_data)}

    def state_dict(self) -> dict:
        state = {"data": self.prompt_sampler.state_dict(), "flops": dict(self.flops)}
        if self.expert is not None:
            state["expert_data"] = self.expert.sampler.state_dict()
        return state

    def load_state_dict(self, meta: dict) -> None:
        self.prompt_sampler.load_state_dict(meta["data"])
        if self.expert is not None:
            self.expert.sampler.load_state_dict(meta["expert_data"])
        self.flops = dict(meta["flops"])

    def close(self) -> None:
        if self.validation is not None:
            self.validation.close()
        self.resources.close()


def truncated_is_weights(old_logp: np.ndarray, sampler_logp: np.ndarray, sampled: np.ndarray,
                         cap: float) -> tuple[np.ndarray, dict]:
    """Truncated importance sampling: ``min(exp(old_logp - sampler_logp), cap)`` on sampled tokens, 1 elsewhere
    (demonstrations and padding), and its metrics (mean weight and share of sampled tokens at the cap)."""
    ratio = np.exp(np.clip(old_logp.astype(np.float64) - sampler_logp, -20.0, 20.0))
    weights = np.where(sampled, np.minimum(ratio, cap), 1.0).astype(np.float32)
    count = max(int(sampled.sum()), 1)
    return weights, {"tis_weight_mean": float(weights[sampled].sum() / count),
                     "tis_capped_share": float((sampled & (ratio > cap)).sum() / count)}


def run_rl(config: RLConfig, *, resume: bool = False, progress: bool | None = None, reward_fn: RewardFn | None = None,
           on_step: Callable[[int, dict], None] | None = None, probe=None, force: bool = False) -> TrainResult:
    """Run (or with ``resume`` continue) the RL method ``rl.method`` (default GRPO) as configured.

    ``probe`` (optional, see :mod:`sftrl_jax.pipeline`) is measured before the first step, every
    ``probe.every`` steps and at the end; its values go into ``metrics.jsonl``. ``progress=False``
    hides the progress bar (default: ``logging.progress``); ``force`` resumes despite changed settings
    (:func:`sftrl_jax.run_folder.check_continuity`).
    """
    hooks = [probe_hook(probe)] if probe is not None else []
    return run_loop(config, RLAlgorithm(reward_fn), resume=resume, hooks=hooks, on_step=on_step,
                    progress=progress, force=force)
