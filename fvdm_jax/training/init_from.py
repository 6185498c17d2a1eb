"""Fine-tuning: the first train state from pretrained weights (`train.init_from=PATH`).

PATH is one of
- an inference checkpoint (DIR/params + DIR/config.json: the converter's output or an export),
- a training workdir (the EMA weights of its newest checkpoint that verifies),
- an official FVDM / Latte state_dict file (.pt/.pth/.bin/.ckpt, .safetensors, .npz), converted
  through fvdm_jax.convert.official with the model its shapes describe.
As the official train_video.py fine-tunes (`pretrained:`): the parameters that match this model by
name and shape load; the others start as creation starts them (a class table for another class
count, ...); the source's parameters with no place here are dropped. The EMA starts equal to the
loaded weights and the optimizer starts afresh; the step is 0, or with
`train.init_step_from_checkpoint` the source's step where it has one (a workdir's checkpoint
step, an official file's name `0250000.pt`). The fixed sin-cos tables are not parameters: another
frame count or grid simply gets its own. The state is built on the mesh with create_state's
shardings. `train.init_strict` makes any new or dropped parameter an error. One log block says
what was loaded, what is new and what was dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.errors import ConfigError
from fvdm_jax.models.dit import DiT, model_from_config
from fvdm_jax.runtime import files
from fvdm_jax.training.state import TrainState, abstract_ema_params

INFERENCE, WORKDIR, OFFICIAL = "inference checkpoint", "training workdir", "official state_dict"
# The DiT attributes that decide which pretrained parameters fit (compared for the log).
MODEL_FIELDS = ("hidden_size", "depth", "num_heads", "patch_size", "in_channels", "input_size",
                "num_frames", "learn_sigma", "num_classes", "class_dropout_prob")


@dataclasses.dataclass
class Pretrained:
    """Weights read from train.init_from, in this project's parameter layout."""

    path: str
    kind: str  # INFERENCE, WORKDIR or OFFICIAL
    params: dict  # name ('blocks/spatial/attn/qkv/kernel') -> numpy or jax array
    model_config: dict  # the model the weights belong to
    diffusion_config: dict | None  # None for official files (their process is the default one)
    step: int | None  # the source's training step, if it records one
    unplaced: list[str]  # official tensors that no FVDM / Latte DiT has a place for


@dataclasses.dataclass
class InitReport:
    """What init_from did, for the log and for tests."""

    pretrained: Pretrained
    start_step: int
    loaded: list[str]
    new: list[str]  # 'name (shape): why', initialized as at creation
    dropped: list[str]  # 'name (shape)' of the source, not used
    notes: list[str]
    loaded_values: int
    total_values: int

    def text(self) -> str:
        p = self.pretrained
        step = "no step" if p.step is None else f"step {p.step}"
        lines = [f"train.init_from={p.path} ({p.kind}, {step}): starting at step {self.start_step}",
                 f"  loaded {self.loaded_values / 1e6:.4g}M of {self.total_values / 1e6:.4g}M values, "
                 f"{len(self.loaded)} parameter arrays: {_grouped(self.loaded) or 'none'}",
                 f"  new, initialized as at creation: {'; '.join(self.new) or 'none'}",
                 f"  dropped from the source: {'; '.join(self.dropped) or 'none'}"]
        lines += [f"  {note}" for note in self.notes]
        lines.append("  EMA = the loaded weights; optimizer state fresh")
        return "\n".join(lines)


def source_kind(path: str) -> str:
    """Which kind of source PATH is, or a one-line ConfigError."""
    if files.isdir(path):
        if files.isfile(files.join(path, "config.json")) and files.isdir(files.join(path, "params")):
            return INFERENCE
        if files.isdir(files.join(path, "checkpoints")):
            return WORKDIR
        raise ConfigError(f"train.init_from={path} is a folder with neither params/ + config.json (an "
                          f"inference checkpoint) nor checkpoints/ (a training workdir)")
    if files.isfile(path):
        from fvdm_jax.convert.official import CHECKPOINT_SUFFIXES

        if os.path.splitext(str(path))[1].lower() in CHECKPOINT_SUFFIXES:
            return OFFICIAL
        raise ConfigError(f"train.init_from={path} is a file of unknown type; give an official "
                          f"state_dict ({', '.join(CHECKPOINT_SUFFIXES)}), an inference checkpoint "
                          f"folder or a training workdir")
    raise ConfigError(f"train.init_from={path} does not exist; give an inference checkpoint folder, a "
                      f"training workdir or an official .pt / .safetensors / .npz state_dict")


