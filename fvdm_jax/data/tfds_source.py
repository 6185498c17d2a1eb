"""`TfdsVideoSource`: a TFDS video dataset (ArrayRecord, random access) as a training source.

Reading. The dataset is opened with `tfds.data_source(name, split=..., data_dir=...,
download=False)` (the dataset must have been prepared with `file_format='array_record'`, e.g.
`tfds build ucf101/ucf101_1 --file_format=array_record`; nothing is downloaded here). The
source keeps only what a grain worker needs: the ArrayRecord reader of the split (which pickles
as its file list) and the serialized specs of the two features it reads. A worker parses each
tf.train.Example with TFDS's NumPy parser and decodes the frames it needs with PIL, so no
TensorFlow is ever imported there (`tfds.features.Video` itself needs TensorFlow, so the main
process, which builds the feature tree, does import it).

Features. `video_key` (default 'video') is a `tfds.features.Video` (or any Sequence of Image:
PNG / JPEG frames; only the frames of the drawn clip are decoded) or a uint8
`tfds.features.Tensor` of shape (T, H, W, 3); gray frames (1 channel) become RGB.
`label_key` (default 'label') is a ClassLabel, read when the model is class-conditional:
`class_ids='sorted'` numbers its names in Python's `sorted()` order (the official FVDM / Latte
loader's order, what converted official UCF checkpoints expect), `class_ids='class_ind'` keeps
the dataset's own ids (for TFDS's ucf101: classInd.txt's order). The two differ for UCF-101's
Hammering / HammerThrow and JumpingJack / JumpRope.

Clips follow `fvdm_jax.data.clips` exactly as `VideoFolderSource` applies them: the same window,
frame choice, flip, resize and crop, drawn from `np.random.default_rng((seed, index))` for the
index the pipeline passes (`video + len * epoch`: fresh clips every epoch). A dataset written by
`build_folder_dataset` from a video folder therefore yields the very clips the folder source
yields. Two differences in bookkeeping: a video shorter than the dataset's minimum is found when
it is read (counting frames up front would read the whole dataset), and, like a video that fails
to decode, it is then replaced by the next one (the example of index + 1, + 2, ...), counted in
`num_too_short` / `num_read_failures` per process.

numpy/PIL/TFDS's parser only below the main process: this runs inside grain worker processes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Sequence

import numpy as np

from fvdm_jax.data import clips
from fvdm_jax.data.folder import CLASS_IDS, VideoFolderSource
from fvdm_jax.data.video import read_video
from fvdm_jax.errors import ConfigError

logger = logging.getLogger(__name__)

_BUILD_HINT = "prepare it with `tfds build NAME --data_dir=DIR --file_format=array_record`"


class _TooShort(Exception):
    """A video with fewer frames than the dataset's clip rule needs."""


def _open_data_source(name: str, split: str, data_dir: str | None):
    """The TFDS data source (raw records) of `name`/`split`, or a one-line ConfigError."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (lazy: only the main process opens it)

    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f"data.tfds_name={name!r}: TFDS has no such dataset and none is prepared in {where}; "
            f"check the name (with its config, e.g. 'ucf101/ucf101_1') and data.tfds_data_dir"
        ) from None
    if not builder.is_prepared():
        raise ConfigError(
            f"TFDS dataset {name!r} is not prepared in {where}; "
            f"{_BUILD_HINT.replace('NAME', name).replace('DIR', where)} (docs/datasets.md)"
        )
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        raise ConfigError(
            f"TFDS dataset {name!r} in {where} is stored as {file_format and file_format.value}, "
            f"which has no random access; {_BUILD_HINT.replace('NAME', name).replace('DIR', where)}"
            f" into another data_dir"
        )
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
    except ValueError as error:  # an unknown split or a bad slice
        raise ConfigError(
            f"data.split / data.tfds_split={split!r} does not fit TFDS dataset {name!r} (splits: "
            f"{', '.join(builder.info.splits)}): {str(error).splitlines()[0]}"
        ) from None


def _video_kind(feature, key: str, name: str) -> str:
    """'frames' (a sequence of encoded images) or 'tensor' (uint8 (T, H, W, 3)), else an error."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    features = tfds.features
    if isinstance(feature, features.Sequence) and isinstance(feature.feature, features.Image):
        shape = feature.feature.shape
        kind = "frames"
    elif isinstance(feature, features.Tensor) and feature.np_dtype == np.uint8:
        shape = feature.shape[1:] if len(feature.shape) == 4 else None
        kind = "tensor"
    else:
        shape, kind = None, None
    if kind is None or shape is None or len(shape) != 3 or shape[-1] not in (1, 3):
        raise ConfigError(
            f"feature {key!r} of TFDS dataset {name!r} is {type(feature).__name__} "
            f"{getattr(feature, 'shape', '')}; data.tfds_video_key must name video: a "
            f"tfds.features.Video (..., 3 or 1) or a uint8 Tensor (T, H, W, 3 or 1)"
        )
    return kind


