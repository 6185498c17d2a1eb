"""`VideoFolderSource`: a random-access grain source over a folder of videos or frame folders.

Layout. Every video file (mp4/avi/webm/mkv/mov/...) and every folder that directly holds jpg/png
frames, anywhere under the root (symlinks followed, hidden names skipped), is one video; the
videos are ordered by relative path (natural order). Class labels (UCF101 layout
`root/<ClassName>/<video>`) come from the first folder under the root: ids in Python's `sorted()`
order of the class folder names (case-sensitive), as the official FVDM / Latte loader assigns
them (`class_ids='sorted'`, the default: right for converted official UCF checkpoints), or from
`classInd.txt` (`class_ids='class_ind'`: its 1-based ids minus 1). The two differ for UCF-101's
Hammering / HammerThrow and JumpingJack / JumpRope. Split files: `split='train'/'test'` keeps the videos listed in
`trainlist{fold:02d}.txt` / `testlist{fold:02d}.txt` (matched by relative path without the file
extension, case-insensitively, so UCF101's `HandStandPushups` spelling and frame folders both
match); without split files it reads `root/<split>/` instead.

Clips follow `fvdm_jax.data.clips` (the official per-dataset window, frame choice, flip, resize
and crop). Videos too short for the dataset's rule are skipped when the source is built, and
counted; so are files that cannot be opened.

Randomness and epochs. `source[index]` accepts any index >= 0: it reads video `index % len` and
draws its clip from `np.random.default_rng((seed, index))`. Indices in [0, len) therefore give
one fixed clip per video, and grain's `MapDataset.source(...).repeat()` only ever passes those;
for fresh windows and flips every epoch the pipeline passes `video + len * epoch` instead (a
`map_with_index` over the shuffled, repeated range of video ids, for sources with
`epoch_indexed = True`). Either way an example is a pure function of (seed, index), whatever
process or worker builds it and in whatever order.

Read failures. A file that fails to decode when read (corrupt data, vanished file) is logged
once, counted in `num_read_failures`, remembered as bad in this process, and the source falls
back to index + 1 (the next video, with the RNG of index + 1): the substitute is a deterministic
function of the index, so a long run never stops on one bad file. If the index-time frame
count turns out too high (the decoder yields fewer frames), the clip is redrawn with the decoded
count (`num_recounted`). Counters are per process: grain workers keep their own.

numpy/PyAV/PIL only below: this runs inside grain worker processes, which must never touch jax.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fvdm_jax.data import clips
from fvdm_jax.data.video import (
    DEFAULT_SEEK_MIN_FRAME,
    ShortVideoError,
    VideoReadError,
    count_frames,
    is_image_file,
    is_video_file,
    natural_sort_key,
    read_frames,
)
from fvdm_jax.errors import ConfigError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
# How class folders get their ids: the official sorted() order, or UCF-101's classInd.txt.
CLASS_IDS = ("sorted", "class_ind")
# Where the UCF101 split files may sit, relative to the data root.
_SPLIT_DIR_CANDIDATES = (".", "ucfTrainTestlist", "../ucfTrainTestlist", "..")
# How many skipped paths the warnings name before summarizing.
_NAMED_IN_WARNINGS = 5


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    """One usable video: where it is, its frame count when indexed, and its class id."""

    path: str
    relative_path: str
    num_frames: int
    label: int


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Video files and frame folders under `root` (recursive), in natural relative-path order.

    A folder that directly holds jpg/png files is one video (its subfolders are not searched).
    Hidden files and folders are skipped; symlinked folders are followed once.
    """
    root = Path(root)
    found = []
    visited = set()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            subdirs[:] = []
            continue
        visited.add(real)
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        visible = [name for name in files if not name.startswith(".")]
        if Path(directory) != root and any(is_image_file(name) for name in visible):
            found.append(Path(directory))
            subdirs[:] = []
            continue
        found.extend(Path(directory) / name for name in visible if is_video_file(name))
    return sorted(found, key=lambda path: natural_sort_key(path.relative_to(root).as_posix()))


