"""Small helpers every job shares: atomic file writes and process-0 progress bars.

A reader never sees a half-written file: `atomic_path` yields a temporary name beside the target
(same folder, so the final `os.replace` is atomic on POSIX file systems) and renames it only when
the block finished without an exception; otherwise the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """`with atomic_path(p) as tmp: write(tmp)` -> p appears complete, or not at all. The
    temporary name keeps p's extension (writers such as np.savez and PIL choose by it)."""
    root, ext = os.path.splitext(path)
    temporary = f"{root}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: str, value: Any, *, indent: int | None = 1, sort_keys: bool = True) -> str:
    """value as JSON at path, atomically; creates the folder."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        json.dump(value, f, indent=indent, sort_keys=sort_keys)
    return path


def write_text(path: str, text: str) -> str:
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
    """A tqdm bar shown on process 0 only; None where tqdm is not installed. Use with
    `bar.update(n)` / `bar.close()` (both guarded by `if bar is not None`)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    import jax

    return tqdm(total=total, desc=desc, unit=unit, disable=jax.process_index() != 0, leave=leave)
