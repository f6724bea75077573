"""Log-probs and entropy over sequence chunks equal the full-logits path, values and gradients,
and never hold the whole ``[B, T, V]`` float32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax.losses import chunked_logprobs, entropy_from_logits, token_logprobs


def _problem(batch=2, length=37, embed=16, vocab=50, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(keys[0], (batch, length, embed), jnp.float32)
    head = jax.random.normal(keys[1], (embed, vocab), jnp.float32) * 0.5
    labels = jax.random.randint(keys[2], (batch, length), 0, vocab)
    return hidden, head, labels


def _loss(chunk_size, temperature, with_entropy):
    def loss(hidden, head, labels):
        logits_fn = lambda h: (h @ head).astype(jnp.float32) / temperature  # noqa: E731
        logp, entropy = chunked_logprobs(logits_fn, hidden, labels, chunk_size=chunk_size,
                                         with_entropy=with_entropy)
        weights = jnp.linspace(0.5, 1.5, logp.size).reshape(logp.shape)  # position-dependent, as agg weights are
        total = jnp.sum(weights * logp)
        return total + (0.01 * jnp.sum(weights * entropy) if with_entropy else 0.0), (logp, entropy)

    return loss


@pytest.mark.parametrize("chunk_size", [8, 10, pytest.param(37, marks=pytest.mark.slow),  # divides after padding,
                                        pytest.param(64, marks=pytest.mark.slow)])  # uneven tail, exact, larger
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_logprobs_equal_full_path_values_and_gradients(chunk_size, with_entropy):
    hidden, head, labels = _problem()
    temperature = 0.7
    grad_fn = lambda chunk: jax.jit(jax.value_and_grad(  # noqa: E731
        _loss(chunk, temperature, with_entropy), argnums=(0, 1), has_aux=True))(hidden, head, labels)
    (value, (logp, entropy)), grads = grad_fn(chunk_size)
    (ref_value, (ref_logp, ref_entropy)), ref_grads = grad_fn(0)  # chunk_size 0: the full path

    full_logits = (hidden @ head) / temperature  # independent reference for the values
    np.testing.assert_allclose(ref_logp, token_logprobs(full_logits, labels), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
    if with_entropy:
        np.testing.assert_allclose(ref_entropy, entropy_from_logits(full_logits), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    else:
        assert entropy is None and ref_entropy is None
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_do_not_materialise_full_logits():
    """The compiled gradient's scratch memory is far below one ``[B, T, V]`` float32 buffer."""
    batch, length, embed, vocab, chunk = 1, 4096, 64, 8192, 256
    hidden = jax.ShapeDtypeStruct((batch, length, embed), jnp.float32)
    head = jax.ShapeDtypeStruct((embed, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def temp_bytes(chunk_size):
        loss = _loss(chunk_size, 1.0, True)
        fn = jax.jit(jax.grad(lambda h, w, y: loss(h, w, y)[0], argnums=(0, 1)))
        return fn.lower(hidden, head, labels).compile().memory_analysis().temp_size_in_bytes

    full_logits_bytes = batch * length * vocab * 4  # 128 MiB
    chunk_logits_bytes = batch * chunk * vocab * 4  # 8 MiB
    chunked, full = temp_bytes(chunk), temp_bytes(0)
    assert full >= 2 * full_logits_bytes  # the full path holds the logits and their gradient (measured ~3x)
    assert chunked < 6 * chunk_logits_bytes, (chunked, full)  # a few chunk-sized buffers (measured ~4.1x)
