"""Wan's VAE and text encoder in the jobs, end to end on CPU: --mode=encode turns a folder of
captioned videos into text-latent clips (the latents are the VAE's encoding of the same frames,
the contexts UMT5's hidden states of the captions' real tokens), the tiny Wan trains on them, and
--mode=sample makes an i2v video from a PNG and a prompt whose first latent frame is the PNG's
VAE encoding exactly (m = 0), decoded to pixel MP4 / GIF / PNG. The encoders are tiny and random:
a diffusers AutoencoderKLWan (z_dim 4 = the tiny Wan's in_channels), a transformers
UMT5EncoderModel (d_model 16 = its text_dim) and a sentencepiece model trained here."""

import io
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

from fvdm_jax.config import checks  # noqa: E402
from fvdm_jax.config.load import load_config  # noqa: E402
from fvdm_jax.convert.umt5 import convert_umt5  # noqa: E402
from fvdm_jax.convert.wan_vae import convert_wan_vae  # noqa: E402
from fvdm_jax.data import media  # noqa: E402
from fvdm_jax.data.clips import to_signed_unit  # noqa: E402
from fvdm_jax.data.tokenizer import UMT5Tokenizer  # noqa: E402
from fvdm_jax.data.video import read_video  # noqa: E402
from fvdm_jax.errors import ConfigError  # noqa: E402
from fvdm_jax.jobs.encode_wan import encode_wan_clips  # noqa: E402
from fvdm_jax.jobs.sample import sample_job  # noqa: E402
from fvdm_jax.models.umt5 import umt5_from_config  # noqa: E402
from fvdm_jax.models.wan_vae import decode_video, encode_video, wan_vae_from_config  # noqa: E402
from fvdm_jax.training.loop import train  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_tiny.py")
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
           temperal_downsample=[False, True, True], latents_mean=[0.3, -0.5, 0.1, 0.8],
           latents_std=[1.5, 0.7, 2.0, 1.2])
UMT5 = dict(vocab_size=180, d_model=16, d_ff=24, num_heads=2, d_kv=8, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16)
SENTENCES = ["a red car drives along a road", "a cat sits on the mat", "waves crash on rocks",
             "two dogs play in the snow", "a bird flies over the sea at sunset"]
TEXT_LENGTH = 24
FRAMES = 13  # 4 latent frames (wan_tiny's model.num_frames) = 1 + 4 * 3 video frames


def moving_video(frames, height, width, seed):
    """uint8 (frames, height, width, 3): a smooth colour pattern that shifts every frame."""
    y, x = np.mgrid[:height, :width]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, 3)
    video = [np.stack([np.sin(0.2 * x + 0.1 * y + phase[c] + 0.3 * t) for c in range(3)], -1)
             for t in range(frames)]
    return np.clip(np.round(127.5 + 100 * np.asarray(video)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_encoders")
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(**VAE).eval().save_pretrained(str(root / "vae"))
    transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)).eval().save_pretrained(
        str(root / "umt5"))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=60,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    (root / "umt5" / "spiece.model").write_bytes(model.getvalue())  # found beside the encoder
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    media.write_mp4(str(videos / "cat.mp4"), moving_video(15, 64, 64, 0))
    (videos / "cat.txt").write_text("a cat sits on the mat\n")
    media.write_mp4(str(videos / "sub" / "car.mp4"), moving_video(14, 72, 96, 1))  # cropped
    media.write_mp4(str(videos / "short.mp4"), moving_video(6, 64, 64, 2))  # < 13 frames
    (videos / "metadata.csv").write_text(
        "file_name,text\nsub/car.mp4,a red car drives along a road\nshort.mp4,waves\n")
    image = moving_video(1, 80, 64, 3)[0]
    media.write_png(str(root / "first.png"), image)
    return root


def tiny(assets, **overrides):
    config = load_config(CONFIG)
    config.encoders.vae = str(assets / "vae")
    config.encoders.text = str(assets / "umt5")
    config.encoders.text_length = TEXT_LENGTH
    config.data.path = str(assets / "videos")
    config.checkpoint.async_save = False
    config.sample.num_steps = 3
    for path, value in overrides.items():
        section, key = path.split(".")
        config[section][key] = value
    return config


@pytest.fixture(scope="module")
def encoded(assets, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("wan_encode"))
    config = tiny(assets)
    checks.check(config, "encode")
    out = encode_wan_clips(config, workdir)
    return config, workdir, out


