"""The one training loop, and what it is built from: train state, checkpoints and resume, NaN stop, export.

An algorithm (SFT, GRPO, ...) is a :class:`Algorithm`: it loads its data, builds its jitted
step, and runs one optimizer step's worth of work (``train_step``); :func:`run_loop` owns the rest
-- the output folder, the mesh, the model and optimizer state, checkpoints and exact resume,
metrics to the sinks ``logging.sinks`` names, the progress bar, hooks (held-out evaluation, the
pipeline's cross-stage probe, a caller's ``on_step``), the NaN stop, the HF export and the plots.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from .checkpointing import TrainCheckpointer
from .config import CheckpointOptions, ModelOptions, save_config
from .distributed import initialize
from .fingerprint import data_fingerprint
from .flops import COUNTED_FLOPS
from .jitted import abstract, placed
from .metrics import MetricSinks, is_writer
from .models import load_pretrained, load_tokenizer, save_pretrained
from .optim import init_opt_state, make_optimizer
from .run_folder import check_continuity, owned_folder, refuse_resume, write_text_atomic
from .sharding import data_parallel_size, make_mesh, shardings_on
from .signals import Stopped, agreed, requested, signal_name, stop_requests

log = logging.getLogger("sftrl_jax.training")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the run stopped and kept its last good checkpoint."""


def init_train_state(model_options: ModelOptions, mesh, optimizer):
    """Load the model, and build ``{params, opt_state (float32), step}`` with every leaf on ``mesh``.

    Returns ``(graphdef, model_config, state, state_shardings)``.
    """
    model, model_config = load_pretrained(model_options, mesh)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    state, shardings = train_state(params, optimizer, mesh)
    return graphdef, model_config, state, shardings


def state_shardings(params, optimizer, mesh) -> dict:
    """The shardings of ``{params, opt_state, step}`` for parameters (arrays or ShapeDtypeStructs) on ``mesh``."""
    return {"params": shardings_on(params, mesh), "opt_state": opt_state_shardings(optimizer, params, mesh),
            "step": NamedSharding(mesh, PartitionSpec())}


def train_state(params, optimizer, mesh):
    """``({params, opt_state, step}, shardings)`` on ``mesh`` for parameters already placed on it."""
    shardings = state_shardings(params, optimizer, mesh)
    state = {"params": params,
             "opt_state": jax.jit(lambda p: init_opt_state(optimizer, p), out_shardings=shardings["opt_state"])(params),
             "step": jnp.zeros((), jnp.int32)}
    return jax.device_put(state, shardings), shardings


