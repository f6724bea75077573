"""Orbax checkpoints of a model: ``config.json`` (Hugging Face style) + ``params/`` (orbax).

This is the format ``sftrl-jax convert`` writes; the trainers' step checkpoints (parameters,
optimizer state, data position) build on the same orbax machinery. Restoring places every array
directly in its sharding on the current mesh, which may differ from the mesh that saved it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from .models.config import ModelConfig
from .models.decoder import Decoder, as_dtype
from .models.hf_io import abstract_model, param_shardings, read_json, write_config_and_tokenizer
from .models.options import ModelOptions
from .sharding import DEFAULT_RULES, Rules, single_device_mesh

PARAMS_DIR = "params"
# free inodes a step checkpoint may need (orbax writes a few dozen files and folders per item)
MIN_FREE_INODES = 256


def is_orbax_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir() and (Path(path) / "config.json").exists()


def save_model(model: Decoder, path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` as an orbax checkpoint directory (all processes must call this)."""
    directory = Path(path).absolute()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=True)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        write_config_and_tokenizer(model, directory, model.param_dtype.name, tokenizer_dir)
    return directory


def load_model(source: ModelOptions | str | os.PathLike, mesh: Mesh | None = None, *,
               rules: Rules = DEFAULT_RULES) -> tuple[Decoder, ModelConfig]:
    """Restore a model written by :func:`save_model`, sharded on ``mesh`` (default: one device).

    ``source`` is a :class:`ModelOptions` (the checkpoint directory is its ``path``; the parameters
    are cast to its ``dtype``) or the directory itself, built with the default options except that
    the parameters keep the dtype they were saved in.
    """
    path = source.path if isinstance(source, ModelOptions) else source
    directory = Path(path).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if not is_orbax_model_dir(directory):
        raise FileNotFoundError(f"{directory} is not a model checkpoint (needs config.json and {PARAMS_DIR}/)")
    hf = read_json(directory / "config.json")
    config = ModelConfig.from_hf_dict(hf, source_dir=str(directory))
    if isinstance(source, ModelOptions):
        options = source
    else:
        options = ModelOptions(path=os.fspath(path), dtype=hf.get("dtype") or hf.get("torch_dtype") or "float32")
    param_dtype = as_dtype(options.dtype)
    mesh = mesh or single_device_mesh()
    model = abstract_model(config, options, mesh, rules=rules)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, param_dtype, sharding=s),
                          nnx.to_pure_dict(nnx.state(model)), param_shardings(model))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / PARAMS_DIR, target)
    return nnx.merge(nnx.graphdef(model), restored), config


class NoRoomError(OSError, RuntimeError):
    """The checkpoint folder's file system has no room for the next checkpoint (a one-line error)."""


class TrainCheckpointer:
    """Step checkpoints of a training run with orbax's ``CheckpointManager``.

    Each checkpoint holds the train state (parameters, optimizer state, step) and a JSON ``meta``
    item (data-iterator position, RNG, anything the trainer needs to continue exactly). Saves are
    asynchronous; ``keep_last`` checkpoints are kept; a save whose step is not a multiple of
    ``save_every`` is skipped unless forced (the final step always is).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep_last: int = 3,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, save_interval_steps=max(save_every, 1),
            enable_async_checkpointing=async_save, create=True)
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        self.check_room(step, state)
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def check_room(self, step: int, state) -> None:
        """Refuse, in one line, a save the checkpoint folder's file system has no room for: fewer free bytes
        than the state's size or fewer than :data:`MIN_FREE_INODES` free inodes. Orbax's writer threads fail
        with pages of tracebacks (or wait on a folder they could not create) when the disk fills mid-save."""
        stats = os.statvfs(self.directory)
        free_bytes = stats.f_bavail * stats.f_frsize
        need_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes"))
        short = []
        if free_bytes < need_bytes:
            short.append(f"{free_bytes / 1e6:.1f} MB free, the checkpoint needs about {need_bytes / 1e6:.1f} MB")
        if stats.f_files and stats.f_favail < MIN_FREE_INODES:  # file systems without inode counts report 0
            short.append(f"{stats.f_favail} free inodes, a checkpoint needs up to {MIN_FREE_INODES}")
        if short:
            raise NoRoomError(errno.ENOSPC, f"{self.directory}: no room for the checkpoint of step {step} ("
                          f"{'; '.join(short)}); free some space, then rerun with --resume")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the folder's checkpoints, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def set_aside(self, steps) -> Path:
        """Move the checkpoints of ``steps`` (ones that do not restore) to ``damaged_checkpoints/`` beside the
        checkpoint folder, where later saves and ``keep_last`` leave them alone; all processes call this."""
        aside = self.directory.parent / "damaged_checkpoints"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target, copy = aside / str(step), 1
                while target.exists():
                    target, copy = aside / f"{step}.{copy}", copy + 1
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sftrl_jax: damaged checkpoints set aside")
        self.manager.reload()
        return aside

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restore onto ``abstract_state`` (ShapeDtypeStructs with the target shardings)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