def test_encode_writes_the_vae_latents_and_umt5_contexts(assets, encoded):
    config, workdir, out = encoded
    assert out == os.path.join(workdir, "text_latent_clips")
    record = json.load(open(os.path.join(out, "encode.json")))
    assert record["status"] == "done" and record["clips"] == 2 and record["skipped"] == ["short.mp4"]
    assert sorted(os.listdir(out)) == ["cat.mp4.npz", "encode.json", "sub"]
    # The latents equal the VAE's encoding of the video's first 13 frames.
    params, vae_config = convert_wan_vae(str(assets / "vae"))
    vae = wan_vae_from_config(vae_config)
    pixels = to_signed_unit(read_video(str(assets / "videos" / "cat.mp4"))[:FRAMES])
    expected = np.asarray(jax.jit(encode_video, static_argnums=0)(vae, params, pixels[None]))[0]
    with np.load(os.path.join(out, "cat.mp4.npz")) as clip:
        latents, context = clip["latents"], clip["context"]
        assert str(clip["caption"]) == "a cat sits on the mat"
        assert int(clip["context_length"]) == len(context)
    assert latents.shape == (4, 4, 8, 8)  # (C, F, h, w)
    np.testing.assert_array_equal(np.transpose(latents, (1, 2, 3, 0)), expected)
    # The context: UMT5's hidden states of the caption's tokens (its pieces and EOS).
    umt5_params, umt5_config = convert_umt5(str(assets / "umt5"))
    ids, mask = UMT5Tokenizer(str(assets / "umt5"), max_length=TEXT_LENGTH)(["a cat sits on the mat"])
    hidden = np.asarray(umt5_from_config(umt5_config).apply(umt5_params, ids, mask))[0]
    assert context.shape == (int(mask.sum()), 16) and 2 <= len(context) < TEXT_LENGTH
    print(f"context vs UMT5: max abs error {np.abs(context - hidden[:len(context)]).max():.1e}")
    np.testing.assert_allclose(context, hidden[: len(context)], rtol=1e-5, atol=1e-6)
    with np.load(os.path.join(out, "sub", "car.mp4.npz")) as clip:  # 72 x 96 -> cover 64 x 64
        assert clip["latents"].shape == (4, 4, 8, 8) and np.isfinite(clip["latents"]).all()
    # A rerun finds every clip written and encodes nothing; other settings are refused.
    # A killed run's temporary file is removed (else training would read it as a clip).
    stamp = os.stat(os.path.join(out, "cat.mp4.npz")).st_mtime_ns
    stale = os.path.join(out, "cat.mp4.tmp123-0123abcd.npz")
    open(stale, "wb").close()
    encode_wan_clips(config, workdir)
    assert os.stat(os.path.join(out, "cat.mp4.npz")).st_mtime_ns == stamp
    assert not os.path.exists(stale)
    with pytest.raises(ConfigError, match="other settings") as error:
        encode_wan_clips(tiny(assets, **{"encoders.frame_interval": 2}), workdir)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def trained(assets, encoded):
    _, workdir, out = encoded
    config = tiny(assets, **{"data.source": "text_latents", "data.path": out, "data.text_length": TEXT_LENGTH,
                             "train.num_steps": 3, "checkpoint.every_steps": 3})
    checks.check(config, "train")
    result = train(config, workdir)
    assert result.step == 3 and result.compilations == 1
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if "loss" in line]
    assert losses and all(np.isfinite(losses))
    return workdir


