"""Checkpoints that cannot be silently wrong: fingerprints verified at restore, damaged checkpoints
moved aside (never deleted) with a fallback to the previous good one, NaN caught at restore, a
failing save reported in one line, metrics.jsonl without the rows of re-run steps."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from fvdm_jax.checkpoint.manager import QUARANTINE_DIR, CheckpointError, TrainCheckpointer
from fvdm_jax.config.load import load_config
from fvdm_jax.training.loop import build_setup, train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny(num_steps: int):
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.mesh.shape = (1, 1, 1)
    config.train.num_steps = num_steps
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 1
    config.checkpoint.keep = 5
    config.checkpoint.async_save = False
    return config


def leaves(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step run with checkpoints 1 and 2 (copied per test), and the 3-step reference."""
    two = str(tmp_path_factory.mktemp("two"))
    train(tiny(2), two)
    three = str(tmp_path_factory.mktemp("three"))
    reference = train(tiny(3), three)
    return two, reference


def copy_run(runs, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(runs[0], workdir)
    return workdir


def data_files(workdir, step):
    """The array data files of a checkpoint's state, largest first."""
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "*"),
                                  recursive=True) if os.path.isfile(f) and "/d/" in f]
    return sorted(files, key=os.path.getsize, reverse=True)


def damage_file(path, truncate=False, stride=None):
    """One flipped bit in the middle of the file (or one every `stride` bytes: every chunk of
    every array stored there is hit), or its second half cut off."""
    data = bytearray(open(path, "rb").read())
    if truncate:
        data = data[: len(data) // 2]
    else:
        for position in range(stride // 2, len(data), stride) if stride else [len(data) // 2]:
            data[position] ^= 0x10
    open(path, "wb").write(bytes(data))


def _state_kvstore(workdir, step):
    return {"driver": "ocdbt", "base": "file://" + os.path.join(workdir, "checkpoints", str(step), "state/")}


def _read_array(workdir, step, name):
    """One array of the saved state, read straight through tensorstore (no orbax, no checks)."""
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": dict(_state_kvstore(workdir, step), path=name + "/")}
    return ts.open(spec, context=ts.Context()).result().read().result()


def flip_one_bit_in_a_chunk(workdir, step, prefix=""):
    """Flips one bit in the middle of the stored (zstd) bytes of the largest array chunk whose
    array name starts with `prefix`, inside the largest data file holding such a chunk; nothing
    else is touched: the OCDBT manifest and b-tree nodes, and every other chunk, stay intact, so
    orbax reads the checkpoint back without an error, one array silently wrong (checked here,
    read through tensorstore as orbax reads it). Returns the damaged array's path as the
    fingerprints name it ('ema_params/params/...')."""
    import tensorstore as ts

    kvstore = ts.KvStore.open(_state_kvstore(workdir, step)).result()
    chunks = [(key.decode(), kvstore.read(key).result().value) for key in kvstore.list().result()
              if key.decode().startswith(prefix) and not key.endswith(b".zarray")]
    for path in data_files(workdir, step):
        data = bytearray(open(path, "rb").read())
        stored = [(len(value), key, data.find(value)) for key, value in chunks if len(value) > 1000]
        stored = sorted(s for s in stored if s[2] >= 0)  # small values live in the b-tree nodes
        if stored:
            size, key, start = stored[-1]
            break
    else:
        raise AssertionError(f"no data file holds a chunk of {prefix!r}")
    name = key.rsplit("/", 1)[0]
    before = _read_array(workdir, step, name)
    for position in range(start + size // 2, start + size // 2 + 64):  # the first flip that
        data[position] ^= 0x10  # still decodes (zstd frames carry no checksum here), to other
        open(path, "wb").write(bytes(data))  # values: one element or a run of them
        try:
            if np.any(_read_array(workdir, step, name) != before):
                return name.replace(".", "/")
        except ValueError:  # this flip breaks the frame: orbax would fail before the fingerprints
            pass
        data[position] ^= 0x10
    raise AssertionError(f"no flip in the middle of {name} reads back")


def assert_fell_back_to_step_1(workdir, result, reference, caplog):
    assert os.path.isdir(os.path.join(workdir, QUARANTINE_DIR, "2"))  # moved aside, not deleted
    assert "damaged" in caplog.text and "falling back" in caplog.text
    assert result.step == 3
    # Steps 2 and 3 trained again from step 1: the same state as the uninterrupted 3-step run.
    for got, want in zip(leaves(result.state), leaves(reference.state)):
        np.testing.assert_array_equal(got, want)
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == sorted(set(steps))  # every step once: the old rows of step 2 were dropped


@pytest.mark.parametrize("damage", ["truncated", "missing_state"])
def test_damaged_newest_checkpoint_falls_back(runs, tmp_path, caplog, damage):
    workdir = copy_run(runs, tmp_path)
    if damage == "missing_state":
        shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "state"))
    else:
        for path in data_files(workdir, 2):  # every data file: whichever holds which arrays
            damage_file(path, truncate=True)
    result = train(tiny(3), workdir)
    assert "unreadable" in caplog.text
    assert_fell_back_to_step_1(workdir, result, runs[1], caplog)


def test_one_flipped_bit_is_caught_by_the_fingerprints(runs, tmp_path, caplog):
    """One bit of one chunk in the largest data file: orbax restores the state without an error
    (one element wrong); only the fingerprints tell, so the checkpoint is moved aside for that."""
    workdir = copy_run(runs, tmp_path)
    damaged = flip_one_bit_in_a_chunk(workdir, 2)
    result = train(tiny(3), workdir)
    assert "unreadable" not in caplog.text
    assert f"1 arrays differ from their fingerprints, e.g. {damaged}" in caplog.text
    assert_fell_back_to_step_1(workdir, result, runs[1], caplog)


def test_nan_in_the_restored_state_is_damage_not_the_learning_rate(runs, tmp_path, caplog):
    workdir = copy_run(runs, tmp_path)
    config = tiny(3)
    setup = build_setup(config)
    ckpt = TrainCheckpointer(workdir, config.checkpoint)
    state = ckpt.restore_state(2, setup.abstract_state)
    poisoned = state.replace(opt_state=jax.tree_util.tree_map(
        lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, state.opt_state))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))
    ckpt.manager.reload()
    ckpt.save(2, poisoned, {"runtime": {}}, force=True)  # its fingerprints match the NaNs
    ckpt.wait_until_finished()
    ckpt.close()
    caplog.clear()
    result = train(config, workdir)
    assert "NaN or inf" in caplog.text
    assert_fell_back_to_step_1(workdir, result, runs[1], caplog)


