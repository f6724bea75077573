"""The SFT step: exact global-token-mean accumulation, and the two bugs' arithmetic, against hand-written references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sft_fixtures import luffy_rows, make_model_dir
from sftrl_jax.data import SFTDataOptions, tokenize_sft
from sftrl_jax.data.batching import layout_step, pack_groups
from sftrl_jax.models import load_pretrained, load_tokenizer
from sftrl_jax.sft.step import (
    bug_example_weights,
    make_train_step,
    sequence_nll,
    supervised_token_counts,
    virtual_layout,
)
from sftrl_jax.sharding import make_mesh, named_sharding, place

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # the emulated bugs of one layout share one program

LR = 1.0  # plain SGD: the update is the gradient itself, so it is compared directly


@pytest.fixture(scope="module")
def setup(hf_checkpoint, tmp_path_factory):
    directory = make_model_dir(hf_checkpoint("qwen2_untied"), tmp_path_factory.mktemp("sft") / "model")
    tokenizer = load_tokenizer(directory)
    rows = (("mem", i, r) for i, r in enumerate(luffy_rows(16, seed=1)))
    examples, _ = tokenize_sft(rows, tokenizer, SFTDataOptions(max_length=256))
    lengths = [int(e.loss_mask.sum()) for e in examples]
    assert max(lengths) > 4 * min(lengths)  # very different response lengths
    return directory, examples


def _params(directory):
    model, _ = load_pretrained(directory)
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))


_RUNS = {}


def ours(directory, examples, *, devices, micro_batch_size, emulate_bug="none", pack=False, virtual=None):
    """Parameters after one of our SGD steps, and its metrics (memoised: several tests share runs).

    A bug is emulated on the ``virtual`` layout ``(ranks, micro_batch_size)``, by default the real one."""
    key = (str(directory), len(examples), devices, micro_batch_size, emulate_bug, pack, virtual)
    if key in _RUNS:
        return _RUNS[key]
    mesh = make_mesh({"fsdp": devices}, devices=jax.devices()[:devices])
    model, _ = load_pretrained(directory, mesh=mesh)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    micro_steps = len(examples) // (micro_batch_size * devices)
    ranks, virtual_micro = virtual or (devices, micro_batch_size)
    weights = None if emulate_bug == "none" else bug_example_weights(
        supervised_token_counts(examples), emulate_bug, ranks=ranks, micro_batch_size=virtual_micro)
    batch = layout_step(examples, micro_steps=micro_steps, shards=devices, micro_batch_size=micro_batch_size,
                        max_length=256, pack=pack, example_weights=weights)
    batch = {k: place(v, named_sharding((None, "batch", "length"), mesh)) for k, v in batch.items()}
    optimizer = optax.sgd(LR)
    step = jax.jit(make_train_step(graphdef, optimizer, lambda s: LR, emulate_bug=emulate_bug))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    new_state, metrics = step(state, batch)
    _RUNS[key] = jax.device_get(new_state["params"]), jax.device_get(metrics)
    return _RUNS[key]


_REFERENCE_FUNCTIONS = {}


def _reference_functions(directory):
    """The hand-written loss's jitted gradient and per-example nll sums, built once per model (the batch and
    the coefficients are arguments, so the tests' references of one batch shape share one compiled program)."""
    if directory not in _REFERENCE_FUNCTIONS:
        graphdef, _ = _params(directory)

        def nll_sums(p, ids, mask, attention):
            logits = nnx.merge(graphdef, p)(ids, attention_mask=attention)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(picked * mask[:, 1:], axis=1)

        def loss(p, ids, mask, attention, coefficients):
            return jnp.sum(coefficients * nll_sums(p, ids, mask, attention))

        _REFERENCE_FUNCTIONS[directory] = jax.jit(jax.grad(loss)), jax.jit(nll_sums)
    return _REFERENCE_FUNCTIONS[directory]


def sgd_reference(directory, examples, coefficients):
    """Hand-written reference: one full batch, each example right-padded on its own row (no micro-batches,
    no packing, no weights from our code); loss = sum_k coefficients[k] * (sum of -log p over example k's
    response tokens). Returns (parameters after one SGD step, parameters before, per-example nll sums)."""
    _, params = _params(directory)
    length = max(len(e.input_ids) for e in examples)
    ids = np.zeros((len(examples), length), np.int32)
    mask = np.zeros((len(examples), length), np.float32)
    for k, e in enumerate(examples):
        ids[k, :len(e.input_ids)] = e.input_ids
        mask[k, :len(e.input_ids)] = e.loss_mask
    attention = (np.arange(length)[None] < np.array([len(e.input_ids) for e in examples])[:, None])
    grad_fn, nll_fn = _reference_functions(directory)
    batch = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(attention))
    grads = grad_fn(params, *batch, jnp.asarray(coefficients, jnp.float32))
    after = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    return jax.device_get(after), jax.device_get(params), np.asarray(nll_fn(params, *batch))


