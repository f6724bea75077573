"""What the SFT and RL trainers share: run folder, train state, checkpoint/resume, NaN stop, export."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from .checkpointing import TrainCheckpointer
from .config import CheckpointOptions, ModelOptions, save_config
from .metrics import is_writer
from .models import load_pretrained
from .optim import init_opt_state
from .sharding import shardings_on

log = logging.getLogger("sftrl_jax.training")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the run stopped and kept its last good checkpoint."""


def prepare_output(config) -> Path:
    """Create ``config.output_dir`` and save the resolved config next to the run."""
    out = Path(config.output_dir)
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    return out


def init_train_state(model_options: ModelOptions, mesh, optimizer):
    """Load the model, and build ``{params, opt_state (float32), step}`` with every leaf on ``mesh``.

    Returns ``(graphdef, model_config, state, state_shardings)``.
    """
    model, model_config = load_pretrained(model_options.path, dtype=model_options.dtype,
                                          compute_dtype=model_options.compute_dtype, mesh=mesh,
                                          remat=model_options.remat, scan_layers=model_options.scan_layers,
                                          attention=model_options.attention,
                                          attention_block_size=model_options.attention_block_size,
                                          logits_chunk_size=model_options.logits_chunk_size)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    state, shardings = train_state(params, optimizer, mesh)
    return graphdef, model_config, state, shardings


def train_state(params, optimizer, mesh):
    """``({params, opt_state, step}, shardings)`` on ``mesh`` for parameters already placed on it."""
    shardings = {"params": shardings_on(params, mesh),
                 "opt_state": opt_state_shardings(optimizer, params, mesh),
                 "step": NamedSharding(mesh, PartitionSpec())}
    state = {"params": params,
             "opt_state": jax.jit(lambda p: init_opt_state(optimizer, p), out_shardings=shardings["opt_state"])(params),
             "step": jnp.zeros((), jnp.int32)}
    return jax.device_put(state, shardings), shardings


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
    state, meta = checkpointer.restore(latest, abstract)
    log.info("resumed from step %d (%s)", latest, checkpointer.directory / str(latest))
    return checkpointer, state, meta


def stop_on_nonfinite(step: int, detail: str, checkpointer: TrainCheckpointer):
    """Raise :class:`NonFiniteLossError` naming the step and the last good checkpoint."""
    checkpointer.wait()
    good = checkpointer.latest_step()
    raise NonFiniteLossError(f"non-finite loss/grad norm at step {step} ({detail}); stopped. Last good checkpoint: "
                             + (f"step {good} in {checkpointer.directory}" if good is not None else "none"))
