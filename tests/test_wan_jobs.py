"""The Wan jobs from a config, as the command line runs them: configs/wan_tiny.py trains on its
synthetic text-conditional latents (no files), --mode=export writes an inference checkpoint that
builds the model back, --mode=sample samples every task from the data's prompts and frames
(resumable, the given frames kept exactly), --mode=compile compiles the Wan train step and sampler
for a TPU slice, and the modes that stay DiT-only say so in one line."""

import json
import os

import jax
import numpy as np
import pytest

from fvdm_jax.checkpoint.inference import load_inference_checkpoint
from fvdm_jax.config import checks
from fvdm_jax.config.load import load_config
from fvdm_jax.data.pipeline import make_source
from fvdm_jax.errors import ConfigError
from fvdm_jax.jobs.export import export
from fvdm_jax.jobs.sample import sample_job
from fvdm_jax.models.build import flat_model_config, model_from_config
from fvdm_jax.training.loop import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_tiny.py")


def tiny(**overrides):
    config = load_config(CONFIG)
    config.train.num_steps = 6
    config.checkpoint.every_steps = 6
    config.checkpoint.async_save = False
    config.sample.num_steps = 4
    config.sample.batch_size = 2
    config.sample.num_videos = 3
    for path, value in overrides.items():
        section, key = path.split(".")
        config[section][key] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("wan_tiny"))
    config = tiny()
    checks.check(config, "train")
    result = train(config, workdir)
    assert result.step == 6 and result.compilations == 1
    return workdir


def test_synthetic_text_latents_follow_the_prompt():
    config = tiny()
    source = make_source(config.data, flat_model_config(config.model), workdir=None)
    a, b = source[0], source[1]
    assert a["video"].shape == (4, 8, 8, 4) and a["context"].shape == (8, 16)
    assert a["context_mask"].dtype == bool and a["context_mask"][0]
    # Padded tokens are zero, and the example is a pure function of its index.
    assert not a["context"][~a["context_mask"]].any()
    np.testing.assert_array_equal(source[0]["video"], a["video"])
    assert not np.array_equal(a["video"], b["video"])
    wide = make_source(config.data, dict(flat_model_config(config.model), latent_size=(4, 12)))
    assert wide[0]["video"].shape == (4, 4, 12, 4)


def test_export_builds_the_model_back(trained, tmp_path):
    config = tiny()
    checks.check(config, "export")
    out = export(config, trained, output=str(tmp_path / "export"))
    params, saved = load_inference_checkpoint(out)
    model = model_from_config(saved["model"])
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8, 4)).astype(np.float32)
    t = np.asarray([[0.0, 250.0, 500.0, 999.0]], np.float32)
    context = np.ones((1, 8, 16), np.float32)
    params = params if set(params) == {"params"} else {"params": params}
    y = model.apply(params, x, t, context)
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
    assert saved["diffusion"]["process"] == "flow"


@pytest.mark.parametrize("task, overrides", [
    ("i2v", {}),
    ("interpolate", {}),
    ("any_frame", {"sample.frame_indices": "1,2"}),
    ("extend", {"sample.overlap": 2}),
    ("transition", {}),
])
def test_sampling_keeps_the_given_latent_frames_exactly(trained, task, overrides):
    config = tiny(**{"sample.task": task, **overrides})
    checks.check(config, "sample")
    path = sample_job(config, trained)
    with np.load(path) as data:
        latents, videos = data["latents"], data["videos"]
    assert latents.shape == (3, 4, 8, 8, 4) and videos.shape == (3, 4, 8, 8, 3)
    source = make_source(config.data, flat_model_config(config.model))
    given = {"i2v": [0], "interpolate": [0, 3], "any_frame": [1, 2], "extend": [0, 1],
             "transition": [0, 3]}[task]
    free = [i for i in range(4) if i not in given]
    for i in range(3):
        clip = source[i]["video"]
        if task == "transition":  # example 2i's last frame, then example 2i + 1's first
            clip = np.stack([source[2 * i]["video"][-1]] * 3 + [source[2 * i + 1]["video"][0]])
        np.testing.assert_array_equal(latents[i][given], clip[given])  # m = 0: exactly
        assert not np.allclose(latents[i][free], clip[free], atol=1e-3)
    assert json.load(open(os.path.join(os.path.dirname(path), "sample.json")))["compilations"] == 1


def test_generate_is_resumable_and_writes_media(trained, tmp_path):
    out = str(tmp_path / "generate")
    config = tiny(**{"sample.output_dir": out})
    first = sample_job(config, trained)
    with np.load(first) as data:
        latents = data["latents"]
    assert np.isfinite(latents).all() and latents.std() > 0.1
    names = sorted(os.listdir(os.path.join(out, "media")))
    assert "video_00000.mp4" in names and "batch_00000.png" in names
    # A rerun finds every batch done and samples nothing; the result is the same.
    again = sample_job(config, trained)
    record = json.load(open(os.path.join(out, "sample.json")))
    assert record["batches_sampled_now"] == 0
    with np.load(again) as data:
        np.testing.assert_array_equal(data["latents"], latents)
    # Other settings into the same folder are refused.
    with pytest.raises(ConfigError, match="other settings or weights"):
        sample_job(tiny(**{"sample.output_dir": out, "sample.num_steps": 3}), trained)