def _class_label_ids(label, key: str, name: str, class_ids: str) -> tuple[list[str], np.ndarray]:
    """(class names in id order, int32 id of each of the ClassLabel's own ids) for `class_ids`."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    if not isinstance(label, tfds.features.ClassLabel):
        raise ConfigError(
            f"feature {key!r} of TFDS dataset {name!r} is {type(label).__name__}, "
            f"not a ClassLabel; set data.tfds_label_key (or model.num_classes=0)"
        )
    names = list(label.names)
    class_names = sorted(names) if class_ids == "sorted" else names
    position = {class_name: i for i, class_name in enumerate(class_names)}
    return class_names, np.asarray([position[n] for n in names], dtype=np.int32)


class TfdsVideoSource:
    """Random-access source of `{'video': float32 (F, S, S, 3) in [-1, 1], 'label': int32 ()}`
    over a TFDS dataset; see the module docstring for reading, features, labels and clips."""

    # The pipeline passes `video + len * epoch` for fresh clips every epoch (as for folders).
    epoch_indexed = True

    def __init__(
        self,
        name: str,
        *,
        dataset: str,
        num_frames: int = 16,
        frame_interval: int = 3,
        image_size: int = 256,
        seed: int = 0,
        split: str | None = None,
        data_dir: str | None = None,
        video_key: str = "video",
        label_key: str = "label",
        labels: bool = False,
        class_ids: str = "sorted",
        antialias: bool = False,
    ):
        """Args:
        name: the TFDS name, with its config and version if needed ('ucf101/ucf101_1:2.0.0').
        dataset: 'ffs', 'ucf101', 'sky' or 'taichi': the clip rule (fvdm_jax.data.clips).
        num_frames, frame_interval: F frames per clip from a window of F * frame_interval.
        image_size: S, the output height = width.
        seed: with the index, determines every clip (window, flip).
        split: a TFDS split expression ('train', 'test', 'train[:90%]', 'train+test'); None, ''
          and 'all' read every split.
        data_dir: where the prepared dataset lives; None is TFDS's default ($TFDS_DATA_DIR or
          ~/tensorflow_datasets).
        video_key, label_key: the features holding the frames and the ClassLabel.
        labels: read class ids from label_key (else every label is 0).
        class_ids: 'sorted' (official: sorted() of the ClassLabel names) or 'class_ind' (the
          dataset's own ids).
        antialias: as VideoFolderSource (False resizes as the official code).
        """
        self.name = name
        self.dataset = dataset
        self.rule = clips.clip_rule(dataset)
        self.min_frames = clips.min_video_frames(dataset, num_frames, frame_interval)
        if image_size <= 0 or seed < 0:
            raise ConfigError(f"image_size={image_size} must be positive and seed={seed} >= 0.")
        if class_ids not in CLASS_IDS:
            raise ConfigError(f"class_ids={class_ids!r} is not one of {CLASS_IDS}")
        self.split = "all" if split in (None, "", "all") else split
        self.num_frames = num_frames
        self.frame_interval = frame_interval
        self.image_size = image_size
        self.seed = seed
        self.antialias = antialias
        self.video_key = video_key
        self.labeled = bool(labels)
        self.label_key = label_key if self.labeled else None

        source = _open_data_source(name, self.split, data_dir)
        self._read_features(source.dataset_info.features, class_ids)
        self.class_ids = class_ids
        # The split's ArrayRecord reader: it pickles as its file list, without TFDS's features.
        self._records = source.data_source
        self._length = len(source)
        if self._length == 0:
            raise ConfigError(f"TFDS dataset {name!r} split {self.split!r} has no examples.")
        self._reset_process_state()

    def _read_features(self, features, class_ids: str) -> None:
        """Checks the video and label features; keeps what a worker needs to parse and decode them.

        Sets `kind`, `class_names` and the private `_tensor_feature`, `_specs` and `_label_ids`.
        """
        video_key, label_key = self.video_key, self.label_key
        for key in (video_key, label_key):
            if key is not None and key not in features:
                raise ConfigError(
                    f"TFDS dataset {self.name!r} has no feature {key!r} (it has {', '.join(features)});"
                    f" set data.tfds_video_key / data.tfds_label_key"
                )
        self.kind = _video_kind(features[video_key], video_key, self.name)
        # A Tensor may be stored zlib- or bytes-encoded; its own decoder (TF-free) undoes that.
        self._tensor_feature = features[video_key] if self.kind == "tensor" else None
        serialized = features.get_serialized_info()
        self._specs = {video_key: serialized[video_key]}
        self.class_names: list[str] = []
        self._label_ids = None
        if self.labeled:
            self.class_names, self._label_ids = _class_label_ids(
                features[label_key], label_key, self.name, class_ids
            )
            self._specs[label_key] = serialized[label_key]

    # -- per-process state (not pickled: each grain worker starts its own) ---------------------

    def _reset_process_state(self) -> None:
        self._lock = threading.Lock()
        self._parser = None
        self._bad: set[int] = set()
        self.num_read_failures = 0
        self.num_too_short = 0

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_parser", "_bad", "num_read_failures", "num_too_short"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_process_state()

    # -- the data-source contract ----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes of the ClassLabel (0 when unlabeled)."""
        return len(self.class_names) if self.labeled else 0

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (
            f"TfdsVideoSource(name={self.name!r}, split={self.split!r}, dataset={self.dataset!r}, "
            f"videos={len(self)}, num_frames={self.num_frames}, "
            f"frame_interval={self.frame_interval}, image_size={self.image_size}, seed={self.seed})"
        )

    def describe(self) -> str:
        """A few lines for logs: what is read, how clips are made, failures so far."""
        classes = f"{self.num_classes} classes ({self.class_ids} ids)" if self.labeled else "unlabeled"
        return "\n".join([
            f"TfdsVideoSource: {len(self)} videos of {self.name} split {self.split} "
            f"(dataset={self.dataset}, {self.video_key}: {self.kind}, {classes})",
            f"  clips: {self.num_frames} frames ({self.rule.frames}) from windows of "
            f"{self.num_frames * self.frame_interval}, flip={self.rule.flip}, "
            f"{self.rule.spatial} to {self.image_size}x{self.image_size}"
            f"{' (antialiased)' if self.antialias else ''}",
            f"  this process: {self.num_too_short} videos shorter than {self.min_frames} frames, "
            f"{self.num_read_failures} read failures (each replaced by the next video)",
        ])

    def example(self, video_index: int) -> dict:
        """The parsed record of video `video_index`: {video_key: encoded frames (T,) or uint8
        (T, H, W, 3), label_key: the dataset's own label id}."""
        if self._parser is None:
            from tensorflow_datasets.core.example_parser import ExampleParserNp  # noqa: PLC0415

            self._parser = ExampleParserNp(self._specs)
        return self._parser.parse_example(self._records[int(video_index)])

    def _frames(self, encoded, indices: np.ndarray) -> np.ndarray:
        """The frames `indices` of one parsed video as uint8 (F, H, W, 3)."""
        if self.kind == "tensor":
            frames = np.asarray(encoded)[indices]
            return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames  # gray: RGB
        from PIL import Image  # noqa: PLC0415 (lazy: only frame sequences need it)

        frames = []
        for index in indices:
            with Image.open(io.BytesIO(encoded[int(index)])) as image:
                frames.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        return np.stack(frames)

    def _read_clip(self, video_index: int, key: int) -> tuple[np.ndarray, int]:
        """(the augmented clip float32 (F, S, S, 3), its label) of a video for RNG key `key`."""
        record = self.example(video_index)
        encoded = record[self.video_key]
        if self._tensor_feature is not None:
            encoded = self._tensor_feature.decode_example_np(encoded)
        total = len(encoded)
        if total < self.min_frames:
            raise _TooShort(f"{total} frames, fewer than {self.min_frames}")
        plan = clips.sample_clip(
            self.dataset, total, self.num_frames, self.frame_interval,
            np.random.default_rng((self.seed, key)),
        )
        video = clips.augment_frames(
            self._frames(encoded, plan.indices), self.dataset, self.image_size, plan.flip,
            antialias=self.antialias,
        )
        label = int(self._label_ids[int(record[self.label_key])]) if self.labeled else 0
        return video, label

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        """Clip of video `index % len`, drawn with RNG (seed, index): 'video' float32
        (F, S, S, 3) in [-1, 1], 'label' int32 (). A video too short or unreadable is replaced
        by the example of index + 1 (then + 2, ...)."""
        index = int(index)
        if index < 0:
            raise IndexError(f"index {index} must be >= 0.")
        count = self._length
        last_error = None
        for key in range(index, index + count):
            video_index = key % count
            if video_index in self._bad:
                continue
            try:
                video, label = self._read_clip(video_index, key)
            except Exception as error:  # never stop a long run on one record
                last_error = error
                with self._lock:
                    if video_index not in self._bad:
                        self._bad.add(video_index)
                        short = isinstance(error, _TooShort)
                        if short:
                            self.num_too_short += 1
                        else:
                            self.num_read_failures += 1
                        logger.warning(
                            "skipping video %d of %s split %s (%s: %s); %d too short and %d "
                            "unreadable so far in this process.", video_index, self.name,
                            self.split, "too short" if short else type(error).__name__, error,
                            self.num_too_short, self.num_read_failures,
                        )
                continue
            return {"video": video, "label": np.asarray(label, dtype=np.int32)}
        raise ConfigError(
            f"none of the {count} videos of TFDS dataset {self.name!r} split {self.split!r} "
            f"gives a clip in this process (the {self.dataset} rule needs {self.min_frames} "
            f"frames); last error: {type(last_error).__name__}: {last_error}"
        )


def build_folder_dataset(
    root: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    name: str = "video_folder",
    splits: Sequence[str] | None = None,
    labels: bool = False,
    class_ids: str = "sorted",
    encoding: str = "png",
    version: str = "1.0.0",
) -> str:
    """Writes a video folder as a TFDS dataset (ArrayRecord) that `TfdsVideoSource` reads.

    The videos, their order (natural relative-path order: the dataset is not shuffled), the
    splits and the class labels are exactly those of `VideoFolderSource` on `root` (see
    fvdm_jax/data/folder.py: UCF-101 class folders, trainlistNN / testlistNN split files or
    root/<split>/ folders). Features: 'video' a `tfds.features.Video` of every decoded frame
    (`encoding` 'png' is lossless, so clips equal the folder's exactly; 'jpeg' is smaller and
    lossy), 'name' the relative path, and with `labels` a ClassLabel 'label' whose names are in
    the folder source's id order for `class_ids`. Needs TensorFlow (the Video feature's encoder).

    Args:
      root, labels, class_ids: as `VideoFolderSource`.
      data_dir: the TFDS data dir written (DATA_DIR/NAME/VERSION/...).
      name: the dataset's TFDS name (lowercase letters, digits, underscores).
      splits: the TFDS splits to write, e.g. ('train', 'test'); None writes every video as 'train'.
      encoding: 'png' or 'jpeg' frames.
      version: the dataset version.

    Returns:
      The folder the dataset was written to. Writing it again is a no-op (TFDS reuses it).
    """
    import tensorflow_datasets  # noqa: F401, PLC0415 (fail first: building needs TFDS and TensorFlow)

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"name={name!r} is not a TFDS name; use lowercase letters, digits, _")
    if encoding not in ("png", "jpeg"):
        raise ConfigError(f"encoding={encoding!r} is not 'png' or 'jpeg'")
    indexed, class_names = _index_folder(root, splits, labels, class_ids)
    builder_class = _folder_builder_class(root, name, version, encoding, labels, indexed, class_names)
    builder = builder_class(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def _index_folder(
    root: str | os.PathLike, splits: Sequence[str] | None, labels: bool, class_ids: str
) -> tuple[dict[str, VideoFolderSource], list[str]]:
    """({TFDS split: the folder source indexing it}, class names in id order, shared by all splits)."""
    wanted = tuple(splits) if splits else (None,)
    indexed = {}
    for split in wanted:
        # Indexing only: the ffs rule with one-frame clips keeps every readable video.
        folder = VideoFolderSource(root, dataset="ffs", num_frames=1, frame_interval=1,
                                   split=split, labels=labels, class_ids=class_ids)
        indexed[split or "train"] = folder
    # One numbering for every split (a folder source numbers the classes its own split has).
    if class_ids == "sorted":
        class_names = sorted(set().union(*(folder.class_names for folder in indexed.values())))
    else:
        class_names = next(iter(indexed.values())).class_names  # classInd.txt: the same for all
    return indexed, class_names


def _folder_builder_class(root, name, version, encoding, labels, indexed, class_names):
    """The TFDS builder class (not registered) writing the videos `indexed` holds, split by split."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    class_id = {class_name.casefold(): i for i, class_name in enumerate(class_names)}
    dataset_name = name

    class FolderVideos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(version)

        def _info(self):
            features = {
                "video": tfds.features.Video((None, None, None, 3), encoding_format=encoding),
                "name": tfds.features.Text(),
            }
            if labels:
                features["label"] = tfds.features.ClassLabel(names=class_names)
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"The videos of {root} (fvdm_jax.data.tfds_source).",
                features=tfds.features.FeaturesDict(features),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing is downloaded
            return {split: self._generate_examples(folder) for split, folder in indexed.items()}

        def _generate_examples(self, folder):
            for entry in folder.entries:
                example = {"video": read_video(entry.path), "name": entry.relative_path}
                if labels:
                    example["label"] = class_id[entry.relative_path.split("/", 1)[0].casefold()]
                yield entry.relative_path, example

    return FolderVideos
