"""The sampling job and every zero-shot task on a small pixel model trained on the demo clips."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from fvdm_jax.config.load import load_config
from fvdm_jax.data import media
from fvdm_jax.data.demo import DemoClipSource, demo_options
from fvdm_jax.data.video import read_video
from fvdm_jax.diffusion.tasks import TASKS
from fvdm_jax.jobs.export import export
from fvdm_jax.jobs.sample import sample_job
from fvdm_jax.jobs.train import periodic_actions
from fvdm_jax.runtime.sharding import make_mesh
from fvdm_jax.sampling.sampler import VideoSampler
from fvdm_jax.sampling.weights import load_sampling_params
from fvdm_jax.training.loop import train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FRAMES, SIZE = 8, 32


def small_demo_config(**sample):
    config = load_config(os.path.join(ROOT, "configs", "demo.py"))
    model = config.model
    model.hidden_size, model.depth, model.num_heads = 32, 2, 2
    # The small pixel model these tests were written for (the demo recipe itself is larger).
    model.num_frames, model.input_size, model.patch_size, model.num_classes = FRAMES, SIZE, 4, 0
    config.sample.sheet_frame_size = 1
    config.sample.cfg_scale = 1.0
    config.train.batch_size = 8
    config.train.num_steps = 2
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.sample.num_steps = 3
    config.sample.train_num_videos = 2
    for key, value in sample.items():
        config.sample[key] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two training steps with samples written at step 2 (exercises TrainingSamples)."""
    workdir = str(tmp_path_factory.mktemp("sample_run"))
    config = small_demo_config(every_steps=2, train_tasks=("generate", "i2v"))
    train(config, workdir, actions=periodic_actions(config, workdir))
    return workdir


def demo_clips(config, count):
    source = DemoClipSource(
        num_examples=config.data.num_examples, num_frames=FRAMES, image_size=SIZE,
        frame_interval=config.data.frame_interval, seed=config.data.seed,
        **demo_options(config.data),
    )
    return np.stack([source[i]["video"] for i in range(count)])


def test_training_writes_samples(trained):
    for task in ("generate", "i2v"):
        directory = os.path.join(trained, "samples", "step_2", task)
        sheet = np.asarray(Image.open(os.path.join(directory, "contact_sheet.png")))
        assert sheet.shape == (2 * (SIZE + 1) + 1, FRAMES * (SIZE + 1) + 1, 3)
        assert len(read_video(os.path.join(directory, "video_00001.mp4"))) == FRAMES
    # ...and the contact sheets went to TensorBoard as images of step 2.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for name in os.listdir(trained):
        if name.startswith("events.out.tfevents"):
            for event in EventFileLoader(os.path.join(trained, name)).Load():
                tags.update((v.tag, event.step) for v in event.summary.value)
    assert {("samples/generate", 2), ("samples/i2v", 2)} <= tags


def test_sample_job_media_hold_and_resume(trained):
    config = small_demo_config(task="i2v", num_videos=3, batch_size=2)
    path = sample_job(config, trained)
    with np.load(path) as data:
        videos, labels, task = data["videos"], data["labels"], str(data["task"])
    assert videos.shape == (3, FRAMES, SIZE, SIZE, 3) and videos.dtype == np.uint8
    assert labels.shape == (3,) and task == "i2v"
    # 'hold': the conditioning frame of every video is exactly the input clip's first frame.
    clips = demo_clips(config, 3)
    np.testing.assert_array_equal(videos[:, 0], media.to_uint8(clips[:, 0]))
    assert np.any(videos[:, 1:] != videos[:, :1])
    out = os.path.dirname(path)
    record = json.load(open(os.path.join(out, "sample.json")))
    assert record["compilations"] == 1 and record["batches_sampled_now"] == 2
    for i in range(3):
        decoded = read_video(os.path.join(out, "media", f"video_{i:05d}.mp4"))
        assert decoded.shape == (FRAMES, SIZE, SIZE, 3)
        # Lossy H.264 (4:2:0 chroma): compare the real-image frame 0, not the noisy others.
        assert np.abs(decoded[0].astype(int) - videos[i, 0].astype(int)).mean() < 12
        with Image.open(os.path.join(out, "media", f"video_{i:05d}.gif")) as gif:
            assert gif.n_frames == FRAMES
    assert os.path.isfile(os.path.join(out, "media", "batch_00001.png"))

    # Interrupted job: one batch and the final file lost; the rerun redoes only that batch.
    os.remove(os.path.join(out, "batches", "batch_00001.npz"))
    os.remove(path)
    sample_job(config, trained)
    with np.load(path) as data:
        np.testing.assert_array_equal(data["videos"], videos)
    assert json.load(open(os.path.join(out, "sample.json")))["batches_sampled_now"] == 1

    changed = small_demo_config(task="i2v", num_videos=3, batch_size=2, eta=0.5)
    changed.sample.output_dir = out
    with pytest.raises(ValueError, match="other settings"):
        sample_job(changed, trained)
    # More training since: the same settings with newer weights must not mix into these batches.
    record_path = os.path.join(out, "sample.json")
    record = json.load(open(record_path))
    assert record["settings"]["weights"].endswith("step 2")
    record["settings"]["weights"] = record["settings"]["weights"].replace("step 2", "step 1")
    json.dump(record, open(record_path, "w"))
    with pytest.raises(ValueError, match="other settings or weights"):
        sample_job(config, trained)


