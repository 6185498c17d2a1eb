"""Stopping a run early with its checkpoint saved: SIGTERM, Ctrl-C; and ending it when a peer dies.

One process: the signal handler sets a flag, the loop reads it at the next step boundary (no
device sync), saves that step and exits with EXIT_SIGTERM / EXIT_SIGINT.

Several processes (`StopAgreement`): a signal reaches one host, or all of them seconds apart, but
every host must stop after the SAME step, or one host starts its save (collectives) while another
runs the next train step (other collectives) and both hang. So the hosts vote: every
`checkpoint.preemption_check_every_steps` steps each one puts its flag (0 none, 1 SIGTERM,
2 SIGINT) into a tiny all-reduce (a (processes,) int32 max over all devices), dispatched
asynchronously right after that step; the result is read one check later, when the device has
long finished it, so the host is never stalled by it. Every host reads the same result at the same
step, so all stop after that step, save their shards of it and exit with the same code (130 if any
host had Ctrl-C, else 143). A signal therefore stops the run 1 to 2 checks after it arrives.
JAX's own preemption sync point (multihost_utils.reached_preemption_sync_point) is not used: it
only knows SIGTERM, through a C++ handler that the Python one replaces, and it swallows a SIGTERM
that arrives before the loop; fvdm_jax.runtime.distributed turns it off.

A host that dies (kill -9, OOM, a dead node): the others either get an error from the failed
collective (CPU/gloo: at once) or hang in it (NCCL, TPU); `PeerWatch` notices a peer whose
heartbeat (a counter in the coordination service's key-value store) stopped for
FVDM_PEER_TIMEOUT_S seconds, before JAX's own heartbeat timeout would abort the process from C++.
Either way `exit_peer_lost` prints one line (what happened, the checkpoint a rerun resumes from)
and ends the process with EXIT_PEER_LOST, skipping JAX's shutdown barrier (which would wait for
the dead peer, then abort with a C++ stack dump).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time

import numpy as np

# Exit codes of a run that stopped early with its checkpoint saved (128 + the signal, as a shell
# reports it): a requeue wrapper can tell "preempted, resume me" from "finished" (0).
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: SIGTERM on any process
EXIT_SIGINT = 128 + signal.SIGINT  # 130: the first Ctrl-C on any process
# Another process died (or its network did): nothing was saved since the newest finished
# checkpoint; a rerun resumes from it. 75 is sysexits' EX_TEMPFAIL: "try again later".
EXIT_PEER_LOST = 75

# The flag each process votes with; the highest wins (a Ctrl-C anywhere makes every process 130).
CODES = {signal.SIGTERM: 1, signal.SIGINT: 2}
EXIT_CODES = {0: 0, 1: EXIT_SIGTERM, 2: EXIT_SIGINT}
NAMES = {1: "SIGTERM", 2: "SIGINT"}


class Preemption:
    """SIGTERM and the first SIGINT set a flag that the loop checks at step boundaries (no device
    sync); the run then saves and stops. A second SIGINT aborts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def code(self) -> int:
        """0: no signal; 1: SIGTERM; 2: SIGINT (what this process votes)."""
        return CODES.get(self.signum, 0)

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopped without saving")
        name = signal.Signals(signum).name
        hint = "; press Ctrl-C again to stop without saving" if signum == signal.SIGINT else ""
        logging.warning("%s received: saving a checkpoint at the next step boundary%s", name, hint)
        if self.signum is None or signum == signal.SIGINT:
            self.signum = signum

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            # None: a handler installed outside Python, which Python cannot reinstall.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def ignore_signals() -> None:
    """After a run stopped and saved: a SIGTERM or Ctrl-C that arrives late (a scheduler signals
    every host, seconds apart) no longer changes the exit code."""
    for signum in Preemption.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class _Vote:
    """One all-reduce (max) of a (processes,) int32 vector over every device: process p writes
    its flag at index p, so every process reads every process's flag."""

    def __init__(self):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.devices()
        self._count, self._index = jax.process_count(), jax.process_index()
        mesh = Mesh(np.array(devices), ("all",))
        self._sharding = NamedSharding(mesh, PartitionSpec("all"))
        self._shape = (len(devices), self._count)
        self._reduce = jax.jit(lambda x: jnp.max(x, axis=0),
                               out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._inputs = {}  # code -> its input array, built once (a vote is then one dispatch)

    def send(self, code: int):
        """Dispatches the vote (asynchronous); read it with `receive`."""
        import jax

        if code not in self._inputs:
            row = np.zeros((1, self._count), np.int32)
            row[0, self._index] = code
            self._inputs[code] = jax.make_array_from_callback(self._shape, self._sharding, lambda _: row)
        return self._reduce(self._inputs[code])

    @staticmethod
    def receive(votes) -> np.ndarray:
        """Every process's flag (waits for the vote if it has not run yet)."""
        return np.asarray(votes.addressable_shards[0].data)


class StopAgreement:
    """After which step the run stops, decided identically on every process (see the module
    docstring). One process: at once, from its own flag."""

    def __init__(self, preemption: Preemption, every: int = 1):
        import jax

        self.preemption = preemption
        self.every = int(every)  # >= 1 (the schema: checkpoint.preemption_check_every_steps)
        self.processes = jax.process_count()
        self._vote = _Vote() if self.processes > 1 else None
        self._pending = None
        self.codes = None  # every process's flag when the stop was agreed

    def _decide(self, codes) -> bool:
        codes = np.asarray(codes).reshape(-1)
        if codes.max() > 0:
            self.codes = codes
            return True
        return False

    def before_first_step(self, start: int) -> bool:
        """True: a process was signalled while the run started (restore, compilation); every
        process stops before training a step (nothing new to save). One blocking vote."""
        if self._vote is None:
            stop = self._decide([self.preemption.code])
        else:
            stop = self._decide(self._vote.receive(self._vote.send(self.preemption.code)))
        if stop:
            logging.warning("stopped before the first step (%s); nothing new to save, a rerun "
                            "resumes from step %d", self.reason, start)
        return stop

    def after_step(self, done: int) -> bool:
        """Called after every step (`done`, 1-based, counts from the run's first step ever, so
        every process checks at the same steps): True when every process stops now."""
        if self._vote is None:
            return self._decide([self.preemption.code])
        if done % self.every:
            return False
        stop = self._pending is not None and self._decide(self._vote.receive(self._pending))
        self._pending = None if stop else self._vote.send(self.preemption.code)
        return stop

    @property
    def code(self) -> int:
        return 0 if self.codes is None else int(self.codes.max())

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.code]

    @property
    def reason(self) -> str:
        """'SIGTERM' (one process), 'SIGTERM on process 0', 'SIGINT on process 1, SIGTERM on process 0'."""
        if self.codes is None:
            return "not stopped"
        if self.processes == 1:
            return NAMES[self.code]
        by = sorted((-int(c), p) for p, c in enumerate(self.codes) if c)
        return ", ".join(f"{NAMES[-c]} on process {p}" for c, p in by)


