"""Global batches put on the devices ahead of the step, by a background thread."""

from __future__ import annotations

import queue
import threading

from fvdm_jax.runtime import sharding as shd


class DevicePrefetcher:
    """Global batches put on the devices `depth` steps ahead by a background thread, so the
    host-to-device copy overlaps the step. How far it has read never matters to a checkpoint:
    a resumed run starts the data at its step (every batch is a function of the step)."""

    def __init__(self, data_iter, mesh, rules, depth: int):
        self._iter = data_iter
        self._mesh, self._rules = mesh, rules
        self._depth = int(depth)
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(self._depth, 1))
        self._thread = None
        if self._depth > 0:
            self._thread = threading.Thread(target=self._fill, daemon=True, name="device_prefetch")
            self._thread.start()

    def _fill(self):
        try:
            while not self._stop.is_set():
                item = shd.global_batch(next(self._iter), self._mesh, self._rules)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # surfaces in the training thread
            self._queue.put(error)

    def __next__(self):
        if self._thread is None:
            item = shd.global_batch(next(self._iter), self._mesh, self._rules)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
        return item

    def close(self):
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