def response_tokens(examples):
    return np.array([float(e.loss_mask[1:].sum()) for e in examples])


def relative_error(a, b, base):
    """max over parameters of ||a - b|| / ||b - base|| (error relative to the size of the update)."""
    errors = jax.tree.map(lambda x, y, z: np.linalg.norm(x - y) / max(np.linalg.norm(y - z), 1e-30), a, b, base)
    return max(jax.tree.leaves(errors))


def max_param_relative_error(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max() / np.abs(y).max(), a, b)))


@pytest.mark.slow
def test_grad_accum_matches_full_batch_for_any_split(setup):
    directory, examples = setup
    examples = examples[:8]
    tokens = response_tokens(examples)
    reference, before, nll = sgd_reference(directory, examples, np.full(8, 1.0 / tokens.sum()))
    runs = {f"1 device x {8 // m} micro-steps": ours(directory, examples, devices=1, micro_batch_size=m)
            for m in (8, 4, 2, 1)}
    runs["8 devices x 1 micro-step"] = ours(directory, examples, devices=8, micro_batch_size=1)
    runs["2 devices x 2 micro-steps, packed"] = ours(directory, examples, devices=2, micro_batch_size=2, pack=True)
    for name, (params, metrics) in runs.items():
        assert max_param_relative_error(params, reference) <= 1e-6, name
        assert relative_error(params, reference, before) <= 1e-4, name
        assert metrics["loss"] == pytest.approx(nll.sum() / tokens.sum(), rel=1e-5), name
        assert metrics["tokens"] == tokens.sum()


@pytest.mark.slow
def test_deepspeed_offload_keeps_only_first_and_last_micro_batch(setup):
    directory, examples = setup
    examples = examples[:8]  # 1 device, micro-batches of 2 -> N = 4 micro-steps
    n, tokens = 4, response_tokens(examples)
    # g_i = grad(sum over micro-batch i / (T / N)): the mean of the g_i is the correct gradient.
    # The bug hands the optimizer (g_0 + g_{N-1}) / N: examples 0,1 and 6,7 only.
    in_first_or_last = np.array([1, 1, 0, 0, 0, 0, 1, 1], np.float32)
    reference, before, _ = sgd_reference(directory, examples, in_first_or_last / (tokens.sum() / n) / n)
    params, metrics = ours(directory, examples, devices=1, micro_batch_size=2, emulate_bug="deepspeed_offload")
    assert relative_error(params, reference, before) <= 1e-4
    correct, correct_metrics = ours(directory, examples, devices=1, micro_batch_size=2)
    assert relative_error(params, correct, before) > 0.05  # measurably different
    assert metrics["loss"] == pytest.approx(correct_metrics["loss"], rel=1e-6)  # the true loss is still reported
    assert metrics["grad_norm"] < correct_metrics["grad_norm"]  # the bug under-estimates the norm


@pytest.mark.slow
def test_openrlhf_mean_of_means_per_micro_batch_and_shard(setup):
    directory, examples = setup  # 16 examples on 4 shards, micro-batches of 2 -> N = 2 micro-steps
    tokens = response_tokens(examples)
    group = np.arange(16) // 2  # (micro-step i, shard r) holds examples 2k, 2k+1 with k = 4i + r
    group_tokens = np.array([tokens[group == g].sum() for g in range(8)])
    reference, before, _ = sgd_reference(directory, examples, 1.0 / (group_tokens[group] * 8))
    params, _ = ours(directory, examples, devices=4, micro_batch_size=2, emulate_bug="openrlhf_mean_of_means")
    assert relative_error(params, reference, before) <= 1e-4
    correct, _ = ours(directory, examples, devices=4, micro_batch_size=2)
    assert relative_error(params, correct, before) > 0.02


