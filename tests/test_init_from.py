"""Fine-tuning from pretrained weights (train.init_from, fvdm_jax/training/init_from.py): the official
reference state_dicts loaded give the official outputs before any update, on the mesh with
create_state's shardings; a short run trains from them; mismatched tables are reported and
re-initialized as at creation (strict mode refuses them); a resumed run ignores init_from."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from fvdm_jax.config.load import load_config
from fvdm_jax.convert.__main__ import convert_official
from fvdm_jax.convert.tensors import write_safetensors
from fvdm_jax.errors import ConfigError
from fvdm_jax.jobs.export import export
from fvdm_jax.training.init_from import INFERENCE, OFFICIAL, WORKDIR, source_kind, state_from_pretrained
from fvdm_jax.training.loop import create_state, train
from fvdm_jax.training.setup import build_setup

HERE = os.path.dirname(__file__)
CONFIGS = os.path.join(HERE, "..", "configs")
VECTORS = os.environ.get("FVDM_REFERENCE_VECTORS", os.path.join(HERE, "data", "fvdm_official_tiny.npz"))


@pytest.fixture(scope="module")
def ref():
    with np.load(VECTORS, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def cfg(ref):
    return json.loads(str(ref["config_json"]))


def state_dict(ref, prefix, wrap=""):
    return {wrap + k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


def official_config(cfg, init_from=None, **overrides):
    """configs/tiny.py with the reference model's shape; 2 steps, no periodic checkpoint."""
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    for key in ("hidden_size", "depth", "num_heads", "num_frames", "input_size", "patch_size",
                "in_channels", "learn_sigma", "class_dropout_prob"):
        config.model[key] = cfg[key]
    config.model.num_classes = 0
    config.train.num_steps = 2
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.async_save = False
    config.train.init_from = init_from
    for path, value in overrides.items():
        section, key = path.split(".")
        config[section][key] = value
    return config