def abstract_context(config, mesh, updates: int, *, model=None):
    """``(ctx, model)``: the loop's :class:`LoopContext` for ``config`` on ``mesh`` with shapes only (the model
    built from ``model.path``'s ``config.json``, no weights read, unless a ``model`` already on ``mesh`` is
    given; ``updates`` optimizer updates for the lr schedule), and the model. ``sftrl-jax compile`` and the
    benchmarks declare the algorithms' functions against it."""
    from .models import abstract_model, param_shardings, read_config

    if model is None:
        model = abstract_model(read_config(config.model.path), config.model, mesh)
    model_config = model.config
    optimizer, schedule = make_optimizer(config.optimizer, updates)

    params = placed(nnx.to_pure_dict(nnx.state(model)), param_shardings(model))
    shardings = state_shardings(params, optimizer, mesh)
    state = placed({"params": params, "opt_state": jax.eval_shape(lambda p: init_opt_state(optimizer, p), params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}, shardings)
    ctx = LoopContext(config=config, out=None, mesh=mesh, shards=data_parallel_size(mesh), tokenizer=None,
                      optimizer=optimizer, schedule=schedule, graphdef=nnx.graphdef(model), model_config=model_config,
                      state_shardings=shardings, abstract_state=state)
    return ctx, model


def opt_state_shardings(optimizer, params, mesh):
    """The optimizer state's shardings: each per-parameter leaf (Adam's moments) sharded like its
    parameter, so ``fsdp=N`` divides the optimizer state by N as it does the parameters; scalars
    (step counts) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda p: init_opt_state(optimizer, p), params)
    return optax.tree_utils.tree_map_params(optimizer, lambda _, sharding: sharding, abstract,
                                            shardings_on(params, mesh),
                                            transform_non_params=lambda _: replicated)


def open_checkpoints(out: Path, options: CheckpointOptions, state, *, resume: bool):
    """The run's checkpointer, and (state, meta) restored from its latest checkpoint when resuming.

    A fresh run refuses an ``output_dir`` that already holds checkpoints. ``meta`` is None when
    nothing was restored.
    """
    checkpointer = TrainCheckpointer(out / "checkpoints", save_every=options.save_every, keep_last=options.keep_last,
                                     async_save=options.async_save)
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{out / 'checkpoints'} already holds checkpoints (latest step {latest}); "
                              "pass --resume to continue that run or choose a new output_dir")
    if latest is None:
        if resume:
            log.info("--resume: no checkpoint in %s, starting from step 0", checkpointer.directory)
        return checkpointer, state, None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    skipped = []
    for step in checkpointer.all_steps():  # newest first; a damaged one is skipped for the one before
        try:
            restored, meta = checkpointer.restore(step, abstract)
            if not isinstance(meta, dict) or int(meta.get("step", -1)) != step:
                raise ValueError(f"its meta item does not record step {step}")
        except Exception as err:  # noqa: BLE001 - whatever the damage, the reason is logged and the next tried
            reason = _one_line(err)
            log.warning("skipping checkpoint %s: it does not restore (%s)", checkpointer.directory / str(step),
                        reason)
            skipped.append((step, reason))
            continue
        if skipped:
            aside = checkpointer.set_aside([s for s, _ in skipped])
            log.warning("moved the damaged checkpoint(s) of step %s to %s", ", ".join(str(s) for s, _ in skipped),
                        aside)
        log.info("resumed from step %d (%s)", step, checkpointer.directory / str(step))
        return checkpointer, restored, meta
    raise RuntimeError(f"no checkpoint in {checkpointer.directory} restores ("
                       + "; ".join(f"step {s}: {reason}" for s, reason in skipped)
                       + "); start a new output_dir, or move the checkpoints folder away to start this one afresh")


DATA_RECORD = "data_fingerprint.json"  # in output_dir: the SHA-256 of each training data file, by config key


def data_record(files: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """``{config key: {file: SHA-256}}`` of an algorithm's :meth:`Algorithm.data_files` (a hub id or ``tfds:``
    name stands for itself)."""

    return {key: data_fingerprint(specs) for key, specs in files.items() if specs}


def check_data_unchanged(record: Path, files: dict[str, list[str]], *, force: bool = False) -> None:
    """Refuse to resume when a training file's content differs from the run's ``record`` (one line naming the
    file), unless ``force``. A folder without a record (an older run) is not checked."""
    if not record.exists():
        return
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        log.warning("%s: unreadable; the training data cannot be checked against the run's", record)
        return
    now = data_record(files)
    changes = [f"{key} {path}: {what}" for key in sorted(set(before) | set(now))
               for path, what in _file_changes(before.get(key, {}), now.get(key, {}))]
    refuse_resume(record.parent, changes, what="training data",
                  consequence="the saved data position would be applied to other rows", force=force)


def _file_changes(before: dict, now: dict):
    for path in sorted(set(before) | set(now)):
        if path not in now:
            yield path, "no longer read"
        elif path not in before:
            yield path, "not read before"
        elif before[path] != now[path]:
            yield path, "content changed"


def _one_line(err: BaseException, limit: int = 200) -> str:
    """``err`` as ``Type: first line``, cut to ``limit`` characters."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stop_on_nonfinite(step: int, detail: str, checkpointer: TrainCheckpointer):
    """Raise :class:`NonFiniteLossError` naming the step and the last good checkpoint."""
    checkpointer.wait()
    good = checkpointer.latest_step()
    raise NonFiniteLossError(f"non-finite loss/grad norm at step {step} ({detail}); stopped. Last good checkpoint: "
                             + (f"step {good} in {checkpointer.directory}" if good is not None else "none"))


