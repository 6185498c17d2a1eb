"""Workdirs in a bucket stay URLs: fvdm_jax.files leaves gs:// (any scheme) alone and goes through
etils.epath, never turning 'gs://b/run' into a local folder 'gs:/b/run'. A fake 'gs' backend maps
the bucket to a temporary folder, so the test sees every byte the code writes there."""

import json
import os
import sys

import pytest
from etils.epath import backend, gpath

from fvdm_jax import files


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
    from fvdm_jax.metrics import MetricsLogger

    logger = MetricsLogger("gs://b/run", num_steps=10, every_steps=1)
    logger.write(1, {"loss": 0.5})
    logger.write(2, {"loss": 0.25})
    logger.close()
    rows = [json.loads(line) for line in open(bucket / "b" / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    # A restart at step 1 drops the row of step 2 (trained again), in the bucket too.
    MetricsLogger("gs://b/run", num_steps=10, every_steps=1, start_step=1).close()
    assert len(open(bucket / "b" / "run" / "metrics.jsonl").readlines()) == 1
    append_record("gs://b/run", {"fvd": 1.0})
    append_record("gs://b/run", {"fvd": 2.0})
    assert len(open(bucket / "b" / "run" / "eval.jsonl").readlines()) == 2
    assert latest_checkpoint_step("gs://b/run") == 0


def test_checkpointer_paths_stay_in_the_bucket(bucket):
    from fvdm_jax.checkpoint import TrainCheckpointer, load_inference_config

    with pytest.raises(FileNotFoundError, match="gs://b/none/checkpoints"):
        TrainCheckpointer("gs://b/none", {"every_steps": 1, "keep": 1, "async_save": False,
                                          "export_dir": ""}, read_only=True)
    (bucket / "b" / "export").mkdir(parents=True)
    (bucket / "b" / "export" / "config.json").write_text(json.dumps({"model": {}, "diffusion": {}}))
    assert load_inference_config("gs://b/export") == {"model": {}, "diffusion": {}}
    files.write_json("gs://b/x/y.json", {"a": 1})
    assert json.load(open(bucket / "b" / "x" / "y.json")) == {"a": 1}
    assert files.listdir("gs://b") == ["export", "x"]