def test_no_good_checkpoint_is_a_clear_stop(runs, tmp_path):
    workdir = copy_run(runs, tmp_path)
    for step in (1, 2):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))
    with pytest.raises(CheckpointError, match="no good checkpoint left") as info:
        train(tiny(3), workdir)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(os.path.join(workdir, QUARANTINE_DIR))) == ["1", "2"]


@pytest.mark.parametrize("damage", ["fingerprints", "unreadable"])
def test_sampling_skips_a_damaged_checkpoint(runs, tmp_path, caplog, damage):
    """fingerprints: one bit of one EMA chunk, which orbax's EMA-only restore reads back without
    an error; unreadable: a bit flipped every 512 bytes of every data file."""
    from fvdm_jax.sampling.weights import load_sampling_params

    workdir = copy_run(runs, tmp_path)
    if damage == "fingerprints":
        damaged = flip_one_bit_in_a_chunk(workdir, 2, prefix="ema_params.")
    else:
        for path in data_files(workdir, 2):  # the EMA arrays' chunks among them
            damage_file(path, stride=512)
    config = tiny(2)
    _, _, ema = load_sampling_params(config, workdir)
    assert "damaged" in caplog.text and "skipped" in caplog.text
    if damage == "fingerprints":
        assert f"EMA arrays differ from their fingerprints (['{damaged}'])" in caplog.text
        assert "unreadable" not in caplog.text
    else:
        assert "(unreadable: " in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # sampling moves nothing
    ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
    setup = build_setup(config)
    step1 = ckpt.restore_state(1, setup.abstract_state)
    ckpt.close()
    for got, want in zip(leaves(ema), leaves(step1.ema_params)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failing_save_stops_in_one_line(runs, tmp_path, async_save):
    """A real write failure: files may not grow past 100 kB (RLIMIT_FSIZE, as a full disk), so
    the state's data chunks of step 3 (~400 kB) cannot be written."""
    import resource
    import signal

    workdir = copy_run(runs, tmp_path)
    config = tiny(4)
    config.checkpoint.async_save = async_save
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        with pytest.raises(CheckpointError, match="failed: .*intact") as info:
            train(config, workdir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert "\n" not in str(info.value)
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert {"1", "2"} <= set(names) and "3" not in names  # the earlier ones stay
    assert not [n for n in names if "tmp" in n]  # the failed save's folder is gone
    # Space again: the run resumes from step 2.
    assert train(config, workdir).step == 4


def test_exact_resume_with_async_saves(runs, tmp_path):
    """The default async_save=True: 2 steps, then a restart to 3, equals the uninterrupted
    (synchronous) 3-step run bit for bit."""
    config = tiny(2)
    config.checkpoint.async_save = True
    workdir = str(tmp_path / "async")
    train(config, workdir)
    config.train.num_steps = 3
    result = train(config, workdir)
    assert result.step == 3
    for got, want in zip(leaves(result.state), leaves(runs[1].state)):
        np.testing.assert_array_equal(got, want)