# --- a peer that dies --------------------------------------------------------------------------

# What a failed collective or coordination call says when the other side is gone.
_PEER_FAILURE = re.compile(
    r"gloo|nccl|connection (reset|refused|closed)|socket closed|broken pipe|unavailable|"
    r"heartbeat|deadline.exceeded|barrier|coordination service|peer", re.IGNORECASE)


def peer_failure(error: BaseException) -> str | None:
    """The one-line cause if `error` (or an error it wraps) is a runtime error of a collective or
    of the coordination service that a dead or unreachable peer explains; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        name = type(error).__name__
        text = " ".join(str(error).split())
        if name in ("JaxRuntimeError", "XlaRuntimeError", "ProcessFailureError") and _PEER_FAILURE.search(text):
            return f"a collective failed, another process died or lost its network ({name}: {text[:200]})"
        error = error.__cause__ or error.__context__
    return None


def newest_finished_step(workdir: str) -> int | None:
    """The newest checkpoint step orbax finished writing (unfinished saves are never read)."""
    try:
        import orbax.checkpoint as ocp

        from fvdm_jax.runtime import files

        steps = ocp.step.checkpoint_steps(files.join(files.resolve(workdir), "checkpoints"))
    except Exception:  # noqa: BLE001 - a message helper: never fail here
        return None
    return max(steps) if steps else None


def resume_note(workdir: str | None) -> str:
    if workdir is None:
        return "rerun the same command"
    step = newest_finished_step(workdir)
    if step is None:
        return "a rerun starts from step 0 (no finished checkpoint)"
    return f"a rerun resumes from checkpoint step {step}, the newest finished one"


def exit_now(code: int, message: str) -> None:
    """Prints `fvdm_jax: error: MESSAGE` (one line) and ends the process at once: no atexit
    handlers, so no jax.distributed shutdown barrier that would wait for a dead peer and then
    abort with a C++ stack dump. The coordination service notices this process's exit."""
    try:
        import jax

        who = f"process {jax.process_index()}/{jax.process_count()}: "
    except Exception:  # noqa: BLE001
        who = ""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    try:
        os.write(2, f"fvdm_jax: error: {who}{message}\n".encode())
    finally:
        os._exit(code)


