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

from .config import (
    ConfigError,
    LoggingOptions,
    RewardOptions,
    RunConfig,
    deep_merge,
    from_dict,
    save_config,
)
from .distributed import initialize
from .kinds import config_class
from .layout import layout
from .metrics import is_writer, plot_curves, read_jsonl
from .models import load_tokenizer
from .probe import CrossStageProbe, ProbeOptions
from .rl import run_rl
from .run_folder import check_continuity, owned_folder, write_text_atomic
from .sft import run_sft
from .sharding import make_mesh
from .signals import Stopped, agreed, requested, signal_name, stop_requests

log = logging.getLogger("sftrl_jax.pipeline")


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


def run_pipeline(config: PipelineConfig, *, resume: bool = False, progress: bool | None = None, reward_fn=None,
                 on_step: Callable[[int, int, dict], None] | None = None, force: bool = False) -> dict:
    """Run the stages in order; with ``resume``, skip finished stages and continue inside the unfinished one
    (refusing changed settings unless ``force``, as :func:`sftrl_jax.training.run_loop` does). ``progress``
    overrides ``logging.progress`` (None: the config's)."""
    initialize(config.distributed)
    with stop_requests(), owned_folder(config.output_dir, command="sftrl-jax pipeline", writer=is_writer()) as out:
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
            signum = agreed(requested())  # SIGTERM/SIGINT during the previous stage's export: stop here
            if signum is not None:
                raise Stopped(signum, f"stopped by {signal_name(signum)} before stage {index + 1}; to continue, "
                                      "rerun the same command with --resume")
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
                write_text_atomic(state_file, json.dumps({"completed": done}))
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
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_text_atomic(out / "boundaries.json", json.dumps(table, indent=2) + "\n")
        probe_records = [r for r in records if "probe_sft_loss" in r or "probe_reward" in r]
        plot_curves(probe_records, ["probe_sft_loss", "probe_reward"], out / "cross_stage.png", x="global_step",
                    title=" -> ".join(s.kind.upper() for s in config.stages), boundaries=boundaries[:-1],
                    log_keys=["probe_sft_loss"])
    for row in table:
        log.info("stage %d (%s, %d steps): start %s -> end %s", row["stage"], row["kind"], row["steps"],
                 row["start"], row["end"])
    return {"stages": table, "metrics": records}
