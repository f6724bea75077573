"""Mesh construction and the logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from sftrl_jax.sharding import logical_to_pspec, make_mesh


def test_make_mesh_fills_the_free_axis():
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh({"fsdp": 1}, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("spec, message", [
    ({"pipeline": 2}, r"mesh: unknown axis 'pipeline'"),
    ({"data": -1, "fsdp": -1}, r"only one axis may be -1"),
    ({"data": 3, "fsdp": -1}, r"8 devices cannot be split"),
    ({"data": 2, "fsdp": 2}, r"multiply to 4, but there are 8 devices"),
    ({"tensor": 0}, r"mesh.tensor: size must be a positive integer or -1"),
])
def test_make_mesh_errors_name_the_axis(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)


def test_logical_rules_map_to_mesh_axes():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_pspec(("layers", "embed", "mlp"), mesh, shape=(2, 64, 128)) == P(None, "fsdp", "tensor")
    assert logical_to_pspec(("batch", "length"), mesh, shape=(8, 16)) == P(("data", "fsdp"), None)
    # Not divisible: replicated rather than an error (tiny vocabularies, odd head counts).
    assert logical_to_pspec(("vocab", "embed"), mesh, shape=(95, 64)) == P(None, "fsdp")
    # Mesh axes of size 1 are dropped from the spec.
    assert logical_to_pspec(("embed", "mlp"), make_mesh({"fsdp": 8}), shape=(64, 128)) == P("fsdp", None)


def test_fsdp_shards_parameters_and_optimizer_state(hf_checkpoint):
    """Per-device bytes of params + AdamW state with fsdp=8 are at most 1/7 of a replicated (data=8) layout,
    and every Adam moment is sharded exactly like its parameter."""
    from sftrl_jax.config import ModelOptions, OptimizerOptions
    from sftrl_jax.optim import make_optimizer
    from sftrl_jax.training import init_train_state

    optimizer, _ = make_optimizer(OptimizerOptions(weight_decay=0.1), 10)  # weight decay: a masked state too
    device = jax.devices()[0]

    def per_device(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)

    sizes = {}
    for name, spec in (("fsdp", {"fsdp": 8}), ("replicated", {"data": 8, "fsdp": 1})):
        _, _, state, _ = init_train_state(ModelOptions(path=str(hf_checkpoint("qwen2_untied"))), make_mesh(spec),
                                          optimizer)
        sizes[name] = per_device(state["params"]), per_device(state["opt_state"])
        if name == "fsdp":
            by_shape = {(x.shape, x.sharding.spec) for x in jax.tree.leaves(state["params"])}
            moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
            assert moments and all((m.shape, m.sharding.spec) in by_shape for m in moments)
    (fsdp_params, fsdp_opt), (rep_params, rep_opt) = sizes["fsdp"], sizes["replicated"]
    assert fsdp_opt >= 2 * fsdp_params * 0.9  # the moments are there (mu and nu, float32)
    assert fsdp_params + fsdp_opt <= (rep_params + rep_opt) / 7, sizes
