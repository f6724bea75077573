"""Stage pipelines (SFT→RL, RL→SFT, SFT→RL→SFT, ...) with cross-stage measurements.

Each stage starts from the previous stage's exported weights. During every stage a
:class:`CrossStageProbe` measures, every ``probe.every`` steps, the SFT cross-entropy on a held-out
SFT split and the mean reward on a fixed held-out prompt set, so one plot shows the
non-decoupling of the two stages (Paper B: RL after SFT raises the SFT loss; SFT after RL lowers
the reward). The pipeline writes ``metrics.jsonl`` (all stages on one global step axis),
``cross_stage.png`` (stage boundaries marked) and ``boundaries.json`` (values at each boundary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flax import nnx

from .config import (
    ConfigError,
    LoggingOptions,
    RewardOptions,
    RunConfig,
    SamplingOptions,
    deep_merge,
    from_dict,
    save_config,
)
from .data.prompts import PromptDataOptions, load_prompt_items
from .data.sft import SFTDataOptions, tokenize_sft
from .data.sources import load_rows
from .distributed import initialize
from .jitted import JitSpec
from .kinds import config_class
from .layout import layout, not_layout
from .metrics import is_writer, plot_curves, read_jsonl
from .models import load_tokenizer
from .rl import run_rl
from .run_folder import check_continuity, owned_folder
from .sampling import TextSampler
from .sft import heldout_loss, run_sft
from .sft.step import eval_spec
from .sharding import data_parallel_size, make_mesh, rows_sharding

log = logging.getLogger("sftrl_jax.pipeline")


@dataclasses.dataclass
class ProbeOptions:
    every: int = 10  # steps between measurements inside every stage (also at each stage's start and end)
    sft_files: list[str] = dataclasses.field(default_factory=list)  # held-out SFT split (LUFFY SFT schema)
    sft_limit: int = 256
    max_length: int = 2048
    prompt_files: list[str] = dataclasses.field(default_factory=list)  # held-out prompts with ground truths
    prompt_limit: int = 128
    max_prompt_length: int = 1024
    # every probe sampling setting, batch_size included, must match to resume a pipeline
    sampling: SamplingOptions = dataclasses.field(default_factory=lambda: SamplingOptions(temperature=0.0,
                                                                                         max_new_tokens=1024),
                                                  metadata=not_layout("batch_size"))

    _ranges = {"every": ">= 1", "sft_limit": ">= 1", "max_length": ">= 2", "prompt_limit": ">= 1",
               "max_prompt_length": ">= 1"}


@dataclasses.dataclass
class StageSpec:
    kind: Literal["sft", "rl"]
    # sections of an SFT or RL config (data, optimizer, train, sampling, rl, checkpoint), merged over
    # the pipeline's ``sft`` / ``rl`` base settings; checked when the pipeline config is loaded
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


# set once for the whole pipeline (the model path comes from the previous stage)
PIPELINE_SECTIONS = ("model", "mesh", "distributed", "output_dir", "reward", "logging", "kind")


@dataclasses.dataclass(kw_only=True)
class PipelineConfig(RunConfig):
    kind: Literal["pipeline"] = "pipeline"
    stages: list[StageSpec]
    sft: dict[str, Any] = dataclasses.field(default_factory=dict)  # base settings of every SFT stage
    rl: dict[str, Any] = dataclasses.field(default_factory=dict)  # base settings of every RL stage
    probe: ProbeOptions = dataclasses.field(default_factory=ProbeOptions)
    reward: RewardOptions = dataclasses.field(default_factory=RewardOptions)  # RL stages and the probe
    logging: LoggingOptions = layout(default_factory=LoggingOptions)  # every stage
    output_dir: str = layout("runs/pipeline")

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: the pipeline has no stages")
        for index in range(len(self.stages)):  # each stage's settings are a valid SFT/RL config
            stage_config(self, index, self.model.path)


PROBE_ROWS_PER_SHARD = 4  # held-out rows per data-parallel shard in one probe evaluation batch


def probe_eval_spec(options: ProbeOptions, graphdef, mesh, params, *, model_config=None, resident=None) -> JitSpec:
    """The probe's held-out loss function (:func:`sftrl_jax.sft.step.eval_spec`), declared once for the probe and
    ``sftrl-jax compile``."""
    return eval_spec(graphdef, mesh, params, rows=data_parallel_size(mesh) * PROBE_ROWS_PER_SHARD,
                     length=options.max_length, model_config=model_config, resident=resident)


class CrossStageProbe:
    """Held-out SFT loss and held-out reward of the current parameters."""

    def __init__(self, options: ProbeOptions, *, tokenizer, mesh, reward: RewardOptions, reward_fn=None):
        self.options, self.every, self.tokenizer, self.mesh = options, options.every, tokenizer, mesh
        self.shards = data_parallel_size(mesh)
        self.examples = []
        if options.sft_files:
            examples, _ = tokenize_sft(load_rows(options.sft_files, split="test"), tokenizer,
                                       SFTDataOptions(max_length=options.max_length))
            self.examples = examples[:options.sft_limit]
        self.items = []
        if options.prompt_files:
            items, _ = load_prompt_items(PromptDataOptions(files=options.prompt_files,
                                                           max_prompt_length=options.max_prompt_length), tokenizer)
            self.items = items[:options.prompt_limit]
        self.reward, self.reward_fn = reward, reward_fn
        # opened on the first measurement, then kept for all of them (grading workers are slow to start)
        self._score = None
        self._resources = contextlib.ExitStack()
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
        if self.items:
            sampler = TextSampler(nnx.merge(graphdef, params), self.tokenizer, self.options.sampling)
            seed = self.options.sampling.seed if self.options.sampling.seed is not None else 0
            samples, texts = sampler.sample([it.prompt_ids for it in self.items], seed=seed)
            truths = [it.ground_truth for it in self.items]
            if self._score is None:
                from .rewards import open_reward

                self._score = open_reward(self.reward, self._resources, self.reward_fn)
            scores = self._score(texts, truths, [s.tokens for s in samples])
            out["probe_reward"] = float(np.mean(self.reward.scale(np.asarray(scores, np.float64))))
        return out

    def close(self) -> None:
        self._resources.close()
        self._score = None


def stage_config(config: PipelineConfig, index: int, model_path: str):
    """The full SFTConfig / RLConfig of stage ``index`` (errors name the stage)."""
    stage = config.stages[index]
    merged = deep_merge(config.sft if stage.kind == "sft" else config.rl, stage.settings)
    label = f"stage {index + 1} ({stage.kind})"
    for key in PIPELINE_SECTIONS:
        if key in merged:
            raise ConfigError(f"{label}: {key!r} is set once for the whole pipeline (top level of the pipeline "
                              "config), not per stage")
    merged.update(kind=stage.kind, model={**dataclasses.asdict(config.model), "path": model_path}, mesh=config.mesh,
                  distributed=dataclasses.asdict(config.distributed), output_dir=str(stage_dir(config, index)),
                  logging=dataclasses.asdict(config.logging))
    if stage.kind == "rl":
        merged["reward"] = dataclasses.asdict(config.reward)
    try:
        return from_dict(config_class(stage.kind), merged)
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None


def stage_dir(config: PipelineConfig, index: int) -> Path:
    return Path(config.output_dir) / f"stage{index + 1}_{config.stages[index].kind}"


def run_pipeline(config: PipelineConfig, *, resume: bool = False, progress: bool = True, reward_fn=None,
                 on_step: Callable[[int, int, dict], None] | None = None, force: bool = False) -> dict:
    """Run the stages in order; with ``resume``, skip finished stages and continue inside the unfinished one
    (refusing changed settings unless ``force``, as :func:`sftrl_jax.training.run_loop` does)."""
    initialize(config.distributed)
    with owned_folder(config.output_dir, command="sftrl-jax pipeline", writer=is_writer()) as out:
        return _run_stages(config, out, resume=resume, progress=progress, reward_fn=reward_fn, on_step=on_step,
                           force=force)


def _run_stages(config: PipelineConfig, out: Path, *, resume, progress, reward_fn, on_step, force) -> dict:
    for index in range(len(config.stages)):  # every stage valid before any runs (also a config built in code)
        stage_config(config, index, config.model.path)
    state_file = out / "pipeline_state.json"
    if not resume and state_file.exists():
        raise FileExistsError(f"{out} holds an earlier pipeline run; pass --resume or choose a new output_dir")
    done = json.loads(state_file.read_text())["completed"] if state_file.exists() else []
    if resume and is_writer():
        check_continuity(out / "config.yaml", config, force=force)
    if is_writer():  # the record, written once the folder is known to be this pipeline's
        save_config(config, out / "config.yaml")
    tokenizer = load_tokenizer(config.model.path)
    resources = contextlib.ExitStack()
    if config.probe.prompt_files or any(s.kind == "rl" for i, s in enumerate(config.stages) if i not in done):
        from .rewards import open_reward

        # one grader for the probe and every RL stage (the stages take the pipeline's reward section)
        reward_fn = open_reward(config.reward, resources, reward_fn)
    probe = CrossStageProbe(config.probe, tokenizer=tokenizer, mesh=make_mesh(config.mesh), reward=config.reward,
                            reward_fn=reward_fn)
    model_path = config.model.path
    try:
        for index, stage in enumerate(config.stages):
            directory = stage_dir(config, index)
            if index in done:
                model_path = str(directory / "final")
                continue
            stage_cfg = stage_config(config, index, model_path)
            stage_resume = resume and (directory / "checkpoints").exists()
            log.info("stage %d/%d: %s from %s%s", index + 1, len(config.stages), stage.kind, model_path,
                     " (resuming)" if stage_resume else "")
            hook = (lambda step, record, i=index: on_step(i, step, record)) if on_step else None
            run = run_sft if stage.kind == "sft" else functools.partial(run_rl, reward_fn=reward_fn)
            result = run(stage_cfg, resume=stage_resume, progress=progress, on_step=hook, probe=probe, force=force)
            model_path = str(result.final_dir)
            done.append(index)
            if is_writer():
                state_file.write_text(json.dumps({"completed": done}))
    finally:
        probe.close()
        resources.close()
    return summarize_pipeline(config)


def summarize_pipeline(config: PipelineConfig) -> dict:
    """Concatenate stage metrics on a global step axis; write the cross-stage plot and boundary table."""
    out = Path(config.output_dir)
    records, boundaries, table, offset = [], [], [], 0
    for index, stage in enumerate(config.stages):
        stage_records = read_jsonl(stage_dir(config, index) / "metrics.jsonl")
        probes = [r for r in stage_records if "probe_sft_loss" in r or "probe_reward" in r]
        for record in stage_records:
            records.append({**record, "stage": index + 1, "kind": stage.kind, "global_step": offset + record["step"]})
        last = max((r["step"] for r in stage_records), default=0)
        table.append({"stage": index + 1, "kind": stage.kind, "steps": last,
                      "start": {k: probes[0].get(k) for k in ("probe_sft_loss", "probe_reward")} if probes else {},
                      "end": {k: probes[-1].get(k) for k in ("probe_sft_loss", "probe_reward")} if probes else {}})
        offset += last
        boundaries.append(offset)
    if is_writer():
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "boundaries.json").write_text(json.dumps(table, indent=2) + "\n")
        probe_records = [r for r in records if "probe_sft_loss" in r or "probe_reward" in r]
        plot_curves(probe_records, ["probe_sft_loss", "probe_reward"], out / "cross_stage.png", x="global_step",
                    title=" -> ".join(s.kind.upper() for s in config.stages), boundaries=boundaries[:-1],
                    log_keys=["probe_sft_loss"])
    for row in table:
        log.info("stage %d (%s, %d steps): start %s -> end %s", row["stage"], row["kind"], row["steps"],
                 row["start"], row["end"])
    return {"stages": table, "metrics": records}