def names(tree):
    tree = tree["params"]
    return {"/".join(str(k.key) for k in p): np.asarray(jax.device_get(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_official(name, ours, want):
    ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
    err, tol = np.max(np.abs(ours - want)), 1e-4 * max(1.0, np.max(np.abs(want)))
    assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.3e}"


def to_ours(a):
    return np.asarray(a).transpose(0, 1, 3, 4, 2)  # official (B, F, C, H, W) -> channels-last


@pytest.fixture(scope="module")
def sources(ref, cfg, tmp_path_factory):
    """The reference state_dicts as the files a user has: a torch.compile'd .safetensors, an .npz,
    and the converter's inference checkpoint."""
    root = tmp_path_factory.mktemp("sources")
    paths = {}
    for kind, prefix in (("uncond", "uncond_sd/"), ("cond", "cond_sd/")):
        paths[f"{kind}.safetensors"] = str(root / f"{kind}.safetensors")
        write_safetensors(paths[f"{kind}.safetensors"], state_dict(ref, prefix, wrap="_orig_mod."))
        paths[f"{kind}.npz"] = str(root / f"{kind}.npz")
        np.savez(paths[f"{kind}.npz"], **state_dict(ref, prefix, wrap="module."))
        paths[f"{kind}.inference"] = convert_official(VECTORS, str(root / kind), prefix=prefix,
                                                      num_heads=cfg["num_heads"])
    return paths


@pytest.mark.parametrize("source", ["uncond.safetensors", "uncond.npz", "uncond.inference", "cond.safetensors"])
def test_official_weights_give_the_official_outputs_before_any_update(ref, cfg, sources, source):
    conditional = source.startswith("cond")
    config = official_config(cfg, sources[source], **{"mesh.shape": (2, 2, 2)})
    config.model.num_classes = cfg["num_classes"] if conditional else 0
    setup = build_setup(config)
    state, report = state_from_pretrained(setup, config)
    assert report.new == [] and report.dropped == [] and report.start_step == 0
    assert report.pretrained.kind == (INFERENCE if source.endswith("inference") else OFFICIAL)
    assert report.loaded_values == report.total_values

    x0, t = to_ours(ref["x0"]), ref["t"]
    labels = (ref["y"],) if conditional else ()
    want = to_ours(ref["model_cond_out" if conditional else "model_uncond_out"])
    apply = jax.jit(setup.model.apply)
    assert_official("params", apply(state.params, x0, t, *labels), want)
    assert_official("ema_params", apply(state.ema_params, x0, t, *labels), want)  # EMA = the weights
    # A fresh optimizer at step 0, the whole state on create_state's shardings.
    assert int(state.step) == 0 and int(state.first_nonfinite_step) == -1
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(state.opt_state))
    for leaf, sharding in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(setup.state_shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert any(len(s.spec) and any(s.spec) for s in jax.tree_util.tree_leaves(setup.state_shardings.params))


def test_an_official_training_checkpoint_fine_tunes_from_its_ema(ref, cfg, tmp_path):
    """An official training checkpoint ({'model', 'ema', 'opt'}, as train_video.py saves it):
    its raw weights differ from its EMA; fine-tuning starts from the EMA (what the official
    sampler loads), with the step from the file name."""
    torch = pytest.importorskip("torch")
    ema = state_dict(ref, "uncond_sd/")
    raw = {k: v if k in ("pos_embed", "temp_embed") else v + np.float32(0.5) for k, v in ema.items()}
    path = str(tmp_path / "0004000.pt")
    tensors = lambda sd: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}  # noqa: E731
    opt = {"state": {0: {"step": torch.tensor(4000.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    torch.save({"model": tensors(raw), "ema": tensors(ema), "opt": opt}, path)
    config = official_config(cfg, path, **{"train.init_step_from_checkpoint": True})
    setup = build_setup(config)
    state, report = state_from_pretrained(setup, config)
    assert report.pretrained.kind == OFFICIAL and report.start_step == 4000
    assert report.new == [] and report.dropped == []
    source = names({"params": report_source(ref, "uncond_sd/", cfg, num_classes=0)})
    for tree in (state.params, state.ema_params):
        for name, value in names(tree).items():
            np.testing.assert_array_equal(value, source[name])
    out = jax.jit(setup.model.apply)(state.params, to_ours(ref["x0"]), ref["t"])
    assert_official("params", out, to_ours(ref["model_uncond_out"]))


@pytest.fixture(scope="module")
def finetuned(cfg, sources, tmp_path_factory):
    """2 training steps from the official weights, checkpointed at the end; the log records."""
    workdir = str(tmp_path_factory.mktemp("finetuned"))
    config = official_config(cfg, sources["uncond.safetensors"])
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        result = train(config, workdir)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    return config, workdir, result, [r.getMessage() for r in records]


def test_a_short_run_trains_from_the_official_weights(finetuned):
    config, workdir, result, messages = finetuned
    assert result.step == 2 and not result.preempted
    losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    (block,) = [m for m in messages if m.startswith("train.init_from=")]
    assert "official state_dict" in block and "new, initialized as at creation: none" in block

    loaded, _ = state_from_pretrained(build_setup(config), config)
    start, params, ema = names(loaded.params), names(result.state.params), names(result.state.ema_params)
    moved = max(np.max(np.abs(params[k] - start[k])) for k in start)
    drift = max(np.max(np.abs(ema[k] - start[k])) for k in start)
    # Two Adam steps of lr 1e-3 move each weight by at most ~2e-3 from the official ones; the EMA
    # (decay 0.9999) started at them and moved by ~2e-4 of that.
    assert 0 < moved < 5e-3 and drift <= 3e-4 * moved + 1e-7


def test_another_class_count_is_reported_and_initialized_as_at_creation(ref, cfg, sources, caplog):
    config = official_config(cfg, sources["cond.safetensors"], **{"model.num_classes": 3})
    setup = build_setup(config)
    with caplog.at_level(logging.INFO):
        state, report = state_from_pretrained(setup, config)
    assert report.new == ["y_embedder/embedding (4, 64): the source's is (6, 64)"]
    assert report.dropped == [] and "num_classes 5 -> 3" in report.notes[0]
    assert any("y_embedder/embedding (4, 64)" in r.getMessage() for r in caplog.records)
    ours, created = names(state.params), names(create_state(setup, int(config.train.seed)).params)
    np.testing.assert_array_equal(ours["y_embedder/embedding"], created["y_embedder/embedding"])
    source = names({"params": report_source(ref, "cond_sd/", cfg, num_classes=cfg["num_classes"])})
    for name, value in ours.items():
        if name != "y_embedder/embedding":
            np.testing.assert_array_equal(value, source[name])

    # A conditional source into an unconditional model: the table is dropped; strict refuses.
    config = official_config(cfg, sources["cond.npz"])
    _, report = state_from_pretrained(build_setup(config), config)
    assert report.new == [] and report.dropped == ["y_embedder/embedding (6, 64)"]
    config.train.init_strict = True
    with pytest.raises(ConfigError, match=r"init_strict=True.*dropped: y_embedder/embedding \(6, 64\)") as error:
        state_from_pretrained(build_setup(config), config)
    assert "\n" not in str(error.value)
    config = official_config(cfg, sources["cond.safetensors"], **{"model.num_classes": 3,
                                                                   "train.init_strict": True})
    with pytest.raises(ConfigError, match=r"new: y_embedder/embedding \(4, 64\): the source's is \(6, 64\)"):
        state_from_pretrained(build_setup(config), config)


def report_source(ref, prefix, cfg, num_classes):
    """The reference state_dict converted as it is (the expected loaded values)."""
    from fvdm_jax.convert.official import convert_state_dict, unwrap_state_dict
    from fvdm_jax.models.dit import DiT

    model = DiT(input_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                num_frames=cfg["num_frames"], num_classes=num_classes, learn_sigma=cfg["learn_sigma"])
    return convert_state_dict(unwrap_state_dict(state_dict(ref, prefix)), model)["params"]


def test_other_frame_count_and_depth(ref, cfg, sources):
    source = names({"params": report_source(ref, "uncond_sd/", cfg, num_classes=0)})
    # 8 frames from a 4-frame model: every parameter fits; only the fixed tables change.
    config = official_config(cfg, sources["uncond.safetensors"], **{"model.num_frames": 8})
    _, report = state_from_pretrained(build_setup(config), config)
    assert report.new == [] and report.dropped == []
    assert any("num_frames 4 -> 8" in note for note in report.notes)
    assert any("recomputed for this model's 8 frames" in note for note in report.notes)

    # A shallower model takes the first blocks (as a name-matched torch load does), a deeper one
    # starts its extra blocks as at creation.
    config = official_config(cfg, sources["uncond.safetensors"], **{"model.depth": 2})
    state, report = state_from_pretrained(build_setup(config), config)
    qkv = names(state.params)["blocks/spatial/attn/qkv/kernel"]
    np.testing.assert_array_equal(qkv, source["blocks/spatial/attn/qkv/kernel"][:1])
    assert "blocks/spatial/attn/qkv/kernel (2, 64, 3, 4, 16): blocks 1..1" in report.dropped
    config = official_config(cfg, sources["uncond.safetensors"], **{"model.depth": 6})
    setup = build_setup(config)
    state, report = state_from_pretrained(setup, config)
    qkv = names(state.params)["blocks/temporal/attn/qkv/kernel"]
    created = names(create_state(setup, int(config.train.seed)).params)["blocks/temporal/attn/qkv/kernel"]
    np.testing.assert_array_equal(qkv[:2], source["blocks/temporal/attn/qkv/kernel"])
    np.testing.assert_array_equal(qkv[2:], created[2:])
    assert "blocks/temporal/attn/qkv/kernel blocks 2..2: the source has 2" in report.new


def test_workdir_and_export_sources_and_their_step(cfg, finetuned, tmp_path):
    _, workdir, result, _ = finetuned
    ema = names(result.state.ema_params)
    config = official_config(cfg, workdir)
    state, report = state_from_pretrained(build_setup(config), config)
    assert report.pretrained.kind == WORKDIR and report.pretrained.step == 2 and int(state.step) == 0
    for name, value in names(state.params).items():
        np.testing.assert_array_equal(value, ema[name])
    config.train.init_step_from_checkpoint = True
    state, report = state_from_pretrained(build_setup(config), config)
    assert int(state.step) == 2 == report.start_step

    exported = export(official_config(cfg), workdir, output=str(tmp_path / "export"))
    config = official_config(cfg, exported, **{"train.init_step_from_checkpoint": True})
    state, report = state_from_pretrained(build_setup(config), config)
    assert report.pretrained.kind == INFERENCE and report.pretrained.step is None and int(state.step) == 0
    for name, value in names(state.ema_params).items():
        np.testing.assert_array_equal(value, ema[name])


def test_a_resumed_run_ignores_init_from(cfg, finetuned, caplog):
    """Resuming the fine-tuned workdir with another (here unreadable) init_from: the run resumes
    at its step 2 without reading it, and says so in one line."""
    _, workdir, _, _ = finetuned
    config = official_config(cfg, "/nonexistent/pretrained.pt")
    steps = []
    with caplog.at_level(logging.INFO):
        result = train(config, workdir, step_hook=steps.append)
    assert steps == [] and result.step == 2 and result.compilations == 0  # nothing left to train
    (line,) = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
    assert line.startswith("train.init_from=/nonexistent/pretrained.pt ignored") and "at step 2" in line


def test_bad_paths_are_one_line(cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("weights")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for path, match in ((str(tmp_path / "missing.pt"), "does not exist"),
                        (str(tmp_path / "empty"), "neither params/"),
                        (str(tmp_path / "notes.txt"), "unknown type"),
                        (str(tmp_path / "run"), "holds no checkpoint")):
        config = official_config(cfg, path)
        with pytest.raises(ConfigError, match=match) as error:
            state_from_pretrained(build_setup(config), config)
        assert "\n" not in str(error.value) and path in str(error.value)
    assert source_kind(str(tmp_path / "run")) == WORKDIR
