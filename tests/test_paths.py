"""Workdirs in a bucket stay URLs: fvdm_jax.runtime.files leaves gs:// (any scheme) alone and goes through
etils.epath, never turning 'gs://b/run' into a local folder 'gs:/b/run'. A fake 'gs' backend maps
the bucket to a temporary folder, so the test sees every byte the code writes there."""

import json
import os
import sys

import pytest
from etils.epath import backend, gpath

from fvdm_jax.runtime import files


class _FolderBucket(backend._OsPathBackend):
    """The epath backend of gs:// paths, storing under a local folder instead of GCS."""

    def __init__(self, root):
        self.root = root

    def _local(self, path):
        text = os.fspath(path)
        assert text.startswith("gs://"), text
        return os.path.join(self.root, text[len("gs://"):])

    def open(self, path, mode):
        return super().open(self._local(path), mode)

    def exists(self, path):
        return super().exists(self._local(path))

    def isdir(self, path):
        return super().isdir(self._local(path))

    def listdir(self, path):
        return super().listdir(self._local(path))

    def glob(self, path):
        return ["gs://" + os.path.relpath(p, self.root) for p in super().glob(self._local(path))]

    def makedirs(self, path, *, exist_ok=False, mode=0o777):
        return super().makedirs(self._local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=0o777):
        return super().mkdir(self._local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(self._local(path))

    def remove(self, path):
        return super().remove(self._local(path))

    def rename(self, path, dst):
        return super().rename(self._local(path), self._local(dst))

    def replace(self, path, dst):
        return super().replace(self._local(path), self._local(dst))

    def stat(self, path):
        return super().stat(self._local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "bucket_store"
    root.mkdir()
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _FolderBucket(str(root)))
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath picks tf's GCS client
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert os.listdir(cwd) == [], "a local copy of the bucket path was made"


def test_urls_stay_urls():
    assert files.resolve("gs://b/run") == "gs://b/run"
    assert files.resolve("s3://b/run/") == "s3://b/run/"
    assert files.join("gs://b/run/", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert files.resolve("run") == os.path.abspath("run")


def test_metrics_and_eval_records_land_in_the_bucket(bucket, monkeypatch):
    monkeypatch.setitem(sys.modules, "clu", None)  # no TensorBoard writer (it would dial GCS)
    from fvdm_jax.jobs.evaluate import append_record, latest_checkpoint_step
    from fvdm_jax.runtime.metrics import MetricsLogger

    logger = MetricsLogger("gs://b/run")
    logger.write(1, {"loss": 0.5})
    logger.write(2, {"loss": 0.25})
    logger.close()
    rows = [json.loads(line) for line in open(bucket / "b" / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    # A restart at step 1 drops the row of step 2 (trained again), in the bucket too.
    MetricsLogger("gs://b/run", start_step=1).close()
    assert len(open(bucket / "b" / "run" / "metrics.jsonl").readlines()) == 1
    append_record("gs://b/run", {"fvd": 1.0})
    append_record("gs://b/run", {"fvd": 2.0})
    assert len(open(bucket / "b" / "run" / "eval.jsonl").readlines()) == 2
    assert latest_checkpoint_step("gs://b/run") == 0


def test_checkpointer_paths_stay_in_the_bucket(bucket):
    from fvdm_jax.checkpoint.inference import load_inference_config
    from fvdm_jax.checkpoint.manager import TrainCheckpointer

    with pytest.raises(FileNotFoundError, match="gs://b/none/checkpoints"):
        TrainCheckpointer("gs://b/none", {"every_steps": 1, "keep": 1, "async_save": False,
                                          "export_dir": ""}, read_only=True)
    (bucket / "b" / "export").mkdir(parents=True)
    (bucket / "b" / "export" / "config.json").write_text(json.dumps({"model": {}, "diffusion": {}}))
    assert load_inference_config("gs://b/export") == {"model": {}, "diffusion": {}}
    files.write_json("gs://b/x/y.json", {"a": 1})
    assert json.load(open(bucket / "b" / "x" / "y.json")) == {"a": 1}
    assert files.listdir("gs://b") == ["export", "x"]


def test_sample_job_writes_into_a_bucket_and_resumes_from_it(bucket, tmp_path, monkeypatch):
    """--mode=sample with sample.output_dir=gs://...: batches, MP4 / GIF / PNG media,
    samples.npz and sample.json land in the bucket, a rerun resumes from what is there, and no
    local copy is left (none under the working directory, none in the upload staging folder)."""
    import tempfile

    import flax.linen as nn
    import jax
    import numpy as np

    from fvdm_jax.checkpoint.inference import save_inference_checkpoint
    from fvdm_jax.config.load import load_config
    from fvdm_jax.jobs.sample import sample_job
    from fvdm_jax.models.dit import model_from_config

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    model = model_from_config(config.model)
    frames, size, channels = model.num_frames, model.input_size, model.in_channels
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     np.zeros((1, frames, size, size, channels), np.float32),
                                     np.zeros((1, frames), np.int32)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: 0.1 * rng.normal(size=s.shape).astype(np.float32), shapes)
    checkpoint = str(tmp_path / "checkpoint")
    save_inference_checkpoint(checkpoint, params, config.model.to_dict(), config.diffusion.to_dict())
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))

    s = config.sample
    s.checkpoint, s.output_dir = checkpoint, "gs://b/samples/generate"
    s.task, s.num_videos, s.batch_size, s.num_steps, s.sheet_frame_size = "generate", 3, 2, 2, 1
    config.mesh.shape = (1, 1, 1)
    assert sample_job(config, str(tmp_path / "workdir")) == "gs://b/samples/generate/samples.npz"
    out = bucket / "b" / "samples" / "generate"
    names = sorted(os.listdir(out))
    assert names == ["batches", "media", "sample.json", "samples.npz"], names
    assert sorted(os.listdir(out / "batches")) == ["batch_00000.npz", "batch_00001.npz"]
    assert sorted(os.listdir(out / "media")) == sorted(
        ["batch_00000.png", "batch_00001.png"]
        + [f"video_{i:05d}.{ext}" for i in range(3) for ext in ("mp4", "gif")])
    with np.load(out / "samples.npz") as data:
        videos = data["videos"]
    assert videos.shape == (3, frames, size, size, 3) and videos.dtype == np.uint8
    assert json.load(open(out / "sample.json"))["batches_sampled_now"] == 2
    # Resume: a lost batch and the final file; the rerun reads the other batch from the bucket.
    os.remove(out / "batches" / "batch_00001.npz")
    os.remove(out / "samples.npz")
    sample_job(config, str(tmp_path / "workdir"))
    with np.load(out / "samples.npz") as data:
        np.testing.assert_array_equal(data["videos"], videos)
    assert json.load(open(out / "sample.json"))["batches_sampled_now"] == 1
    assert os.listdir(staging) == [], "upload staging files were left behind"


def test_verdict_sheets_land_in_the_bucket(bucket):
    """The after-training verdict sheets of a bucket workdir are written there, not under a local
    'gs:' folder (the fixture checks that nothing appears locally)."""
    import numpy as np
    from ml_collections import config_dict

    from fvdm_jax.evaluation import verdict

    videos = np.random.default_rng(0).integers(0, 255, (2, 3, 8, 8, 3), dtype=np.uint8)
    config = config_dict.ConfigDict({"sample": {"sheet_frame_size": 1}})
    verdict._write_sheets("gs://b/run", {"generate": videos}, None, config)
    sheet = bucket / "b" / "run" / verdict.VERDICT_DIR / "generate.png"
    assert sheet.is_file() and sheet.stat().st_size > 100