def _split_key(relative_path: str) -> str:
    """Relative path without a video extension, '/'-separated, case-folded: split-file matching."""
    path = relative_path.replace("\\", "/").strip()
    if is_video_file(path):
        path = path.rsplit(".", 1)[0]
    return path.casefold()


def _find_split_dir(root: Path, split_dir: str | os.PathLike | None) -> Path | None:
    """The folder holding classInd.txt / trainlistNN.txt, or None."""
    if split_dir is not None:
        return Path(split_dir)
    for candidate in _SPLIT_DIR_CANDIDATES:
        folder = (root / candidate).resolve()
        if (folder / "classInd.txt").is_file() or any(folder.glob("trainlist*.txt")):
            return folder
    return None


def read_class_index(path: str | os.PathLike) -> dict[str, int]:
    """classInd.txt ('1 ApplyEyeMakeup' per line) -> {class name: 0-based id}."""
    classes = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            classes[parts[1]] = int(parts[0]) - 1
    return classes


def read_split_list(path: str | os.PathLike) -> set[str]:
    """trainlistNN.txt / testlistNN.txt ('Class/v_x.avi [label]' per line) -> split keys."""
    return {
        _split_key(line.split()[0]) for line in Path(path).read_text().splitlines() if line.split()
    }


def _probe(path: Path) -> int | str:
    """The frame count of `path`, or the reason it cannot be read."""
    try:
        return count_frames(path)
    except VideoReadError as error:
        return str(error)
    except Exception as error:  # never let one odd file stop indexing
        return f"{path}: {type(error).__name__}: {error}"


def _checked_split(split: str | None, image_size: int, seed: int) -> str | None:
    """`split` with '' / 'all' as None, after checking it, `image_size` and `seed`."""
    if image_size <= 0 or seed < 0:
        raise ConfigError(f"image_size={image_size} must be positive and seed={seed} >= 0.")
    if split in ("", "all"):
        split = None
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split={split!r} is unknown; use 'train', 'test' or None (all).")
    return split


