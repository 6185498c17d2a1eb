"""fvdm_jax/runtime/sharding.py on 8 simulated CPU devices: parameter shardings from flax's logical rules,
the warning (or strict error) for dims the mesh does not divide, and the activation constraints
that the DiT's block boundaries get under `activation_context` (and only there)."""

import logging
import os
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fvdm_jax.config.load import load_config
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.models.dit import DiT
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.state import init_state
from fvdm_jax.training.step import JittedTrainStep, make_optimizer

# The rules of configs/default.py (the one place that holds them).
DEFAULT_RULES = shd.rules_from_config(
    load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")).mesh)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
AXES = ("data", "fsdp", "tensor")


def mesh_of(shape, axes=AXES):
    return shd.make_mesh({"shape": shape, "axes": axes})


def tiny_dit(hidden=32, heads=2, depth=2, scan_layers=True, num_classes=3):
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth,
               num_heads=heads, num_frames=4, num_classes=num_classes, scan_layers=scan_layers)


def inputs(model, batch=8):
    x = jax.random.normal(jax.random.key(1), (batch, model.num_frames, 8, 8, 4))
    t = (jnp.arange(batch * model.num_frames).reshape(batch, model.num_frames) * 37) % 1000
    y = jnp.arange(batch) % model.num_classes if model.num_classes else None
    return x, t, y


def boxed_params(model):
    return jax.eval_shape(model.init, jax.random.key(0), *inputs(model, 1))


