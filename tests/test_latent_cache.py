"""The latent cache end to end: videos -> --mode=encode -> LatentCacheSource -> training.

Uses videos written here with PyAV and a small random SD-architecture VAE (four down blocks, so
the f8 geometry is real) stored as a diffusers folder."""

import json
import os

import av
import jax
import numpy as np
import pytest

from fvdm_jax.config.load import load_config
from fvdm_jax.convert.diffusers_vae import diffusers_tensor_shapes
from fvdm_jax.convert.tensors import write_safetensors
from fvdm_jax.data import clips, latents
from fvdm_jax.data.latents import LatentCacheSource
from fvdm_jax.jobs.encode import FrameEncoder, encode_dataset
from fvdm_jax.models.vae import vae_from_config
from fvdm_jax.training.loop import train

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [8, 8, 8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "scaling_factor": 0.18215,
}
FRAME_COUNTS = (12, 9, 15)  # videos of different lengths; at 32x32 pixels -> 4x4x4 latents


def write_video(path, num_frames, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, 32, 32, 3))
    frames = np.clip(base + 6 * np.arange(num_frames)[:, None, None, None], 0, 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.bit_rate = 5_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def dataset_and_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i, count in enumerate(FRAME_COUNTS):
        write_video(root / f"clip{i}.mp4", count, seed=i)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    vae_dir = tmp_path_factory.mktemp("vae")
    (vae_dir / "config.json").write_text(json.dumps(VAE_CONFIG))
    shapes = diffusers_tensor_shapes(vae_from_config(VAE_CONFIG))
    rng = np.random.default_rng(0)
    weights = {
        name: (rng.standard_normal(shape) / np.sqrt(max(1, np.prod(shape[1:])))).astype(np.float32)
        for name, shape in sorted(shapes.items())
    }
    write_safetensors(str(vae_dir / "diffusion_pytorch_model.safetensors"), weights)
    return str(root), str(vae_dir)


def cache_config(videos, vae_dir):
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    config.model.input_size = 4  # 32 pixels / 8
    config.data.path = videos
    config.data.dataset = "ffs"
    config.data.image_size = 32
    config.data.frame_interval = 2
    config.data.cache_videos_per_shard = 2
    config.vae.checkpoint = vae_dir
    config.vae.encode_batch_size = 1
    return config


class CountingEncoder:
    def __init__(self, encoder):
        self.encoder, self.batch, self.vae, self.frames = encoder, encoder.batch, encoder.vae, 0

    def __call__(self, frames):
        self.frames += len(frames)
        return self.encoder(frames)


@pytest.fixture(scope="module")
def encoded(dataset_and_vae, tmp_path_factory):
    videos, vae_dir = dataset_and_vae
    workdir = str(tmp_path_factory.mktemp("run"))
    config = cache_config(videos, vae_dir)
    encoder = CountingEncoder(FrameEncoder(config.vae))
    out = encode_dataset(config, workdir, encoder=encoder)
    return config, workdir, out, encoder


def test_cache_holds_every_frame_and_its_mirror(encoded):
    config, _, out, encoder = encoded
    meta = latents.read_meta(out)
    assert meta["num_records"] == 3 and meta["flips"] and meta["dataset"] == "ffs"
    assert len(latents.shard_paths(out)) == 2  # 3 videos, 2 per shard
    assert encoder.frames == 2 * sum(FRAME_COUNTS)  # every frame and its mirror image
    assert encoder.encoder.traces == 1  # videos of any length: padded batches, one compilation
    source = LatentCacheSource(out, num_frames=4, frame_interval=2, seed=0)
    counts = sorted(source.record(i)["mean"].shape[0] for i in range(3))
    assert counts == sorted(FRAME_COUNTS)
    record = source.record(0)
    assert record["mean"].shape[1:] == (4, 4, 4) and record["mean_flip"].shape == record["mean"].shape
    assert not np.allclose(record["mean"], record["mean_flip"])


def test_cached_moments_equal_direct_encoding(encoded, dataset_and_vae):
    config, _, out, encoder = encoded
    from fvdm_jax.data.video import read_frames

    source = LatentCacheSource(out, num_frames=4, frame_interval=2, seed=0)
    record = source.record(0)
    videos, _ = dataset_and_vae
    frames = read_frames(os.path.join(videos, str(record["name"])))
    pixels = clips.augment_frames(frames, "ffs", 32, flip=True)
    mean, logvar = encoder.encoder(pixels)
    np.testing.assert_allclose(record["mean_flip"], mean, atol=1e-5)
    np.testing.assert_allclose(record["logvar_flip"], logvar, atol=1e-5)


def test_reads_draw_window_flip_and_posterior_sample_every_time(encoded):
    _, _, out, _ = encoded
    source = LatentCacheSource(out, num_frames=4, frame_interval=2, seed=3, sample_posterior=False)
    for index in range(12):  # several epochs of 3 videos
        example = source[index]
        assert example["video"].shape == (4, 4, 4, 4) and example["video"].dtype == np.float32
        rng = np.random.default_rng((3, index))
        record = source.record(index % 3)
        plan = clips.sample_clip("ffs", record["mean"].shape[0], 4, 2, rng)
        key = "mean_flip" if plan.flip else "mean"
        np.testing.assert_allclose(example["video"], record[key][plan.indices] * 0.18215, rtol=1e-6)
    sampled = LatentCacheSource(out, num_frames=4, frame_interval=2, seed=3)
    a, b = sampled[0]["video"], sampled[3]["video"]  # same video, next epoch
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(sampled[0]["video"], a)  # deterministic per (seed, index)


def test_encode_resumes_without_redoing_finished_shards(encoded, dataset_and_vae):
    config, workdir, out, encoder = encoded
    os.remove(latents.shard_paths(out)[-1])
    again = CountingEncoder(encoder.encoder)
    encode_dataset(config, workdir, encoder=again)
    last = FRAME_COUNTS[2]  # the third video is alone in the second shard
    assert again.frames == 2 * last
    assert latents.read_meta(out)["num_records"] == 3


def test_training_on_the_cache(encoded):
    config, workdir, _, _ = encoded
    config.data.source = "latents"
    config.train.num_steps = 2
    config.train.batch_size = 8
    config.checkpoint.async_save = False
    result = train(config, workdir)
    assert result.step == 2
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert all(np.isfinite(json.loads(line)["loss"]) for line in f)


def test_sampling_a_latent_model_decodes_with_the_vae(encoded, tmp_path):
    """After test_training_on_the_cache: i2v from a PNG (encoded by the VAE) and from the cache's
    clips; outputs are decoded pixels and frame 0 is the VAE round trip of the input."""
    from PIL import Image

    from fvdm_jax.jobs.sample import sample_job
    from fvdm_jax.sampling.sampler import VideoSampler
    from fvdm_jax.sampling.weights import load_sampling_params

    config, workdir, _, _ = encoded
    config.data.source = "latents"
    config.sample.task = "i2v"
    config.sample.num_steps = 2
    config.sample.num_videos = 2
    config.sample.batch_size = 2
    config.sample.fps = 4
    image = np.zeros((48, 40, 3), np.uint8)
    image[:, :20] = (200, 40, 90)
    Image.fromarray(image).save(tmp_path / "start.png")
    config.sample.inputs = str(tmp_path / "start.png")
    config.sample.output_dir = str(tmp_path / "from_png")
    with np.load(sample_job(config, workdir)) as data:
        assert data["videos"].shape == (2, 4, 32, 32, 3)
    config.sample.inputs = None  # the cache's latent clips condition directly
    config.sample.output_dir = str(tmp_path / "from_cache")
    with np.load(sample_job(config, workdir)) as data:
        assert data["videos"].shape == (2, 4, 32, 32, 3)
    assert os.path.isfile(tmp_path / "from_cache" / "media" / "video_00001.mp4")

    model_config, diffusion_config, params = load_sampling_params(config, workdir)
    sampler = VideoSampler.from_config(config, params, model_config=model_config,
                           diffusion_config=diffusion_config)
    assert sampler.pixel_shape == (4, 32, 32, 3)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
    out = sampler.run("i2v", jax.random.key(0), inputs=pixels)
    round_trip = sampler.to_pixels(sampler.to_model_space(pixels))
    np.testing.assert_allclose(out[:, 0], round_trip[:, 0], atol=1e-5)


def test_cache_errors(tmp_path, encoded):
    _, _, out, _ = encoded
    with pytest.raises(FileNotFoundError, match="not a finished latent cache"):
        LatentCacheSource(str(tmp_path), num_frames=4, frame_interval=2, seed=0)
    with pytest.raises(ValueError, match="holds 'ffs'"):
        LatentCacheSource(out, num_frames=4, frame_interval=2, seed=0, dataset="sky")
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    with pytest.raises(ValueError, match="data.path is not set"):
        encode_dataset(config, str(tmp_path))
    _ = jax  # the module runs on the 8 simulated devices of conftest
