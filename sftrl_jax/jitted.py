"""One declaration per jitted function: what the trainers run and what ``sftrl-jax compile`` compiles.

An algorithm declares each of its jitted functions once, as a :class:`JitSpec` (the function, the
abstract arguments of the largest call a run makes, the shardings and donation); its trainer calls
:meth:`JitSpec.jit` and ``sftrl-jax compile`` lowers the same object with :attr:`JitSpec.args` for a
TPU slice or GPU host. Nothing else builds these functions, so the two cannot disagree about an input,
a sharding or a donated buffer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class JitSpec:
    fn: Callable
    args: tuple  # jax.ShapeDtypeStruct trees (with shardings) of the largest call a run makes
    in_shardings: Any = None  # None: jit's default (from the arguments)
    out_shardings: Any = None
    donate_argnums: tuple[int, ...] = ()
    # for the compile report: the sftrl_jax.flops count of the call ``args`` describe, the arrays that stay
    # alive on the devices beside it (e.g. the optimizer state while log-probs are computed), and its shapes
    model_flops: float | None = None
    resident: Any = None
    note: str = ""

    def jit(self):
        """The function as the trainer runs it."""
        kwargs = {"donate_argnums": self.donate_argnums}
        if self.in_shardings is not None:
            kwargs["in_shardings"] = self.in_shardings
        if self.out_shardings is not None:
            kwargs["out_shardings"] = self.out_shardings
        return jax.jit(self.fn, **kwargs)

    def lower(self):
        """The function lowered for its abstract arguments (what ``sftrl-jax compile`` compiles)."""
        return self.jit().lower(*self.args)


def sds(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def placed(shapes, shardings):
    """ShapeDtypeStructs of ``shapes``' leaves, each with its sharding from ``shardings`` (a matching tree)."""
    return jax.tree.map(lambda x, sharding: sds(x.shape, x.dtype, sharding), shapes, shardings)


def abstract(tree):
    """``tree``'s arrays (or ShapeDtypeStructs) as ShapeDtypeStructs with their shardings."""
    return jax.tree.map(lambda x: sds(x.shape, x.dtype, getattr(x, "sharding", None)), tree)


def without_params(state: dict) -> dict:
    """The train state's other parts (optimizer state, step): resident while a function reads only the params."""
    return {k: v for k, v in state.items() if k != "params"}


@contextlib.contextmanager
def compilation_cache(directory: Path):
    """Keep compiled XLA programs in ``directory`` while the block runs (JAX's persistent cache).

    A command that runs several trainings of the same shapes in one process (the experiments' seeds,
    crosscheck's replays) compiles the same programs again, since each ``run_sft`` / ``run_rl`` builds
    its own jitted step; with the cache the later runs load them instead. A cache the user configured
    (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
        cache.reset_cache()
