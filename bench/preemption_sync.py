"""What the multi-process stop agreement costs per training step (fvdm_jax/training/preemption.py).

    python bench/preemption_sync.py [--processes=1] [--steps=200] [--every=1,10] [--repeats=5]
                                    [--size=256]

On several processes every host must stop after the same step; the loop agrees through a vote:
every K steps (checkpoint.preemption_check_every_steps) one all-reduce (max) of a (processes,)
int32 vector over all devices, dispatched right after the step and read one vote later. This
script times, on this machine's devices (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8):
  vote_roundtrip   one vote dispatched and read at once (what a blocking check would cost)
  vote_dispatch    the host time to dispatch one vote (what the loop pays per vote)
  loop             a stand-in train step (a data-parallel matmul with a gradient all-reduce
                   over every device) for --steps steps, without the vote and with the vote every
                   K steps exactly as the loop runs it (StopAgreement; on one process, where the
                   loop never votes, as if it did); median of --repeats alternating runs: step_s,
                   and overhead_us_per_step = with - without
  barrier / kv     (several processes) the host-only alternatives through JAX's coordination
                   service: one barrier of every process, and PeerWatch's heartbeat (one
                   key-value write + one listing)
--processes=N (N > 1) starts N copies of itself on localhost (jax.distributed, gloo on CPU), each
with the devices XLA_FLAGS gives it; process 0 prints. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(args, argv) -> int:
    """Starts args.processes copies of this script; forwards process 0's output."""
    port = _free_port()
    procs = []
    for i in range(args.processes):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--process_id={i}",
               f"--coordinator=localhost:{port}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                                      text=True))
    out, _ = procs[0].communicate()
    codes = [procs[0].returncode] + [p.wait() for p in procs[1:]]
    sys.stdout.write(out)
    return max(codes, key=abs)


def _median_us(times) -> float:
    return round(float(np.median(times)) * 1e6, 1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="steps per timed loop")
    parser.add_argument("--every", default="1,10", help="vote every K steps: the K to time")
    parser.add_argument("--repeats", type=int, default=5, help="alternating loop timings; the median counts")
    parser.add_argument("--size", type=int, default=256, help="stand-in step: (size x size) weights")
    parser.add_argument("--votes", type=int, default=200, help="votes timed one by one")
    parser.add_argument("--sync_every", type=int, default=10,
                        help="block on the step every N steps, as the loop does at log steps (XLA:CPU "
                             "deadlocks with hundreds of collective programs in flight on few cores)")
    parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes > 1 and args.process_id is None:
        return _launch(args, argv)

    import jax

    if args.process_id is not None:
        from fvdm_jax.runtime.distributed import initialize

        initialize(args.coordinator, args.processes, args.process_id)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from bench import benchlib
    from fvdm_jax.training.preemption import StopAgreement, _Vote

    primary = jax.process_index() == 0
    common = {"processes": jax.process_count(), "devices": jax.device_count()}

    def emit(line, load):
        if primary:
            benchlib.emit(benchlib.record("preemption_sync", **common, **line), load)

    # --- one vote ------------------------------------------------------------------------
    vote = _Vote()
    vote.receive(vote.send(0))  # compile
    load = benchlib.load_average()
    roundtrip, dispatch = [], []
    for _ in range(args.votes):
        started = time.perf_counter()
        votes = vote.send(0)
        dispatch.append(time.perf_counter() - started)
        vote.receive(votes)
        roundtrip.append(time.perf_counter() - started)
    emit({"result": "vote", "vote_roundtrip_us": _median_us(roundtrip),
          "vote_dispatch_us": _median_us(dispatch)}, load)

    # --- the loop: a stand-in step, without and with the agreement --------------------------
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = 8 * jax.device_count()
    x = jax.make_array_from_callback(
        (rows, args.size), batch_sharding,
        lambda index: np.ones((8, args.size), np.float32))
    w = jax.device_put(jnp.eye(args.size, dtype=jnp.float32) * 0.5, replicated)

    @jax.jit
    def step(w, x):
        grad = jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)  # all-reduce over devices
        return w - 1e-3 * grad

    jax.block_until_ready(step(w, x))
    everies = [int(k) for k in args.every.split(",") if k]

    class _Preempt:
        code = 0

    def run(every):
        agreement = StopAgreement(_Preempt(), every) if every else None
        if agreement is not None and agreement._vote is None:
            agreement._vote = _Vote()  # one process never votes: time the vote as if it did
        params = w
        started = time.perf_counter()
        for done in range(1, args.steps + 1):
            params = step(params, x)
            if agreement is not None and agreement.after_step(done):
                raise RuntimeError("no process was signalled")
            if done % args.sync_every == 0:
                jax.block_until_ready(params)
        jax.block_until_ready(params)
        return (time.perf_counter() - started) / args.steps

    for every in everies:
        run(every)  # warm-up (the vote's compilation)
    variants = [0] + everies
    times = {k: [] for k in variants}
    load = benchlib.load_average()
    for _ in range(args.repeats):
        for every in variants:
            times[every].append(run(every))
    base = float(np.median(times[0]))
    line = {"result": "loop", "steps": args.steps, "repeats": args.repeats, "size": args.size,
            "sync_every": args.sync_every,
            "step_s": round(base, 6)}
    for every in variants[1:]:
        with_vote = float(np.median(times[every]))
        line[f"every_{every}_step_s"] = round(with_vote, 6)
        line[f"every_{every}_overhead_us_per_step"] = round((with_vote - base) * 1e6, 1)
    if jax.process_count() == 1:
        line["note"] = ("one process: the training loop never votes (it stops at the next step on its "
                        "own flag); the every_K figures time the vote as if it did")
    emit(line, load)

    # --- the coordination service's host-only alternatives (several processes) ------------
    if jax.process_count() > 1:
        from jax._src import distributed

        client = distributed.global_state.client
        load = benchlib.load_average()
        barrier, beat = [], []
        for i in range(args.votes):
            started = time.perf_counter()
            client.wait_at_barrier(f"bench_{i}", 60_000)
            barrier.append(time.perf_counter() - started)
        for i in range(args.votes):
            started = time.perf_counter()
            client.key_value_set(f"bench_alive/{jax.process_index()}", str(i), allow_overwrite=True)
            client.key_value_dir_get("bench_alive/")
            beat.append(time.perf_counter() - started)
        emit({"result": "coordination_service", "barrier_us": _median_us(barrier),
              "peer_watch_heartbeat_us": _median_us(beat)}, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