def test_i2v_from_a_png_and_a_prompt_keeps_the_image_and_decodes_pixels(assets, trained):
    png = str(assets / "first.png")
    config = tiny(assets, **{"sample.task": "i2v", "sample.inputs": png,
                             "sample.prompts": "a red car drives | a cat", "sample.cfg_scale": 2.0,
                             "sample.num_videos": 2, "sample.batch_size": 2})
    checks.check(config, "sample")
    path = sample_job(config, trained)
    with np.load(path) as data:
        latents, videos = data["latents"], data["videos"]
    assert latents.shape == (2, 4, 8, 8, 4) and videos.shape == (2, FRAMES, 64, 64, 3)
    assert videos.dtype == np.uint8 and videos.std() > 1
    # The first latent frame is the PNG's VAE encoding, bit for bit (m = 0).
    params, vae_config = convert_wan_vae(str(assets / "vae"))
    vae = wan_vae_from_config(vae_config)
    image = media.load_input(png, (64, 64), 1)  # 80 x 64 -> cover 64 x 64
    first = np.asarray(jax.jit(encode_video, static_argnums=0)(vae, params, image[None]))[0]
    for i in range(2):
        np.testing.assert_array_equal(latents[i, :1], first)
    assert not np.allclose(latents[0, 1:], latents[1, 1:])  # two prompts, two videos
    # The videos are the VAE's decoding of the sampled latents.
    pixels = np.asarray(jax.jit(decode_video, static_argnums=0)(vae, params, latents))
    error = np.abs(videos.astype(int) - media.to_uint8(pixels).astype(int)).max()
    print(f"videos vs the VAE's decoding of the latents: max {error} uint8 levels")
    assert error <= 1
    names = os.listdir(os.path.join(os.path.dirname(path), "media"))
    assert {"video_00000.mp4", "video_00001.gif", "batch_00000.png"} <= set(names)
    settings = json.load(open(os.path.join(os.path.dirname(path), "sample.json")))["settings"]
    assert settings["encoders"]["vae"] == str(assets / "vae")


def test_transition_between_two_video_files(assets, trained):
    """Clip A's last frame and clip B's first (sample.overlap = 1 latent frame each), each encoded
    alone, are latent frames 0 and F - 1 exactly; the data's contexts (no prompts) condition."""
    a, b = (str(assets / "videos" / name) for name in ("cat.mp4", "sub/car.mp4"))
    config = tiny(assets, **{"sample.task": "transition", "sample.inputs": f"{a},{b}",
                             "sample.overlap": 1, "sample.num_videos": 1, "sample.batch_size": 1})
    checks.check(config, "sample")
    with np.load(sample_job(config, trained)) as data:
        latents, videos = data["latents"], data["videos"]
    assert latents.shape == (1, 4, 8, 8, 4) and videos.shape == (1, FRAMES, 64, 64, 3)
    params, vae_config = convert_wan_vae(str(assets / "vae"))
    vae = wan_vae_from_config(vae_config)
    encode = jax.jit(encode_video, static_argnums=0)
    last = media.load_input(a, (64, 64))[-1:]
    first = media.load_input(b, (64, 64), 1)
    np.testing.assert_array_equal(latents[0, :1], np.asarray(encode(vae, params, last[None]))[0])
    np.testing.assert_array_equal(latents[0, 3:], np.asarray(encode(vae, params, first[None]))[0])


def test_a_video_without_a_caption_is_one_line(assets, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    media.write_mp4(str(folder / "dog.mp4"), moving_video(13, 64, 64, 4))
    config = tiny(assets, **{"data.path": str(folder)})
    checks.check(config, "encode")
    with pytest.raises(ConfigError, match="video dog.mp4 has no caption") as error:
        encode_wan_clips(config, str(tmp_path / "work"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "work" / "text_latent_clips")  # nothing started


@pytest.mark.parametrize("overrides, mode, expect", [
    ({"sample.prompts": "a cat", "encoders.text": None}, "sample", "sample.prompts='a cat' needs "
                                                                   "the UMT5 text encoder"),
    ({"sample.inputs": "a.png", "encoders.vae": None}, "sample", "needs the Wan VAE"),
    ({"encoders.vae": None}, "encode", "needs encoders.vae"),
])
def test_missing_encoders_are_one_line(assets, overrides, mode, expect):
    with pytest.raises(ConfigError, match=expect) as error:
        checks.check(tiny(assets, **overrides), mode)
    assert "\n" not in str(error.value)


def test_the_sample_job_refuses_prompts_without_a_text_encoder(assets, tmp_path):
    config = tiny(assets, **{"sample.prompts": "a cat", "encoders.text": None})
    with pytest.raises(ConfigError, match="needs the UMT5 text encoder") as error:
        sample_job(config, str(tmp_path))
    assert "\n" not in str(error.value)


def test_prompts_for_the_dit_are_one_line():
    config = load_config(os.path.join(os.path.dirname(CONFIG), "tiny.py"))
    config.sample.prompts = "a cat"
    with pytest.raises(ConfigError, match="sample.prompts is for text-conditioned Wan") as error:
        checks.check(config, "sample")
    assert "\n" not in str(error.value)
