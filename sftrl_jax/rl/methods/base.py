"""What an RL method is: a :class:`PolicyMethod` record, and the registry ``rl.method`` names resolve in.

A method is everything that varies between GRPO-family algorithms: its per-token loss
(:meth:`PolicyMethod.objective`), its advantages, whether a group holds a demonstration and how that
demonstration is trained, the extra inputs its update takes, and its defaults for any ``rl`` setting
left unset. The update around it (:func:`sftrl_jax.rl.step.make_policy_update`) is shared: log-probs,
truncated importance sampling, the KL and entropy terms, aggregation (``rl.agg_mode``) and exact
accumulation over micro-batches. Each method lives in one file of this package and registers itself
with :func:`register`; the package imports every module in it, so adding a file is enough.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from ..algorithms import compute_advantages


@dataclasses.dataclass
class Objective:
    """A method's loss on one batch, per token, before the shared update aggregates it.

    ``policy`` ``[B, R]`` is aggregated with ``rl.agg_mode`` over the policy tokens (every response token,
    or only the sampled ones when the method trains demonstrations with a term of its own) and scaled per
    row by ``policy_scale`` (None: not scaled); ``demonstration`` ``[B, R]`` (optional) is a token mean
    over demonstration tokens scaled by ``demonstration_scale``. ``stats`` are per-token metrics, logged as
    token means over every response token.
    """

    policy: jax.Array
    stats: dict[str, jax.Array]
    policy_scale: jax.Array | float | None = None
    demonstration: jax.Array | None = None
    demonstration_scale: jax.Array | float = 0.0


class PolicyMethod:
    """One RL method (``rl.method: <name>``). Subclass, set the class attributes, implement :meth:`objective`,
    and decorate with :func:`register`."""

    name: ClassVar[str]
    # the settings every method starts from (verl's GRPO); a method's ``defaults`` add to these. Each key is
    # an ``rl`` field whose declared default is null (the loader fills it with the method's value)
    base_defaults: ClassVar[dict[str, Any]] = {
        "norm_adv_by_std": True, "clip_low": 0.2, "clip_high": 0.2, "clip_c": 3.0, "agg_mode": "token-mean",
        "entropy_coef": 0.0, "entropy_agg": "loss", "clip_on_policy": True,
    }
    defaults: ClassVar[dict[str, Any]] = {}
    # None: every group member is sampled. "policy": each group is ``sampling.n - 1`` samples and the
    # prompt's demonstration, trained by the policy loss. "separate": the same groups, the demonstration
    # trained by the method's own ``Objective.demonstration`` term (and left out of the policy term)
    demonstrations: ClassVar[Literal["policy", "separate"] | None] = None
    # extra per-row float32 inputs of the update batch (values from :meth:`step_inputs`)
    row_inputs: ClassVar[tuple[str, ...]] = ()
    # advantages relative to the group's other members (:meth:`advantages`): a group of one, or of identical
    # greedy samples, has zero advantages and trains on nothing, so the config refuses them
    group_relative: ClassVar[bool] = True

    def resolved_defaults(self) -> dict[str, Any]:
        return {**self.base_defaults, **self.defaults}

    def validate(self, cfg) -> None:
        """Refuse settings the method cannot run as intended (a :class:`sftrl_jax.config.ConfigError` naming
        the ``rl`` key and why); called once the defaults are filled in."""

    def advantages(self, rewards: np.ndarray, off_policy: np.ndarray, group_size: int, cfg) -> np.ndarray:
        """One advantage per sequence from rewards laid out as consecutive groups: group-relative (GRPO)."""
        return np.asarray(compute_advantages(rewards, group_size, norm_by_std=cfg.norm_adv_by_std))

    def step_inputs(self, cfg, step: int, total_steps: int, rows: int) -> dict[str, np.ndarray]:
        """Values of :attr:`row_inputs` for step ``step + 1`` (``rows`` sequences)."""
        return {}

    def objective(self, logp: jax.Array, batch: dict, cfg) -> Objective:
        """The per-token loss of ``batch`` (``old_logp``, ``advantages``, ``response_mask``,
        ``response_off_policy`` and :attr:`row_inputs`) at the current log-probs ``logp`` ``[B, R]``."""
        raise NotImplementedError


METHODS: dict[str, PolicyMethod] = {}


def register(cls: type[PolicyMethod]) -> type[PolicyMethod]:
    """Add ``cls`` to the registry under ``cls.name``; its defaults must name null-defaulted ``rl`` fields."""
    from ..config import RLSection

    nullable = {f.name for f in dataclasses.fields(RLSection) if f.default is None}
    method = cls()
    bad = sorted(set(method.resolved_defaults()) - nullable)
    if bad:
        raise TypeError(f"rl.method {cls.name!r}: defaults for {bad}, which are not rl settings with a null default "
                        f"(the ones a method may set: {sorted(nullable)})")
    if cls.name in METHODS:
        raise TypeError(f"rl.method {cls.name!r} is registered twice "
                        f"({type(METHODS[cls.name]).__name__}, {cls.__name__})")
    METHODS[cls.name] = method
    return cls


def get_method(name: str) -> PolicyMethod:
    """The registered method ``name``; a one-line error naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown RL method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def per_row(value, ndim: int):
    """A scalar or per-row ``[B]`` value broadcastable against ``[B, R]`` arrays."""
    value = jnp.asarray(value, jnp.float32)
    return jnp.reshape(value, value.shape + (1,) * (ndim - value.ndim))