@pytest.mark.parametrize("overrides, expect", [
    ({"sample.task": "progressive"}, "a Wan model samples generate, i2v"),
    ({"sample.task": "transition", "sample.overlap": 2}, "transition overlap=2 must be"),
    ({"sample.task": "any_frame"}, "needs sample.frame_indices"),
    ({"sample.inputs": "a.png"}, "needs the Wan VAE"),
])
def test_bad_wan_sample_settings_are_one_line(trained, overrides, expect):
    with pytest.raises(ConfigError, match=expect) as error:
        sample_job(tiny(**overrides), trained)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("mode", ["eval"])  # encode: tests/test_wan_encoders_e2e.py
def test_dit_only_modes_are_one_line(mode):
    with pytest.raises(ConfigError, match=f"--mode={mode} is DiT-only") as error:
        checks.check(tiny(), mode)
    assert "\n" not in str(error.value)


def test_wan_compiles_for_a_tpu_slice(tmp_path):
    pytest.importorskip("libtpu", reason="--mode=compile needs libtpu")
    from fvdm_jax.jobs import compile as compile_job

    config = tiny(**{"compile.topology": "v5e:2x2", "mesh.shape": (2, 2, 1),
                     "compile.programs": ("train_step", "sample")})
    checks.check(config, "compile")
    records, text = compile_job.compile_job(config, str(tmp_path))
    assert [r["program"] for r in records] == ["train_step", "sample"]
    assert all(r["fits"] and r["chips"] == 4 for r in records)
    train_step = records[0]
    assert train_step["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert train_step["model"]["architecture"] == "wan"
    # FSDP: parameters are gathered, gradients reduce-scattered.
    assert train_step["collectives"]["all-gather"]["count"] > 0
    assert train_step["collectives"]["reduce-scatter"]["count"] > 0
    assert records[1]["num_steps"] == 4 and jax.device_count() >= 1


def test_wan_encoders_compile_for_a_tpu_slice(tmp_path):
    """--mode=compile of a Wan config compiles its own encoders on one chip each, from the
    config.json of encoders.vae / encoders.text alone (no weights): the Wan VAE's encode of
    1 + 4 (F - 1) frames and decode of the latents back, and UMT5 on encoders.text_length tokens;
    FVD stays DiT-only."""
    pytest.importorskip("libtpu", reason="--mode=compile needs libtpu")
    from fvdm_jax.jobs import compile as compile_job

    vae, text = tmp_path / "vae", tmp_path / "text_encoder"
    vae.mkdir(), text.mkdir()
    (vae / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLWan", "base_dim": 4, "z_dim": 4, "dim_mult": [1, 1, 1],
        "num_res_blocks": 1, "temperal_downsample": [True, True],
        "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}))
    (text / "config.json").write_text(json.dumps({
        "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_heads": 4, "num_layers": 2,
        "feed_forward_proj": "gated-gelu", "torch_dtype": "float32"}))
    config = tiny(**{"compile.topology": "v5e:2x2", "mesh.shape": (2, 2, 1),
                     "compile.programs": ("vae_encode", "vae_decode", "text_encode", "fvd_features"),
                     "encoders.vae": str(vae), "encoders.text": str(text),
                     "encoders.text_length": 8})
    config.model.wan.latent_size = (2, 4)
    checks.check(config, "compile")
    records, text_report = compile_job.compile_job(config, str(tmp_path / "work"))
    encode, decode, umt5, fvd = records
    for record in (encode, decode, umt5):
        assert record["fits"] is True and record["mesh"] == {"one chip": 1}
        assert record["memory_gib"]["arguments"] > 0 and not any(
            kind["count"] for kind in record["collectives"].values())  # nothing crosses chips
        assert f"{record['program']}: one chip" in text_report
    # 4 latent frames of 2 x 4 -> 1 + 4 * 3 = 13 frames of 8 x 16 pixels (spatial factor 4):
    # one video encoded, a batch of sample.batch_size = 2 decoded.
    assert (encode["video_shape"], encode["latent_shape"]) == ([1, 13, 8, 16, 3], [1, 4, 2, 4, 4])
    assert (decode["video_shape"], decode["latent_shape"]) == ([2, 13, 8, 16, 3], [2, 4, 2, 4, 4])
    assert encode["vae_config"] == str(vae / "config.json")
    assert encode["memory_gib"]["outputs"] < decode["memory_gib"]["outputs"]  # latents < pixels
    assert (umt5["tokens"], umt5["d_model"], umt5["param_dtype"]) == ([1, 8], 16, "float32")
    assert fvd["fits"] is None and "DiT-only" in fvd["skipped"]
    with open(tmp_path / "work" / "compile.json") as f:
        assert [r["program"] for r in json.load(f)] == [r["program"] for r in records]
    # The Wan 2.1 VAE (no encoders.vae) makes 16 channels, the tiny Wan takes 4: one line.
    config.encoders.vae, config.compile.programs = None, ("vae_encode",)
    (skipped,), _ = compile_job.compile_job(config, str(tmp_path / "work"))
    assert skipped["fits"] is None and "16-channel latents" in skipped["skipped"]