def exit_peer_lost(what: str, workdir: str | None) -> None:
    """One line (what happened; the checkpoint a rerun resumes from), then exit EXIT_PEER_LOST."""
    exit_now(EXIT_PEER_LOST, f"{what}; stopping without saving (exit {EXIT_PEER_LOST}); {resume_note(workdir)}")


class PeerWatch:
    """A daemon thread that ends this process (`exit_peer_lost`) when another process's heartbeat
    stops for `timeout_s`: the case where this process hangs in a collective with a dead peer
    (NCCL and TPU collectives do not fail, they wait). Each process writes a counter under
    fvdm_jax/alive/ in the coordination service's key-value store every timeout_s / 6 seconds
    and reads everyone's (one small write and one listing per process and period: at 256 hosts
    and the default 60 s, ~26 requests a second at the coordinator). A process that leaves
    training writes 'done' and is no longer watched. No-op on one process."""

    PREFIX = "fvdm_jax/alive/"

    def __init__(self, workdir: str | None = None, timeout_s: float | None = None):
        from fvdm_jax.runtime.distributed import peer_timeout_s

        self.workdir = workdir
        self.timeout_s = float(timeout_s if timeout_s is not None else peer_timeout_s())
        self._stop = threading.Event()
        self._thread = None
        self._client = None

    def __enter__(self):
        import jax

        if jax.process_count() == 1:
            return self
        try:
            from jax._src import distributed  # private: the coordination service client

            self._client = distributed.global_state.client
        except Exception:  # noqa: BLE001 - another JAX: JAX's own heartbeat still ends the run
            self._client = None
        if self._client is None:
            return self
        self._me = jax.process_index()
        self._thread = threading.Thread(target=self._run, name="fvdm-peer-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        period = max(self.timeout_s / 6.0, 0.2)
        beat, last, seen, done = 0, {}, {}, set()
        while not self._stop.is_set():
            beat += 1
            try:
                self._client.key_value_set(f"{self.PREFIX}{self._me}", str(beat), allow_overwrite=True)
                entries = self._client.key_value_dir_get(self.PREFIX)
            except Exception as error:  # noqa: BLE001
                if self._stop.is_set():
                    return
                exit_peer_lost(f"the coordination service (on process 0) does not answer, process 0 "
                               f"died or lost its network ({' '.join(str(error).split())[:160]})",
                               self.workdir)
            now = time.monotonic()
            for key, value in entries:
                try:
                    peer = int(key.rstrip("/").rsplit("/", 1)[-1])
                except ValueError:
                    continue
                if peer == self._me:
                    continue
                if value == "done":
                    done.add(peer)
                elif last.get(peer) != value:
                    last[peer], seen[peer] = value, now
            for peer, when in seen.items():
                if peer not in done and now - when > self.timeout_s:
                    exit_peer_lost(f"process {peer} stopped responding (no heartbeat for "
                                   f"{self.timeout_s:.0f} s: killed, crashed or its host is down)",
                                   self.workdir)
            self._stop.wait(period)

    def __exit__(self, *exc):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._client.key_value_set(f"{self.PREFIX}{self._me}", "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service is gone: nothing left to tell
            pass