def _names(tree) -> dict[str, Any]:
    """{'blocks/spatial/attn/qkv/kernel': leaf} of a {'params': ...} tree (or the bare tree)."""
    if set(tree.keys()) == {"params"}:
        tree = tree["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def read_pretrained(path: str, config, mesh, rules) -> Pretrained:
    """The weights of PATH (see the module docstring), in this project's layout."""
    path = files.resolve(path)
    kind = source_kind(path)
    if kind == INFERENCE:
        from fvdm_jax.checkpoint.inference import load_inference_checkpoint

        params, saved = load_inference_checkpoint(path)
        return Pretrained(path, kind, _names(params), dict(saved["model"]), dict(saved["diffusion"]),
                          None, [])
    if kind == WORKDIR:
        from fvdm_jax.checkpoint.manager import TrainCheckpointer

        def source_model(saved):  # the saved model keys over this config's (for keys it lacks)
            stored = saved.get("model") or {}
            return {k: stored.get(k, v) for k, v in config.model.items()}

        ckpt = TrainCheckpointer(path, config.checkpoint, read_only=True)
        try:
            if ckpt.latest_step() is None:
                raise ConfigError(f"train.init_from={path}: {ckpt.directory} holds no checkpoint yet")
            step, ema, saved = ckpt.restore_newest_good_ema(
                lambda saved: abstract_ema_params(source_model(saved), mesh, rules))
        finally:
            ckpt.close()
        return Pretrained(path, kind, _names(ema), source_model(saved), dict(saved.get("diffusion") or {}),
                          int(step), [])
    from fvdm_jax.convert.official import convert_as_saved, read_checkpoint, step_from_file_name

    try:
        sd = read_checkpoint(path)
    except ImportError as error:  # torch missing for a .pt file: what the user can fix
        raise ConfigError(str(error)) from None
    ours = model_from_config(config.model)
    embed = sd.get("x_embedder.proj.weight")
    # The head count is not in the weights: this model's, when the widths agree (as torch's
    # load_state_dict would take them), else the named size of that width and depth.
    heads = ours.num_heads if embed is not None and embed.shape[0] == ours.hidden_size else None
    params, model_config, unplaced = convert_as_saved(sd, heads)
    return Pretrained(path, kind, _names(params), model_config, None, step_from_file_name(path), unplaced)


def _shape_text(shape) -> str:
    return f"({', '.join(str(int(d)) for d in shape)}{',' if len(shape) == 1 else ''})"


def _grouped(names) -> str:
    """'blocks/spatial (10), x_embedder (2)': loaded arrays by module, for a short log line."""
    groups: dict[str, int] = {}
    for name in names:
        parts = name.split("/")
        key = "/".join(parts[:2] if parts[0] == "blocks" else parts[:1])
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{key} ({count})" for key, count in groups.items())


def match(pretrained: Pretrained, abstract_params) -> tuple[dict[str, int], InitReport]:
    """{name: how many leading entries load} for each parameter of this model (its full first
    dim: all of it; 0: none; in between: the first blocks of a stacked block parameter, as a
    name-matched torch load takes blocks 0..L-1 of a deeper or shallower source), and the report
    (start_step and notes unset)."""
    ours = _names(abstract_params)
    theirs = pretrained.params
    chosen, loaded, new, values = {}, [], [], 0
    for name, spec in ours.items():
        source = theirs.get(name)
        shape = tuple(spec.shape)
        if source is not None and tuple(source.shape) == shape:
            chosen[name] = shape[0] if shape else 1
            loaded.append(name)
            values += math.prod(shape)
            continue
        if (source is not None and name.startswith("blocks/") and len(shape) > 1
                and tuple(source.shape[1:]) == shape[1:]):
            count = min(int(source.shape[0]), shape[0])  # blocks of the stack both have
            chosen[name] = count
            loaded.append(name)
            values += count * math.prod(shape[1:])
            if count < shape[0]:
                new.append(f"{name} blocks {count}..{shape[0] - 1}: the source has {source.shape[0]}")
            continue
        chosen[name] = 0
        why = "not in the source" if source is None else f"the source's is {_shape_text(source.shape)}"
        new.append(f"{name} {_shape_text(shape)}: {why}")
    dropped = [f"{name} {_shape_text(theirs[name].shape)}" for name in sorted(theirs) if name not in ours]
    dropped += [f"{name} {_shape_text(theirs[name].shape)}: blocks {ours[name].shape[0]}.."
                f"{theirs[name].shape[0] - 1}" for name in sorted(theirs)
                if name in ours and chosen[name] and theirs[name].shape[0] > ours[name].shape[0]
                and name.startswith("blocks/")]
    dropped += [f"{name} (no place in a DiT)" for name in pretrained.unplaced]
    total = sum(math.prod(spec.shape) for spec in ours.values())
    return chosen, InitReport(pretrained, 0, loaded, new, dropped, [], values, total)


def _model_notes(pretrained: Pretrained, model: DiT, diffusion_config) -> list[str]:
    notes = []
    try:
        source = model_from_config(pretrained.model_config)
    except (ValueError, TypeError, KeyError) as error:
        return [f"source model config unreadable ({error}); matched by name and shape only"]
    changed = [f"{k} {getattr(source, k)!r} -> {getattr(model, k)!r}" for k in MODEL_FIELDS
               if getattr(source, k) != getattr(model, k)]
    if changed:
        notes.append(f"model differs from the source: {'; '.join(changed)}")
    if source.num_frames != model.num_frames or source.input_size // source.patch_size != (
            model.input_size // model.patch_size):
        notes.append("fixed sin-cos tables (temp_embed / pos_embed) recomputed for this model's "
                     f"{model.num_frames} frames and {model.input_size // model.patch_size}^2 patches")
    if pretrained.diffusion_config:
        ours = dict(diffusion_config)
        differ = [f"{k} {pretrained.diffusion_config[k]!r} -> {ours[k]!r}" for k in sorted(ours)
                  if k in pretrained.diffusion_config and pretrained.diffusion_config[k] != ours[k]]
        if differ:
            notes.append(f"diffusion differs from the source's training: {'; '.join(differ)}")
    return notes


def _fresh_params(setup, seed: int):
    """The parameters exactly as create_state initializes them (same inputs, same key), sharded."""
    model = setup.model
    f, s, c = model.num_frames, model.input_size, model.in_channels

    def init(rng):
        y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
        return nn.unbox(model.init(rng, jnp.zeros((1, f, s, s, c), jnp.float32),
                                   jnp.zeros((1, f), jnp.int32), y))

    return jax.jit(init, out_shardings=setup.state_shardings.params)(jax.random.key(seed))


def _place(value, spec):
    """A loaded array on `spec`'s sharding; floating arrays in float32 (the EMA's precision)."""
    dtype = np.float32 if jnp.issubdtype(spec.dtype, jnp.floating) else spec.dtype
    if isinstance(value, jax.Array):
        return jax.device_put(value.astype(dtype), spec.sharding)
    host = np.asarray(value, dtype)
    return jax.make_array_from_callback(host.shape, spec.sharding, lambda index: host[index])


def _merge(source, count: int, spec, fresh):
    """One parameter of the first state: the source's (all of it, or its first `count` blocks
    followed by the fresh ones), or the fresh one."""
    shape = tuple(spec.shape)
    if count == 0:
        return fresh
    if count == (shape[0] if shape else 1):  # all of it (a deeper source: its first blocks)
        return _place(source if tuple(source.shape) == shape else source[:count], spec)
    head = source[:count]  # the first blocks, their layer axis unsharded
    sharding = jax.sharding.NamedSharding(spec.sharding.mesh,
                                          jax.sharding.PartitionSpec(None, *tuple(spec.sharding.spec)[1:]))
    head = _place(head, jax.ShapeDtypeStruct(tuple(head.shape), spec.dtype, sharding=sharding))
    join = lambda h, f: jnp.concatenate([h, f[count:].astype(h.dtype)])  # noqa: E731
    return jax.jit(join, out_shardings=spec.sharding)(head, fresh)


def state_from_pretrained(setup, config) -> tuple[TrainState, InitReport]:
    """The first train state of a fine-tuning run from config.train.init_from, and its report.

    setup: training.setup.build_setup(config). The state has setup.state_shardings; its params are the
    loaded weights (cast to model.param_dtype) where they fit, else the creation values."""
    train_cfg = config.train
    pretrained = read_pretrained(str(train_cfg.init_from), config, setup.mesh, setup.rules)
    abstract = setup.abstract_state.params
    chosen, report = match(pretrained, abstract)
    report.notes = _model_notes(pretrained, setup.model, config.diffusion)
    if bool(train_cfg.get("init_strict", False)) and (report.new or report.dropped):
        raise ConfigError(f"train.init_strict=True: {pretrained.path} does not fit this model (new: "
                          f"{'; '.join(report.new) or 'none'}; dropped: {'; '.join(report.dropped) or 'none'})"
                          f"; fix the model config, or set train.init_strict=False to re-initialize / drop them")
    if not report.loaded:
        raise ConfigError(f"train.init_from={pretrained.path}: no parameter of it fits this model (model "
                          f"config {pretrained.model_config}); fine-tune a model of the same width and depth")
    start = 0
    if bool(train_cfg.get("init_step_from_checkpoint", False)):
        if pretrained.step is None:
            logging.warning("train.init_step_from_checkpoint: %s records no step; starting at step 0",
                            pretrained.path)
        else:
            start = pretrained.step
    report.start_step = start

    fresh = _names(_fresh_params(setup, int(train_cfg.seed))) if report.new else {}
    specs = _names(abstract)
    merged = {name: _merge(pretrained.params.get(name), chosen[name], specs[name], fresh.get(name))
              for name in specs}
    pretrained.params = {}  # the host copies are no longer needed
    leaves = [merged[name] for name in specs]
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)

    def build(weights, step):
        params = jax.tree_util.tree_map(lambda w, s: w.astype(s.dtype), weights, abstract)
        ema = jax.tree_util.tree_map(lambda w: w.astype(jnp.float32), weights)
        return TrainState(step=step, params=params, ema_params=ema, opt_state=setup.optimizer.init(params),
                          first_nonfinite_step=jnp.full((), -1, jnp.int32))

    state = jax.jit(build, out_shardings=setup.state_shardings)(tree, np.asarray(start, np.int32))
    logging.info("%s", report.text())
    return state, report