def param(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


# --- (a) parameter shardings ----------------------------------------------------------------

# (layers, embed, qkv, heads, kv), (layers, embed, mlp), (layers, heads, kv, embed), (patch, embed),
# (embed, patch), (vocab, embed), (layers, mlp), (embed,): the same specs on every 3-axis mesh
# (size-1 axes included), the shard shapes differ.
EXPECTED_SPECS = {
    "params/blocks/spatial/attn/qkv/kernel": P(None, "fsdp", None, "tensor", None),
    "params/blocks/temporal/mlp/fc1/kernel": P(None, "fsdp", "tensor"),
    "params/blocks/spatial/attn/proj/kernel": P(None, "tensor", None, "fsdp"),
    "params/x_embedder/kernel": P(None, "fsdp"),
    "params/final_linear/kernel": P("fsdp", None),
    "params/y_embedder/embedding": P(None, "fsdp"),
    "params/blocks/spatial/adaLN/dense/bias": P(None, "tensor"),
    "params/t_embedder/fc2/bias": P("fsdp"),
}

EXPECTED_SHARD_SHAPES = {
    (8, 1, 1): {  # pure data parallelism: every parameter whole on every device
        "params/blocks/spatial/attn/qkv/kernel": (1, 32, 3, 2, 16),
        "params/blocks/temporal/mlp/fc1/kernel": (1, 32, 128),
        "params/x_embedder/kernel": (16, 32),
    },
    (1, 8, 1): {  # FSDP over 8: the width split 8 ways
        "params/blocks/spatial/attn/qkv/kernel": (1, 4, 3, 2, 16),
        "params/blocks/temporal/mlp/fc1/kernel": (1, 4, 128),
        "params/x_embedder/kernel": (16, 4),
    },
    (2, 2, 2): {  # width over fsdp=2, heads and MLP over tensor=2
        "params/blocks/spatial/attn/qkv/kernel": (1, 16, 3, 1, 16),
        "params/blocks/temporal/mlp/fc1/kernel": (1, 16, 64),
        "params/x_embedder/kernel": (16, 16),
    },
}


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_parameter_shardings_follow_the_rules(shape, caplog):
    model = tiny_dit()
    boxed = boxed_params(model)
    mesh = mesh_of(shape)
    with caplog.at_level(logging.WARNING):
        shardings = shd.logical_shardings(boxed, mesh, DEFAULT_RULES)
    assert not [r for r in caplog.records if "replicated" in r.getMessage()]
    for leaf in jax.tree_util.tree_leaves(shardings):
        assert isinstance(leaf, NamedSharding) and leaf.mesh == mesh
    for path, spec in EXPECTED_SPECS.items():
        assert param(shardings, path).spec == spec, path
    for path, shard_shape in EXPECTED_SHARD_SHAPES[shape].items():
        box = param(boxed, path)
        assert param(shardings, path).shard_shape(box.value.shape) == shard_shape, path
    # spec_for (kept for callers) agrees with the tree function.
    box = param(boxed, "params/blocks/spatial/attn/qkv/kernel")
    assert shd.spec_for(box.value.shape, box.names, mesh, DEFAULT_RULES) == EXPECTED_SPECS[
        "params/blocks/spatial/attn/qkv/kernel"]


@pytest.mark.parametrize("shape, divisor", [((8, 1, 1), 8), ((1, 8, 1), 8), ((2, 2, 2), 4)])
def test_batch_sharding_and_divisor(shape, divisor):
    mesh = mesh_of(shape)
    assert shd.batch_sharding(mesh, DEFAULT_RULES, 5).spec == P(("data", "fsdp"), None, None, None, None)
    assert shd.batch_divisor(mesh, DEFAULT_RULES) == divisor


def test_mesh_axes_the_mesh_lacks_are_dropped_from_the_rules():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = shd.logical_shardings(boxed_params(tiny_dit()), mesh, DEFAULT_RULES)
    assert param(shardings, "params/blocks/temporal/mlp/fc1/kernel").spec == P(None, "fsdp", None)
    data_only = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert shd.batch_sharding(data_only, DEFAULT_RULES, 2).spec == P("data", None)
    assert shd.batch_divisor(data_only, DEFAULT_RULES) == 8


def test_the_rule_priority_is_flax_s():
    # The first rule naming a logical axis wins; a taken mesh axis falls through to the next rule.
    mesh = mesh_of((2, 2, 2))
    rules = (("mlp", "fsdp"), ("embed", "fsdp"), ("embed", "tensor"))
    assert shd.spec_for((32, 128), ("embed", "mlp"), mesh, rules) == P("tensor", "fsdp")


# --- (b) non-divisible dims: one warning naming them, or an error when strict ------------------

QKV_DROPPED = ("params/blocks/spatial/attn/qkv/kernel dim 3 ('heads') of size 3 not divisible "
               "by tensor=2")


def test_non_divisible_dims_are_replicated_with_one_warning(caplog):
    model = tiny_dit(hidden=36, heads=3)  # 3 heads over tensor=2
    mesh = mesh_of((2, 2, 2))
    boxed = jax.eval_shape(lambda r: init_state(r, model, make_optimizer(load_config(
        os.path.join(CONFIGS, "tiny.py")).train), boxed=True), jax.random.key(0))
    with caplog.at_level(logging.WARNING):
        shardings = shd.logical_shardings(boxed, mesh, DEFAULT_RULES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0]
    assert QKV_DROPPED in message
    assert "params/blocks/temporal/attn/proj/kernel dim 1 ('heads') of size 3" in message
    # Params, EMA and both Adam moments share the path: each parameter is named once.
    assert message.count("params/blocks/spatial/attn/qkv/kernel dim") == 1
    assert "config.mesh.strict" in message
    # The fallback: only the non-dividing dim is replicated; the width stays FSDP-sharded.
    qkv = shardings.params["params"]["blocks"]["spatial"]["attn"]["qkv"]["kernel"]
    assert qkv.spec == P(None, "fsdp", None, None, None)
    ema_qkv = shardings.ema_params["params"]["blocks"]["spatial"]["attn"]["qkv"]["kernel"]
    assert ema_qkv.spec == qkv.spec


def test_strict_raises_one_line_naming_the_parameters():
    model = tiny_dit(hidden=36, heads=3)
    with pytest.raises(ValueError) as error:
        shd.logical_shardings(boxed_params(model), mesh_of((2, 2, 2)), DEFAULT_RULES,
                              strict=True)
    text = str(error.value)
    assert "\n" not in text and QKV_DROPPED in text
    assert "change config.mesh.shape or the model width" in text
    # A width 36 over fsdp=8 also names the embedding.
    with pytest.raises(ValueError, match=r"params/x_embedder/kernel dim 1 \('embed'\) of size 36 "
                                         r"not divisible by fsdp=8"):
        shd.logical_shardings(boxed_params(model), mesh_of((1, 8, 1)), DEFAULT_RULES,
                              strict=True)
    # strict changes nothing when every dim divides.
    shd.logical_shardings(boxed_params(tiny_dit()), mesh_of((2, 2, 2)), DEFAULT_RULES,
                          strict=True)


def test_the_mesh_config_reader():
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    assert config.mesh.strict is False and shd.strict_from_config(config.mesh) is False
    assert shd.strict_from_config({"shape": (1, 1, 1)}) is False
    assert shd.strict_from_config({"strict": True}) is True
    assert dict(shd.rules_from_config(config.mesh))["act_embed"] is None


# --- (c) activation constraints at the DiT block boundaries -----------------------------------

BATCH_CONSTRAINT = re.compile(
    r'sdy\.sharding_constraint %\S+ <@mesh, \[\{"data", "fsdp"\}, \{\}, \{\}, \{\}\]>')


@pytest.mark.parametrize("scan_layers", [True, False])
def test_activation_constraints_shard_the_batch_only_under_the_context(scan_layers):
    model = tiny_dit(depth=4, scan_layers=scan_layers, num_classes=0)
    x, t, _ = inputs(model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x, t))
    forward = jax.jit(model.apply)
    reference = forward(params, x, t)  # no rules, no mesh: the constraints are no-ops

    mesh = mesh_of((2, 4, 1))
    with shd.activation_context(mesh, DEFAULT_RULES):
        lowered = forward.lower(params, x, t)
        compiled = lowered.compile()
        out = forward(params, x, t)
    # After the patch embedding, after each spatial and temporal block (in the scan body, traced
    # once), and before the final layer: (B, F, T, D) / (B, T, F, D) with B over data x fsdp.
    assert len(BATCH_CONSTRAINT.findall(lowered.as_text())) >= 5
    # Partitioned for 8 devices: the video enters split 8 ways along the batch (1 per device).
    hlo = compiled.as_text()
    assert re.search(r"f32\[1,4,8,8,4\]\S* parameter\(\d+\), sharding=\{devices=\[8,1,1,1,1\]", hlo)
    assert out.sharding.spec == P(("data", "fsdp"))
    chex.assert_trees_all_close(out, reference, rtol=1e-6, atol=1e-6)

    # Rules alone or a mesh alone leave the model unconstrained. (Fresh jits: jax's trace cache
    # keys on the mesh context but not on flax's logical rules.)
    def fresh_text():
        return jax.jit(lambda *a: model.apply(*a)).lower(params, x, t).as_text()

    with nn.logical_axis_rules(DEFAULT_RULES):
        assert "sharding_constraint" not in fresh_text()
    with jax.set_mesh(mesh):
        assert "sharding_constraint" not in fresh_text()
    assert "sharding_constraint" not in fresh_text()


def test_the_jitted_train_step_is_traced_under_the_context():
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    model = tiny_dit(num_classes=0)
    optimizer = make_optimizer(config.train)
    mesh = mesh_of((2, 4, 1))
    rules = shd.rules_from_config(config.mesh)
    boxed = jax.eval_shape(lambda r: init_state(r, model, optimizer, boxed=True), jax.random.key(0))
    state_shardings = shd.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(lambda r: init_state(r, model, optimizer, boxed=False), jax.random.key(0)),
        state_shardings,
    )
    batch_shardings = {"video": shd.batch_sharding(mesh, rules, 5),
                       "label": shd.batch_sharding(mesh, rules, 1)}
    batch = {"video": jax.ShapeDtypeStruct((8, 4, 8, 8, 4), jnp.float32,
                                           sharding=batch_shardings["video"]),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch_shardings["label"])}
    step = JittedTrainStep(model, Schedule.from_config(config.diffusion), optimizer, config.train,
                           config.ptss, state_shardings, batch_shardings, rules=rules)
    assert step.mesh == mesh
    text = step.lower(abstract, batch).as_text()
    assert len(BATCH_CONSTRAINT.findall(text)) >= 5
    assert step.traces == 1
