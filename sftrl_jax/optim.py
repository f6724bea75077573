"""AdamW with warmup + decay schedules, global-norm clipping and a weight-decay mask (optax).

The optimizer state is always float32. With bfloat16 parameters the update is computed on a
float32 view of the parameters and cast back (small updates can round away in bf16; prefer
float32 parameters with ``compute_dtype: bfloat16`` when memory allows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from .config import OptimizerOptions


def make_schedule(options: OptimizerOptions, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``ceil(warmup_ratio * total_steps)`` steps, then the decay."""
    peak = options.learning_rate
    warmup = math.ceil(options.warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * options.min_lr_ratio
    if options.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=options.min_lr_ratio)
    elif options.lr_schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params) -> object:
    """Weight decay on matrices (projections, embeddings, LM head); not on norms or biases."""
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith("proj") or name in ("embed", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(options: OptimizerOptions, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                           optax.Schedule]:
    schedule = make_schedule(options, total_steps)
    parts = []
    if options.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(options.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=options.adam_b1, b2=options.adam_b2, eps=options.adam_eps,
                             weight_decay=options.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def to_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_opt_state(optimizer: optax.GradientTransformation, params):
    """float32 optimizer state whatever the parameter dtype."""
    return optimizer.init(to_float32(params))


def sum_micro_step_grads(grad_fn, params, xs):
    """``sum_i grad_fn(params, xs[i])[0]`` over the leading micro-step axis of ``xs``, in float32.

    ``grad_fn(params, x) -> (grads, aux)``; returns the gradient sum and ``aux`` stacked
    ``[micro_steps, ...]``. The SFT and GRPO steps both accumulate through this one ``lax.scan``.
    """

    def body(grad_sum, x):
        grads, aux = grad_fn(params, x)
        return jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads), aux

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return jax.lax.scan(body, zeros, xs)


def apply_update(optimizer: optax.GradientTransformation, grads, opt_state, params):
    """One optimizer update in float32; parameters keep their own dtype."""
    params32 = to_float32(params)
    updates, opt_state = optimizer.update(to_float32(grads), opt_state, params32)
    new_params = jax.tree.map(lambda p, p32, u: (p32 + u).astype(p.dtype), params, params32, updates)
    return new_params, opt_state