def test_every_task(trained):
    config = small_demo_config(num_steps=2, total_frames=20, overlap=4, frame_indices="2,5")
    model_config, diffusion_config, params = load_sampling_params(config, trained)
    sampler = VideoSampler.from_config(config, params, model_config=model_config,
                           diffusion_config=diffusion_config)
    clips = demo_clips(config, 2)
    rng = jax.random.key(1)
    shape = (2, FRAMES, SIZE, SIZE, 3)
    exact = lambda got, want: np.testing.assert_array_equal(got, want)  # noqa: E731

    assert sampler.run("generate", rng, batch_size=2).shape == shape
    assert sampler.run("pyramid", rng, batch_size=2).shape == shape
    out = sampler.run("i2v", rng, inputs=clips)
    exact(out[:, 0], clips[:, 0])
    out = sampler.run("any_frame", rng, inputs=clips)  # sample.frame_indices = 2,5
    exact(out[:, [2, 5]], clips[:, [2, 5]])
    out = sampler.run("interpolate", rng, inputs=clips[:, [3, 4]])  # 2 keyframes go to 2 and 5
    exact(out[:, [2, 5]], clips[:, [3, 4]])
    out = sampler.run("transition", rng, inputs=np.concatenate([clips[:1, :2], clips[1:, :2]], 1)
                      .repeat(2, 0))
    exact(out[0, :2], clips[0, :2])
    exact(out[0, -2:], clips[1, :2])
    out = sampler.run("next_frame", rng, inputs=clips)
    exact(out[:, :7], clips[:, :7])
    assert np.any(out[:, 7] != clips[:, 7])
    out = sampler.run("progressive", rng, inputs=clips)
    exact(out[:, 0], clips[:, 0])
    out = sampler.run("extend", rng, inputs=clips)
    assert out.shape == (2, 20, SIZE, SIZE, 3)
    exact(out[:, :FRAMES], clips)
    assert sampler.run("extend", rng, batch_size=2).shape == (2, 20, SIZE, SIZE, 3)

    rolling = VideoSampler.from_config(
        small_demo_config(num_steps=8, total_frames=10), params,
        model_config=model_config, diffusion_config=diffusion_config,
    )
    assert rolling.run("rolling", rng, batch_size=2).shape == (2, 10, SIZE, SIZE, 3)
    out = rolling.run("interpolate", rng, inputs=clips)  # default keyframes: first and last
    exact(out[:, [0, 7]], clips[:, [0, 7]])
    assert set(TASKS) == {"generate", "pyramid", "i2v", "interpolate", "any_frame", "transition",
                          "next_frame", "progressive", "extend", "rolling"}

    # The same key gives the same videos on one device and on the 8-device mesh.
    one_device = make_mesh({"shape": (1, 1, 1), "axes": ("data", "fsdp", "tensor")},
                           jax.devices()[:1])
    one = VideoSampler.from_config(config, params, mesh=one_device)
    np.testing.assert_allclose(one.run("i2v", rng, inputs=clips),
                               sampler.run("i2v", rng, inputs=clips), atol=2e-5)

    with pytest.raises(ValueError, match="needs inputs"):
        sampler.run("i2v", rng, batch_size=2)
    with pytest.raises(ValueError, match="expected"):
        sampler.run("i2v", rng, inputs=clips[:, :, :16])
    # Programmatic inputs: chex's shape / dtype asserts on the host, before anything compiles.
    with pytest.raises(AssertionError, match=r"\(2, 8, 16, 32, 3\) but expected.*model space"):
        sampler.run("i2v", rng, model_inputs=clips[:, :, :16])
    with pytest.raises(AssertionError, match="one class id per video"):
        sampler.run("generate", rng, batch_size=2, labels=np.zeros(3, np.int32))
    with pytest.raises(AssertionError, match="integer class ids"):
        sampler.run("generate", rng, batch_size=2, labels=np.full(2, 0.5, np.float32))


def test_sample_cli_from_exported_checkpoint(trained, tmp_path):
    exported = export(small_demo_config(), trained, output=str(tmp_path / "export"))
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "fvdm_jax.main", "--mode=sample", "--workdir", str(tmp_path),
        f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
        "--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
        f"--config.model.num_frames={FRAMES}", f"--config.model.input_size={SIZE}",
        "--config.model.patch_size=4", "--config.model.num_classes=0", "--config.sample.cfg_scale=1.0",
        f"--config.sample.checkpoint={exported}", f"--config.sample.output_dir={out}",
        "--config.sample.task=interpolate", "--config.sample.num_steps=2",
        "--config.sample.num_videos=2", "--config.sample.batch_size=2",
        "--config.sample.sampler=ddpm", "--config.mesh.shape=1,1,1",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out / "samples.npz") as data:
        assert data["videos"].shape == (2, FRAMES, SIZE, SIZE, 3)

    bad = subprocess.run(args[:-1] + ["--config.sample.task=wobble"], capture_output=True,
                         text=True, env=env, timeout=300, cwd=ROOT)
    assert bad.returncode != 0
    assert "sample.task='wobble' is not one of" in bad.stderr.strip().splitlines()[-1]