@pytest.mark.slow
def test_mean_of_means_on_a_virtual_layout_not_the_mesh(setup):
    """The reference of the test above (4 ranks x 2 micro-steps x 2 sequences), emulated on 1 device with
    micro-batches of 8 (2 micro-steps) and, packed, on 2 devices: only the virtual layout matters."""
    directory, examples = setup
    tokens = response_tokens(examples)
    group = np.arange(16) // 2
    group_tokens = np.array([tokens[group == g].sum() for g in range(8)])
    reference, before, _ = sgd_reference(directory, examples, 1.0 / (group_tokens[group] * 8))
    for devices, micro, pack in ((1, 8, False), (2, 4, True)):
        params, _ = ours(directory, examples, devices=devices, micro_batch_size=micro, pack=pack,
                         emulate_bug="openrlhf_mean_of_means", virtual=(4, 2))
        assert relative_error(params, reference, before) <= 1e-4, (devices, micro, pack)


def test_virtual_layout_assigns_examples_as_layout_step_does():
    micro_step, rank, n = virtual_layout(24, ranks=3, micro_batch_size=2)
    assert n == 4
    # layout_step: micro-step i, shard r holds examples (i * shards + r) * micro_batch_size onwards
    for i in range(4):
        for r in range(3):
            first = (i * 3 + r) * 2
            assert list(micro_step[first:first + 2]) == [i, i] and list(rank[first:first + 2]) == [r, r]
    tokens = np.arange(1, 25, dtype=float)
    kept = bug_example_weights(tokens, "deepspeed_offload", ranks=3, micro_batch_size=2) > 0
    assert kept.tolist() == [i in (0, 3) for i in micro_step]  # micro-steps 0 and N-1 of every rank
    assert bug_example_weights(tokens, "deepspeed_offload", ranks=6, micro_batch_size=2).min() > 0  # N = 2: all
    means = bug_example_weights(tokens, "openrlhf_mean_of_means", ranks=3, micro_batch_size=2)
    group = micro_step * 3 + rank
    assert np.allclose([np.sum(means[group == g] * tokens[group == g]) for g in range(12)], 1 / 12)
    with pytest.raises(ValueError, match="not a whole number of micro-steps of 5 ranks x 2"):
        virtual_layout(24, ranks=5, micro_batch_size=2)


def test_a_bug_without_loss_weights_is_refused(setup):
    directory, examples = setup
    graphdef, params = _params(directory)
    batch = layout_step(examples[:2], micro_steps=1, shards=1, micro_batch_size=2, max_length=256, pack=False)
    step = make_train_step(graphdef, optax.sgd(LR), lambda s: LR, emulate_bug="both")
    state = {"params": params, "opt_state": optax.sgd(LR).init(params), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match="no 'loss_weights'"):
        jax.eval_shape(step, state, batch)


@pytest.mark.slow
def test_both_bugs_together(setup):
    directory, examples = setup
    examples = examples[:8]  # 1 device, N = 4: mean of means over micro-batches 0 and 3 only, divided by N
    tokens = response_tokens(examples)
    group = np.arange(8) // 2
    group_tokens = np.array([tokens[group == g].sum() for g in range(4)])
    keep = np.isin(group, [0, 3]).astype(np.float32)
    reference, before, _ = sgd_reference(directory, examples, keep / (group_tokens[group] * 4))
    params, _ = ours(directory, examples, devices=1, micro_batch_size=2, emulate_bug="both")
    assert relative_error(params, reference, before) <= 1e-4


def test_packing_gives_the_same_per_token_losses_as_padding(setup):
    directory, examples = setup
    graphdef, params = _params(directory)
    chosen = examples[:6]
    padded = layout_step(chosen, micro_steps=1, shards=1, micro_batch_size=6, max_length=256, pack=False)
    packed = layout_step(chosen, micro_steps=1, shards=1, micro_batch_size=6, max_length=256, pack=True)
    assert packed["input_ids"].shape[1] < 6  # several sequences really share a row
    groups = pack_groups([len(e.input_ids) for e in chosen], 256)

    def nll_of(batch):
        nll, mask = jax.jit(lambda p, b: sequence_nll(graphdef, p, b))(params, {k: v[0] for k, v in batch.items()})
        return np.asarray(nll), np.asarray(mask) > 0, batch["segment_ids"][0]

    nll, mask, _ = nll_of(padded)
    per_example_padded = [nll[k][mask[k]] for k in range(len(chosen))]
    nll, mask, segments = nll_of(packed)
    per_example_packed = {}
    for row, group in enumerate(groups):
        for segment, index in enumerate(group, start=1):
            in_segment = (segments[row] == segment) & mask[row]
            per_example_packed[index] = nll[row][in_segment]
    for k, expected in enumerate(per_example_padded):
        assert len(expected) == int(chosen[k].loss_mask[1:].sum())
        np.testing.assert_allclose(per_example_packed[k], expected, rtol=1e-5, atol=1e-5)
