"""fvdm_jax.data: the synthetic source and per-host batches as a pure function of the step."""

import itertools
import json

import numpy as np
import pytest

from fvdm_jax.data.pipeline import host_batches, make_source
from fvdm_jax.data.synthetic import SyntheticVideoSource

FRAMES, SIZE, CHANNELS, CLASSES = 3, 8, 2, 4
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def source():
    # 10 examples with a batch of 4: steps cross epoch boundaries mid-batch.
    return SyntheticVideoSource(10, FRAMES, SIZE, CHANNELS, num_classes=CLASSES, seed=3)


def _batches(source, num_steps, **kwargs):
    options = dict(global_batch_size=GLOBAL_BATCH, seed=7, start_step=0, process_index=0,
                   process_count=1)
    options.update(kwargs)
    iterator = host_batches(source, **options)
    batches = list(itertools.islice(iterator, num_steps))
    iterator.close()
    return batches


def _assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        np.testing.assert_array_equal(got["video"], want["video"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_examples_are_a_pure_function_of_seed_and_index(source):
    again = SyntheticVideoSource(10, FRAMES, SIZE, CHANNELS, num_classes=CLASSES, seed=3)
    np.testing.assert_array_equal(source[5]["video"], again[5]["video"])
    assert source[5]["label"] == again[5]["label"]
    assert not np.array_equal(source[5]["video"], source[6]["video"])
    other_seed = SyntheticVideoSource(10, FRAMES, SIZE, CHANNELS, num_classes=CLASSES, seed=4)
    assert not np.array_equal(source[5]["video"], other_seed[5]["video"])


def test_examples_follow_the_data_source_contract(source):
    assert len(source) == 10
    for index in range(len(source)):
        example = source[index]
        assert example["video"].shape == (FRAMES, SIZE, SIZE, CHANNELS)
        assert example["video"].dtype == np.float32
        assert example["label"].shape == () and example["label"].dtype == np.int32
        assert -1.0 <= example["video"].min() and example["video"].max() <= 1.0
        # Not a constant: there is something to learn, and it moves over frames.
        assert example["video"].std() > 0.05
        assert not np.allclose(example["video"][0], example["video"][-1])
    with pytest.raises(IndexError):
        source[10]


def test_labels_cover_the_classes_and_change_the_frequency_band():
    source = SyntheticVideoSource(64, 2, 16, 1, num_classes=CLASSES, seed=0)
    labels = np.array([int(source[i]["label"]) for i in range(len(source))])
    assert set(labels) == set(range(CLASSES))

    def dominant_frequency(video):  # cycles per image of the strongest non-DC component
        power = np.abs(np.fft.fft2(video[0, :, :, 0])) ** 2
        power[0, 0] = 0
        ky, kx = np.unravel_index(power.argmax(), power.shape)
        ky, kx = [min(k, 16 - k) for k in (ky, kx)]
        return np.hypot(ky, kx)

    mean_frequency = [
        np.mean([dominant_frequency(source[i]["video"]) for i in np.flatnonzero(labels == c)])
        for c in range(CLASSES)
    ]
    assert mean_frequency[0] < mean_frequency[-1]

    unconditional = SyntheticVideoSource(8, 2, 8, 1, num_classes=0)
    assert all(int(unconditional[i]["label"]) == 0 for i in range(8))


def test_batches_have_the_local_shapes_and_dtypes(source):
    (batch,) = _batches(source, 1, process_count=2, process_index=1)
    assert batch["video"].shape == (GLOBAL_BATCH // 2, FRAMES, SIZE, SIZE, CHANNELS)
    assert batch["video"].dtype == np.float32
    assert batch["label"].shape == (GLOBAL_BATCH // 2,) and batch["label"].dtype == np.int32


def test_one_epoch_is_a_permutation_and_unshuffled_is_in_order(source):
    # 5 global batches of 4 = 2 epochs of 10; each epoch holds every example exactly once.
    labels_by_video = {source[i]["video"].tobytes(): i for i in range(len(source))}
    stream = [labels_by_video[v.tobytes()] for b in _batches(source, 5) for v in b["video"]]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a fresh permutation per epoch
    in_order = [labels_by_video[v.tobytes()]
                for b in _batches(source, 3, shuffle=False) for v in b["video"]]
    assert in_order == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_concatenate_to_the_single_process_global_batch(source, process_count):
    num_steps = 4
    single = _batches(source, num_steps)
    per_host = [_batches(source, num_steps, process_index=pi, process_count=process_count)
                for pi in range(process_count)]
    for step in range(num_steps):
        for key in ("video", "label"):
            joined = np.concatenate([per_host[pi][step][key] for pi in range(process_count)])
            np.testing.assert_array_equal(joined, single[step][key])


def test_start_step_equals_skipping_batches(source):
    start = 3
    from_zero = _batches(source, start + 3, process_index=1, process_count=2)
    from_start = _batches(source, 3, start_step=start, process_index=1, process_count=2)
    _assert_same_batches(from_start, from_zero[start:])


def test_state_round_trip_resumes_at_the_same_batch(source):
    iterator = host_batches(source, global_batch_size=GLOBAL_BATCH, seed=7, start_step=2,
                            process_index=0, process_count=2)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what the grain checkpoint stores
    assert state == {"step": 3}
    expected = list(itertools.islice(iterator, 3))
    # A fresh iterator built at another start step resumes from the saved state, not its own.
    restored = host_batches(source, global_batch_size=GLOBAL_BATCH, seed=7, start_step=0,
                            process_index=0, process_count=2)
    next(restored)
    restored.set_state(state)
    _assert_same_batches(list(itertools.islice(restored, 3)), expected)
    assert restored.get_state() == {"step": 6}


def test_orbax_saves_and_restores_the_iterator_through_grain_checkpoint_args(source, tmp_path):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    options = dict(global_batch_size=GLOBAL_BATCH, seed=7, process_index=0, process_count=1)
    iterator = host_batches(source, start_step=0, **options)
    next(iterator), next(iterator)
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = next(iterator)
    fresh = host_batches(source, start_step=0, **options)
    restored = manager.restore(
        2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    manager.close()
    assert restored["data_iter"].get_state() == {"step": 2}
    _assert_same_batches([next(restored["data_iter"])], [expected])


def test_bad_source_name_is_one_clear_error():
    with pytest.raises(ValueError, match=r"data.source='video_folders'.*synthetic") as error:
        make_source({"source": "video_folders"}, {})
    assert "\n" not in str(error.value)


def test_every_source_name_has_a_builder():
    from fvdm_jax.data import SOURCES
    from fvdm_jax.data.pipeline import BUILDERS

    assert tuple(BUILDERS) == SOURCES  # SOURCES (the schema's choices) names this registry


def test_make_source_reads_the_model_shape():
    ml_collections = pytest.importorskip("ml_collections")
    data = ml_collections.ConfigDict({"source": "synthetic", "num_examples": 6, "seed": 1})
    model = ml_collections.ConfigDict(
        {"num_frames": 2, "input_size": 4, "in_channels": 3, "num_classes": 5})
    source = make_source(data, model)
    assert len(source) == 6
    assert source[0]["video"].shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="data.num_examples"):
        make_source({"source": "synthetic", "seed": 0}, dict(model))


def test_batch_not_divisible_by_process_count_is_one_clear_error(source):
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
        host_batches(source, global_batch_size=6, seed=0, start_step=0, process_index=0,
                     process_count=4)


def test_worker_processes_give_the_same_batches(source):
    expected = _batches(source, 3, process_index=1, process_count=2)
    _assert_same_batches(
        _batches(source, 3, process_index=1, process_count=2, num_workers=1), expected)


@pytest.mark.slow  # two worker start-ups: 4-5+ s on 2 cores
def test_state_restore_rebuilds_worker_processes_at_the_saved_step(source):
    expected = _batches(source, 4, process_index=1, process_count=2)
    iterator = host_batches(source, global_batch_size=GLOBAL_BATCH, seed=7, start_step=0,
                            process_index=1, process_count=2, num_workers=1)
    try:
        got = list(itertools.islice(iterator, 2))
        iterator.set_state({"step": 1})
        got += list(itertools.islice(iterator, 3))
    finally:
        iterator.close()
    _assert_same_batches(got[:2], expected[:2])
    _assert_same_batches(got[2:], expected[1:])


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_epoch_draws_new_clips_of_the_same_videos(shuffle):
    """An epoch-indexed source (the demo clips: windows, crops and flips seeded by the index it
    receives) sees index v + len * epoch, so one video gives other clips in epoch 0 and 1."""
    from fvdm_jax.data.demo import DemoClipSource

    demo = DemoClipSource(num_examples=2, num_frames=4, image_size=8, frame_interval=2, seed=0,
                          clip_names=("carphone_pristine.mp4",))
    iterator = host_batches(demo, global_batch_size=2, seed=5, start_step=0, process_index=0,
                            process_count=1, shuffle=shuffle)
    epoch0, epoch1 = next(iterator)["video"], next(iterator)["video"]
    # Every clip of epoch 1 differs from every clip of epoch 0 (same video, new window / crop).
    for a in epoch1:
        assert all(not np.array_equal(a, b) for b in epoch0)
    # ...and they are the source's own examples 2 and 3 (index + len * epoch).
    expected = np.stack([demo[2]["video"], demo[3]["video"]])
    for a in epoch1:
        assert any(np.array_equal(a, b) for b in expected)