@dataclasses.dataclass
class LoopContext:
    """What the loop has set up, for the algorithm's ``setup`` and ``build`` (filled in that order)."""

    config: object  # the command's config (SFTConfig, RLConfig, ...)
    out: Path
    mesh: object
    shards: int  # data-parallel shards (:func:`sftrl_jax.sharding.data_parallel_size`)
    tokenizer: object
    optimizer: optax.GradientTransformation | None = None
    schedule: Callable | None = None
    graphdef: object = None
    model_config: object = None
    state_shardings: dict | None = None
    abstract_state: dict | None = None  # {params, opt_state, step} as ShapeDtypeStructs with their shardings


class Algorithm(abc.ABC):
    """One training algorithm as the loop sees it. Subclasses: ``sft.SFTAlgorithm``, ``rl.RLAlgorithm``."""

    name: str = "train"  # progress bar label
    plot_name: str = "train"  # output_dir/<plot_name>.png
    plot_title: str = ""
    plot_keys: Sequence[str] = ()
    finite_keys: Sequence[str] = ("loss", "grad_norm")  # a NaN/Inf in any of these stops the run
    postfix_keys: Sequence[str] = ("loss",)  # shown on the progress bar
    total_steps: int = 0  # optimizer steps of the run; set by ``setup``

    @abc.abstractmethod
    def setup(self, ctx: LoopContext) -> int:
        """Load the data, set ``total_steps``; return how many optimizer updates the lr schedule spans."""

    @abc.abstractmethod
    def build(self, ctx: LoopContext, state: dict) -> None:
        """Jit the step(s) the algorithm declares for ``ctx`` (``state``: the starting state, before any
        restore). The declarations (``sftrl_jax.jitted.JitSpec``) come from a function of ``ctx`` alone,
        which ``sftrl-jax compile`` calls too."""

    @abc.abstractmethod
    def train_step(self, state: dict, step: int) -> tuple[dict, dict]:
        """Run step ``step + 1`` (``step`` finished so far): ``(new state, metrics as plain floats)``."""

    def hooks(self) -> list[Hook]:
        """The algorithm's own hooks (e.g. SFT's periodic held-out loss), run before the caller's."""
        return []

    def state_dict(self) -> dict:
        """What besides the train state a checkpoint needs to resume exactly (data position, counters)."""
        return {}

    def data_files(self) -> dict[str, list[str]]:
        """The files whose rows the data position counts, by config key: a resume refuses other content at
        the same paths (:func:`check_data_unchanged`)."""
        return {}

    def load_state_dict(self, meta: dict) -> None:  # noqa: B027 - optional: an algorithm without state
        """Restore from a checkpoint's meta (what :meth:`state_dict` returned)."""

    def finish(self, state: dict, step: int) -> dict | None:
        """Measurements after the last step (e.g. the final held-out loss), recorded at ``step``."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: an algorithm that opens nothing
        """Release what the algorithm opened (grading workers, ...)."""


@dataclasses.dataclass
class Hook:
    """``fn(graphdef, params, step) -> metrics`` every ``every`` steps, at the last step when ``at_end``,
    and before the first when ``at_start``; its metrics join that step's record (which is always
    written, whatever ``logging.log_every``)."""

    fn: Callable[[object, dict, int], dict | None]
    every: int = 0  # 0: only at the start / end
    at_start: bool = False
    at_end: bool = False

    def due(self, step: int, last: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and last)


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    params: dict
    metrics: list[dict]


def probe_hook(probe) -> Hook:
    """The pipeline's cross-stage probe (``measure(graphdef, params)``) as a hook: at the start, every
    ``probe.every`` steps and at the end."""
    return Hook(lambda graphdef, params, _step: probe.measure(graphdef, params), every=probe.every,
                at_start=True, at_end=True)


def run_loop(config, algorithm: Algorithm, *, resume: bool = False, hooks: Sequence[Hook] = (),
             on_step: Callable[[int, dict], None] | None = None, progress: bool | None = None,
             force: bool = False) -> TrainResult:
    """Train ``algorithm`` as ``config`` says (or with ``resume`` continue the run in ``config.output_dir``).

    ``on_step(step, record)`` runs after every step with that step's metrics; ``progress`` overrides
    ``logging.progress`` (the progress bar). The run holds ``output_dir/.lock`` throughout; a resumed
    run whose settings differ from the folder's ``config.yaml`` in ways that break continuity stops
    naming them, unless ``force``. SIGTERM and SIGINT stop the run cleanly after the step under way, with
    a checkpoint of that step (:mod:`sftrl_jax.signals`): :class:`~sftrl_jax.signals.Stopped` is raised.
    """
    if progress is not None:
        config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, progress=progress))
    initialize(config.distributed)
    with stop_requests(), owned_folder(config.output_dir, command=f"sftrl-jax {config.kind}",
                                       writer=is_writer()) as out:
        return _run(config, algorithm, out, resume=resume, hooks=hooks, on_step=on_step, force=force)


def _run(config, algorithm, out, *, resume, hooks, on_step, force) -> TrainResult:
    mesh = make_mesh(config.mesh)
    ctx = LoopContext(config=config, out=out, mesh=mesh, shards=data_parallel_size(mesh),
                      tokenizer=load_tokenizer(config.model.path))
    _log_layout(ctx)
    updates = algorithm.setup(ctx)
    ctx.optimizer, ctx.schedule = make_optimizer(config.optimizer, updates)
    ctx.graphdef, ctx.model_config, state, ctx.state_shardings = init_train_state(config.model, mesh, ctx.optimizer)
    ctx.abstract_state = abstract(state)
    algorithm.build(ctx, state)
    hooks = [*algorithm.hooks(), *hooks]
    checkpointer, state, meta = open_checkpoints(out, config.checkpoint, state, resume=resume)
    start = 0
    if meta is not None:
        if is_writer():
            check_continuity(out / "config.yaml", config, force=force)
            check_data_unchanged(out / DATA_RECORD, algorithm.data_files(), force=force)
        algorithm.load_state_dict(meta)
        start = int(meta["step"])
    if is_writer():  # the run's record, written once the folder is known to be this run's
        save_config(config, out / "config.yaml")
        write_text_atomic(out / DATA_RECORD, json.dumps(data_record(algorithm.data_files()), indent=1) + "\n")
    sinks = MetricSinks(config.logging, out, resume_step=start, plot_name=algorithm.plot_name,
                        plot_keys=algorithm.plot_keys, title=algorithm.plot_title, config=dataclasses.asdict(config))
    try:
        state, step = _steps(ctx, algorithm, state, start, checkpointer, sinks, hooks, on_step)
    finally:
        checkpointer.close()
        algorithm.close()
    final_dir = out / "final"
    save_pretrained(nnx.merge(ctx.graphdef, state["params"]), final_dir, tokenizer_dir=config.model.path)
    records = sinks.close()
    log.info("done: %d steps; final model in %s", step, final_dir)
    return TrainResult(output_dir=out, final_dir=final_dir, steps=step, params=state["params"], metrics=records)


def _steps(ctx, algorithm, state, start, checkpointer, sinks, hooks, on_step):
    """The loop proper: steps ``start + 1 .. total``, each measured, recorded, checkpointed."""
    total, logging_options = algorithm.total_steps, ctx.config.logging
    if start == 0:
        first = {}
        for hook in hooks:
            if hook.at_start:
                first.update(hook.fn(ctx.graphdef, state["params"], 0) or {})
        if first:
            sinks.write({"step": 0, **first})
    bar = tqdm(total=total, initial=start, desc=algorithm.name, dynamic_ncols=True,
               disable=not (logging_options.progress and is_writer()))
    step, saved = start, start
    try:
        while step < total:
            signum = agreed(requested())  # at a step boundary, the same on every process
            if signum is not None:
                _stop(ctx, signum, step, saved, state, algorithm, checkpointer, sinks)
            tick = time.perf_counter()
            state, metrics = algorithm.train_step(state, step)
            step += 1
            if any(k in metrics and not math.isfinite(metrics[k]) for k in algorithm.finite_keys):
                stop_on_nonfinite(step, ", ".join(f"{k}={metrics[k]}" for k in algorithm.finite_keys if k in metrics),
                                  checkpointer)
            record = {"step": step, **metrics}
            record.setdefault("seconds", time.perf_counter() - tick)
            budget_spent = step < total and _budget_spent(ctx.config.train.max_flops, metrics)
            last = step == total or budget_spent
            due = [hook for hook in hooks if hook.due(step, last)]
            for hook in due:
                record.update(hook.fn(ctx.graphdef, state["params"], step) or {})
            if step % logging_options.log_every == 0 or due or last:
                sinks.write(record)
            if checkpointer.save(step, state, {"step": step, **algorithm.state_dict()}, force=last):
                saved = step
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in algorithm.postfix_keys if k in metrics})
            if on_step is not None:
                on_step(step, record)
            if budget_spent:
                log.info("train.max_flops=%.3g reached at step %d; stopping", ctx.config.train.max_flops, step)
                break
        final = algorithm.finish(state, step)
        # a resumed run that was already finished has these records from the session that finished it
        recorded = {k for r in sinks.history() if r.get("step") == step for k in r} if step == start else set()
        if final and not set(final) <= recorded:
            sinks.write({"step": step, **final})
    finally:
        bar.close()
    return state, step


def _stop(ctx, signum, step, saved, state, algorithm, checkpointer, sinks):
    """Stop on signal ``signum`` after ``step`` finished steps: checkpoint ``step`` unless the last checkpoint
    is of it, flush the metrics and raise :class:`Stopped` with the one line the command line prints."""
    if step > saved:
        checkpointer.save(step, state, {"step": step, **algorithm.state_dict()}, force=True)
    checkpointer.wait()
    sinks.close()
    where = ctx.out if ctx.out is not None else "output_dir"
    if step == 0:
        raise Stopped(signum, f"stopped by {signal_name(signum)} before the first step; to continue, rerun the "
                              "same command with --resume")
    raise Stopped(signum, f"stopped by {signal_name(signum)} after step {step} (checkpoint step {step} in "
                          f"{where}/checkpoints); to continue, rerun the same command with --resume")


def _budget_spent(max_flops: float | None, metrics: dict) -> bool:
    """Whether the run's cumulative counted FLOPs (its :data:`sftrl_jax.flops.COUNTED_FLOPS` metrics) reached
    ``max_flops``."""
    return max_flops is not None and sum(metrics.get(k, 0.0) for k in COUNTED_FLOPS) >= max_flops


def _log_layout(ctx: LoopContext) -> None:
    """Log, once at start-up, the devices and the choices made from them (attention, decode path)."""
    from .models.attention import resolve_attention

    platform = ctx.mesh.devices.flat[0].platform
    model = ctx.config.model
    log.info("devices: %d x %s, mesh %s, %d data-parallel shards; attention %s (model.attention=%s)",
             ctx.mesh.size, platform, dict(ctx.mesh.shape), ctx.shards,
             resolve_attention(model.attention, platform), model.attention)