class VideoFolderSource:
    """Random-access source of `{'video': float32 (F, S, S, 3) in [-1, 1], 'label': int32 ()}`.

    See the module docstring for the layout, labels, splits, epochs and failure handling.
    """

    # Marks sources whose `source[video + len * epoch]` draws a fresh clip: the pipeline passes
    # such indices (instead of grain's index % len) so augmentation differs every epoch.
    epoch_indexed = True

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        dataset: str,
        num_frames: int = 16,
        frame_interval: int = 3,
        image_size: int = 256,
        seed: int = 0,
        split: str | None = None,
        labels: bool | None = None,
        class_ids: str = "sorted",
        split_dir: str | os.PathLike | None = None,
        fold: int = 1,
        antialias: bool = False,
        seek_min_frame: int | None = DEFAULT_SEEK_MIN_FRAME,
        decode_threads: int = 0,
        probe_threads: int = 8,
    ):
        """Args:
        root: folder searched recursively for video files and frame folders.
        dataset: 'ffs', 'ucf101', 'sky' or 'taichi': the clip rule (fvdm_jax.data.clips).
        num_frames, frame_interval: F frames per clip from a window of F * frame_interval.
        image_size: S, the output height = width.
        seed: with the index, determines every clip (window, flip).
        split: None / 'all' for every video; 'train' / 'test' (see the module docstring).
        labels: class ids from the first folder under root; None means True for ucf101 only.
        class_ids: 'sorted' (official: sorted() of the class folder names) or 'class_ind'
          (classInd.txt, found as split_dir says; without one: sorted, with a warning).
        split_dir: folder with classInd.txt and the split lists; None searches root,
          root/ucfTrainTestlist, root/../ucfTrainTestlist and root/..
        fold: which official split (1-3): trainlist{fold:02d}.txt.
        antialias: False resizes as the official code (bilinear, no antialias); True uses the
          antialiased (PIL-like) filter.
        seek_min_frame, decode_threads: passed to `fvdm_jax.data.video.read_frames`.
        probe_threads: threads counting frames while indexing (I/O bound on network disks).
        """
        self.dataset = dataset
        self.rule = clips.clip_rule(dataset)
        self.min_frames = clips.min_video_frames(dataset, num_frames, frame_interval)
        split = _checked_split(split, image_size, seed)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist; set data.path.")
        self.num_frames = num_frames
        self.frame_interval = frame_interval
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.labeled = dataset == "ucf101" if labels is None else bool(labels)
        self.antialias = antialias
        self.seek_min_frame = seek_min_frame
        self.decode_threads = decode_threads

        split_folder = _find_split_dir(self.root, split_dir)
        self.video_root, split_keys = self._resolve_split(split_folder, fold)
        candidates, relative = self._find_candidates(split_keys)
        # Labels: class folder -> id, before probing so layout errors fail fast.
        candidates, relative, labels_of = self._label(candidates, relative, class_ids, split_folder)
        self.entries: tuple[VideoEntry, ...] = self._index(candidates, relative, labels_of, probe_threads)
        self._reset_process_state()

    # -- indexing (run once, by __init__) ---------------------------------------------------------

    def _resolve_split(self, split_folder: Path | None, fold: int) -> tuple[Path, set[str] | None]:
        """(folder to search for videos, split keys to keep or None) for `self.split`."""
        split = self.split
        if split is None:
            return self.root, None
        split_file = None
        if split_folder is not None:
            split_file = split_folder / f"{split}list{fold:02d}.txt"
        if split_file is not None and split_file.is_file():
            return self.root, read_split_list(split_file)
        if (self.root / split).is_dir():
            return self.root / split, None
        raise FileNotFoundError(
            f"split={split!r} needs {split}list{fold:02d}.txt (UCF101 split files, "
            f"pass split_dir=) or a folder {self.root / split}; neither exists."
        )

    def _find_candidates(self, split_keys: set[str] | None) -> tuple[list[Path], list[str]]:
        """The videos under `video_root` and their relative paths: those the split file lists, if any.

        Sets `num_candidates` (all found), `num_not_in_split` and `num_missing_from_disk`.
        """
        candidates = find_videos(self.video_root)
        self.num_candidates = len(candidates)
        relative = [path.relative_to(self.video_root).as_posix() for path in candidates]
        self.num_not_in_split = 0
        self.num_missing_from_disk = 0
        if split_keys is None:
            return candidates, relative
        keys = [_split_key(path) for path in relative]
        kept = [i for i, key in enumerate(keys) if key in split_keys]
        self.num_not_in_split = len(candidates) - len(kept)
        self.num_missing_from_disk = len(split_keys - {keys[i] for i in kept})
        if self.num_missing_from_disk:
            logger.warning(
                "%d videos listed in the %s split are not under %s.",
                self.num_missing_from_disk, self.split, self.video_root,
            )
        return [candidates[i] for i in kept], [relative[i] for i in kept]

    def _label(self, candidates: list[Path], relative: list[str], class_ids: str, split_folder: Path | None):
        """(candidates, relative paths, class ids) of the videos whose class folder has an id.

        Sets `class_names` and `num_unknown_class`; unlabeled sources keep every video, label 0.
        """
        self.class_names: list[str] = []
        self.num_unknown_class = 0
        if not self.labeled:
            return candidates, relative, [0] * len(candidates)
        if any("/" not in path for path in relative):
            flat = next(path for path in relative if "/" not in path)
            raise ConfigError(
                f"labels need a class folder per video (root/<class>/<video>), but {flat} "
                f"sits directly in {self.video_root}; pass labels=False for unconditional data."
            )
        by_name = self._class_ids_by_name(relative, class_ids, split_folder)
        kept, labels_of = [], []
        for i, path in enumerate(relative):
            class_id = by_name.get(path.split("/", 1)[0].casefold())
            if class_id is None:
                self.num_unknown_class += 1
            else:
                labels_of.append(class_id)
                kept.append(i)
        if self.num_unknown_class:
            logger.warning(
                "%d videos under %s sit in class folders missing from classInd.txt; skipped.",
                self.num_unknown_class, self.video_root,
            )
        return [candidates[i] for i in kept], [relative[i] for i in kept], labels_of

    def _class_ids_by_name(self, relative: list[str], class_ids: str, split_folder: Path | None) -> dict[str, int]:
        """{case-folded class folder name: id} as `class_ids` says; sets `class_names`."""
        class_folders = sorted({path.split("/", 1)[0] for path in relative})
        if class_ids not in CLASS_IDS:
            raise ConfigError(f"class_ids={class_ids!r} is not one of {CLASS_IDS}")
        class_index_file = split_folder / "classInd.txt" if split_folder else None
        has_index = class_index_file is not None and class_index_file.is_file()
        if class_ids == "class_ind" and not has_index:
            logger.warning("data.class_ids='class_ind' but no classInd.txt near %s: class ids "
                           "follow the sorted class folder names", self.video_root)
        if class_ids == "class_ind" and has_index:
            index_ids = read_class_index(class_index_file)
            self.class_names = sorted(index_ids, key=index_ids.get)
            return {name.casefold(): i for name, i in index_ids.items()}
        self.class_names = class_folders
        return {name.casefold(): i for i, name in enumerate(class_folders)}

    def _index(self, candidates: list[Path], relative: list[str], labels_of: list[int], probe_threads: int):
        """The usable videos as entries: probes every candidate, records and warns what it skips."""
        with ThreadPoolExecutor(max_workers=max(1, probe_threads)) as pool:
            probes = list(pool.map(_probe, candidates))
        self.skipped: dict[str, str] = {}
        entries = []
        for path, rel, label, probe in zip(candidates, relative, labels_of, probes):
            if isinstance(probe, str):
                self.skipped[str(path)] = f"unreadable: {probe}"
            elif probe < self.min_frames:
                self.skipped[str(path)] = f"too short: {probe} < {self.min_frames} frames"
            else:
                entries.append(VideoEntry(str(path), rel, probe, label))
        self.num_unreadable = sum(r.startswith("unreadable") for r in self.skipped.values())
        self.num_too_short = len(self.skipped) - self.num_unreadable
        if self.skipped:
            named = "; ".join(
                f"{path} ({reason})"
                for path, reason in list(self.skipped.items())[:_NAMED_IN_WARNINGS]
            )
            logger.warning(
                "skipped %d of %d videos under %s (%d unreadable, %d shorter than %d frames): %s%s",
                len(self.skipped), len(candidates), self.video_root, self.num_unreadable,
                self.num_too_short, self.min_frames, named,
                " ..." if len(self.skipped) > _NAMED_IN_WARNINGS else "",
            )
        if not entries:
            raise ConfigError(
                f"no readable video in {self.video_root}: {self.num_candidates} candidates, "
                f"{self.num_unreadable} unreadable, {self.num_too_short} shorter than "
                f"{self.min_frames} frames; point data.path at a folder of videos or frame folders."
            )
        return tuple(entries)

    # -- per-process state (not pickled: each grain worker starts its own) ---------------------

    def _reset_process_state(self) -> None:
        self._lock = threading.Lock()
        self._bad_paths: set[str] = set()
        self.num_read_failures = 0
        self.num_recounted = 0

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_bad_paths", "num_read_failures", "num_recounted"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_process_state()

    # -- the data-source contract ----------------------------------------------------------------

    @property
    def num_videos(self) -> int:
        """Number of usable videos (the source's length)."""
        return len(self.entries)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabeled)."""
        return len(self.class_names) if self.labeled else 0

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (
            f"VideoFolderSource(root={str(self.root)!r}, dataset={self.dataset!r}, "
            f"videos={len(self)}, num_frames={self.num_frames}, "
            f"frame_interval={self.frame_interval}, image_size={self.image_size}, "
            f"seed={self.seed}, split={self.split!r})"
        )

    def describe(self) -> str:
        """A few lines for logs: what was indexed, what was skipped, read failures so far."""
        classes = f"{self.num_classes} classes" if self.labeled else "unlabeled"
        lines = [
            f"VideoFolderSource: {len(self)} videos under {self.video_root} "
            f"(dataset={self.dataset}, split={self.split or 'all'}, {classes})",
            f"  clips: {self.num_frames} frames ({self.rule.frames}) from windows of "
            f"{self.num_frames * self.frame_interval}, flip={self.rule.flip}, "
            f"{self.rule.spatial} to {self.image_size}x{self.image_size}"
            f"{' (antialiased)' if self.antialias else ''}",
            f"  skipped when indexed: {self.num_unreadable} unreadable, {self.num_too_short} "
            f"shorter than {self.min_frames} frames, {self.num_not_in_split} outside the split, "
            f"{self.num_unknown_class} of unknown class; {self.num_missing_from_disk} split "
            "entries missing on disk",
            f"  this process: {self.num_read_failures} read failures, "
            f"{self.num_recounted} clips redrawn with a corrected frame count",
        ]
        return "\n".join(lines)

    def _read_clip(self, entry: VideoEntry, key: int) -> np.ndarray:
        """The augmented clip of `entry` for RNG key `key`: float32 (F, S, S, 3)."""
        plan = clips.sample_clip(
            self.dataset, entry.num_frames, self.num_frames, self.frame_interval,
            np.random.default_rng((self.seed, key)),
        )
        read = lambda indices: read_frames(  # noqa: E731
            entry.path, indices, seek_min_frame=self.seek_min_frame, threads=self.decode_threads
        )
        try:
            frames = read(plan.indices)
        except ShortVideoError as short:
            # The indexed count was too high; the decoded count is a property of the file, so
            # redrawing with it is as deterministic as the first draw.
            if short.num_frames < self.min_frames:
                raise VideoReadError(
                    f"{entry.path}: decodes {short.num_frames} frames, fewer than "
                    f"{self.min_frames}."
                ) from short
            with self._lock:
                self.num_recounted += 1
            plan = clips.sample_clip(
                self.dataset, short.num_frames, self.num_frames, self.frame_interval,
                np.random.default_rng((self.seed, key)),
            )
            frames = read(plan.indices)
        return clips.augment_frames(
            frames, self.dataset, self.image_size, plan.flip, antialias=self.antialias
        )

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        """Clip of video `index % len`, drawn with RNG (seed, index): 'video' float32
        (F, S, S, 3) in [-1, 1], 'label' int32 (). A video that fails to read is replaced by
        the example of index + 1 (then + 2, ...)."""
        index = int(index)
        if index < 0:
            raise IndexError(f"index {index} must be >= 0.")
        count = len(self.entries)
        last_error = None
        for key in range(index, index + count):
            entry = self.entries[key % count]
            if entry.path in self._bad_paths:
                continue
            try:
                video = self._read_clip(entry, key)
            except Exception as error:  # never stop a long run on one file
                last_error = error
                with self._lock:
                    if entry.path not in self._bad_paths:
                        self._bad_paths.add(entry.path)
                        self.num_read_failures += 1
                        logger.warning(
                            "skipping unreadable video %s (%s: %s); %d read failures so far "
                            "in this process.", entry.path, type(error).__name__, error,
                            self.num_read_failures,
                        )
                continue
            return {"video": video, "label": np.asarray(entry.label, dtype=np.int32)}
        raise RuntimeError(
            f"none of the {count} videos under {self.video_root} could be read in this process; "
            f"last error: {type(last_error).__name__}: {last_error}"
        )

    def frame_counts(self) -> np.ndarray:
        """Frame count of each usable video when indexed: int64 (len,)."""
        return np.asarray([entry.num_frames for entry in self.entries], dtype=np.int64)
