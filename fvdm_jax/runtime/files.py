"""Small helpers every job shares: atomic file writes and process-0 progress bars.

A reader never sees a half-written file: `atomic_path` yields a temporary name beside the target
(same folder, so the final `os.replace` is atomic on POSIX file systems) and renames it only when
the block finished without an exception; otherwise the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """`with atomic_path(p) as tmp: write(tmp)` -> p appears complete, or not at all. The
    temporary name keeps p's extension (writers such as np.savez and PIL choose by it). For a
    URL p, tmp is a local staging file, uploaded in one write when the block finished and
    removed in any case (an object store shows an object only once its upload is complete)."""
    root, ext = os.path.splitext(path)
    if is_url(path):
        staging = tempfile.mkdtemp(prefix="fvdm_upload_")
        try:
            temporary = os.path.join(staging, f"staged{ext}")
            yield temporary
            with open(temporary, "rb") as source, open_file(path, "wb") as target:
                shutil.copyfileobj(source, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    temporary = f"{root}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: str, value: Any, *, indent: int | None = 1, sort_keys: bool = True) -> str:
    """value as JSON at path, atomically (a URL: written in one request); creates the folder."""
    if is_url(path):
        makedirs(path.rsplit("/", 1)[0])
        with open_file(path, "w") as f:
            json.dump(value, f, indent=indent, sort_keys=sort_keys)
        return path
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        json.dump(value, f, indent=indent, sort_keys=sort_keys)
    return path


def write_text(path: str, text: str) -> str:
    if is_url(path):
        with open_file(path, "w") as f:
            f.write(text)
        return path
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.write(text)
    return path


def savez(path: str, **arrays) -> str:
    """np.savez at path (which must end in .npz), atomically."""
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: an .npz path is expected")
    with atomic_path(path) as temporary:
        np.savez(temporary, **arrays)
    return path


def progress(total: int, desc: str, *, unit: str = "video", leave: bool = False):
    """Progress on process 0: a tqdm bar on a terminal, plain periodic lines in logs (no TTY,
    CI, SLURM), as console.progress says; None on other processes or with console.progress=off.
    Use with `bar.update(n)` / `bar.close()` (both guarded by `if bar is not None`)."""
    from fvdm_jax.runtime import console

    return console.bar(total, desc, unit=unit, leave=leave)


# ---------------------------------------------------------------------------------------------
# Paths: local ones made absolute; URLs (gs://, s3://, anything with a scheme) left alone and
# handled through etils.epath, orbax's own path layer, so a bucket workdir is never turned into
# a local folder named 'gs:'.


def is_url(path) -> bool:
    return "://" in str(path)


def resolve(path) -> str:
    """An absolute local path, or the URL unchanged."""
    return str(path) if is_url(path) else os.path.abspath(path)


def join(root, *parts) -> str:
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *[str(p).strip("/") for p in parts]])
    return os.path.join(root, *parts)


def _path(path):
    """etils.epath: the same calls for local paths and bucket URLs."""
    from etils import epath

    return epath.Path(path)


def exists(path) -> bool:
    return _path(path).exists()


def isdir(path) -> bool:
    return _path(path).is_dir()


def isfile(path) -> bool:
    return _path(path).is_file()


def listdir(path) -> list[str]:
    return sorted(p.name for p in _path(path).iterdir())


def makedirs(path) -> None:
    _path(path).mkdir(parents=True, exist_ok=True)


def open_file(path, mode: str = "r"):
    return _path(path).open(mode)


def move(source, target) -> None:
    if is_url(source) or is_url(target):
        _path(source).rename(target)
    else:
        shutil.move(source, target)  # also across local file systems


def rmtree(path) -> None:
    _path(path).rmtree(missing_ok=True)
