"""The one-shot accelerator suite: every GPU/TPU figure of docs/benchmarks.md in one command.

    python bench/device_suite.py --out=$OUT [--budget_s=480] [--wheels=.whl] [--tiny]

Runs, each as its own subprocess (an out-of-memory batch is retried at half the batch, a stage
that would overrun the budget is skipped and says so), and writes `device_suite.json` (every
JSON line of every stage, with the command) and `device_suite.md` (one table) under --out:
  1. matmul peak (bench/matmul_peak.py, bf16 and fp32);
  2. S/2, B/2 and XL/2 train steps in bf16 with cuDNN attention at the largest batch that fits
     (the first of BATCHES[size] that runs; MFU, videos/s, peak memory);
  3. the XL/2 A/B in one process (bench/train_ab.py): attention xla vs cudnn, remat none vs dots,
     scanned vs unrolled layers;
  4. DDIM-50 latency of one 16 x 256 x 256 XL/2 video (bench/sample_latency.py);
  5. SD-VAE encode throughput at 256 x 256 (bench/encode_throughput.py).
The device image lacks ml_collections (the configs import it): --wheels=DIR installs the wheels
in DIR into a private folder first when ml_collections cannot be imported (see docs/benchmarks.md
for the download command). --tiny runs the same stages on CPU with tiny shapes (the smoke test).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import benchlib  # noqa: E402

# Largest first: the first batch that runs is the one reported (16 frames of 32x32x4 latents,
# bf16 compute, fp32 master weights, one H100/H200).
BATCHES = {"S": (64, 32, 16), "B": (32, 16, 8), "XL": (8, 4, 2, 1)}
TRAIN_FLAGS = ("--dtype=bfloat16", "--attention=cudnn", "--steps=5")
AB_VARIANTS = ("--attention=xla", "--remat=dots", "--unroll")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


class Suite:
    def __init__(self, out: str, budget_s: float, tiny: bool, env: dict):
        self.out, self.tiny, self.env = out, tiny, env
        self.deadline = time.monotonic() + budget_s
        self.records: list[dict] = []
        self.stages: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, stage: str, script: str, args: list[str], need_s: float) -> list[dict] | None:
        """One bench script; its JSON lines, or None (failed / out of memory / skipped)."""
        command = [sys.executable, os.path.join(ROOT, "bench", script), *args]
        if self.left() < need_s:
            self.stages.append(dict(stage=stage, status="skipped: budget",
                                    command=" ".join(command[1:])))
            return None
        started = time.monotonic()
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=self.env,
                                    cwd=ROOT, timeout=max(self.left(), 1))
            status = "ok" if result.returncode == 0 else (
                "oom" if any(m in result.stderr for m in OOM_MARKERS) else "failed")
            stdout, stderr = result.stdout, result.stderr
        except subprocess.TimeoutExpired as timeout:
            status, stdout, stderr = "timeout", timeout.stdout or "", timeout.stderr or ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
        lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
        entry = dict(stage=stage, status=status, seconds=round(time.monotonic() - started, 1),
                     command=" ".join(command[1:]))
        if status != "ok":
            entry["error"] = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
        self.stages.append(entry)
        for line in lines:
            line["stage"] = stage
        self.records += lines
        print(json.dumps(entry), file=sys.stderr, flush=True)  # progress; results go to stdout
        return lines if status == "ok" else None

    def largest_batch(self, stage: str, script: str, args: list[str], batches, need_s: float):
        for batch in batches:
            lines = self.run(f"{stage} batch={batch}", script, [*args, f"--batch_size={batch}"],
                             need_s)
            if lines is not None:
                return lines
            if self.stages[-1]["status"] != "oom":
                return None
        return None

    def write(self) -> tuple[str, str]:
        os.makedirs(self.out, exist_ok=True)
        json_path = os.path.join(self.out, "device_suite.json")
        with open(json_path, "w") as f:
            json.dump(dict(stages=self.stages, records=self.records), f, indent=1)
        md_path = os.path.join(self.out, "device_suite.md")
        with open(md_path, "w") as f:
            f.write(markdown(self.records, self.stages))
        return json_path, md_path


def _gb(value) -> str:
    return f"{value / 2**30:.1f} GiB" if value else "-"


def markdown(records: list[dict], stages: list[dict]) -> str:
    device = next((r["device"] for r in records if "device" in r), "?")
    rows = [f"Device: {device}", "", "| stage | setting | figure | command |", "|---|---|---|---|"]
    for r in records:
        bench, stage = r.get("bench"), r.get("stage", "")
        if bench == "matmul_peak":
            if r.get("result") != "best":
                continue
            figure = f"{r.get('flops_per_s', 0) / 1e12:.2f} TFLOP/s (best size {r.get('size')})"
            setting = r.get("dtype", "")
        elif bench in ("train_throughput", "train_ab"):
            model = r.get("model", {})
            mfu = r.get("mfu")
            figure = (f"step {r.get('step_s', 0) * 1e3:.1f} ms, {r.get('videos_per_s', 0):.2f} videos/s"
                      + (f", MFU {100 * mfu:.1f}%" if mfu else "")
                      + f", peak {_gb(r.get('peak_memory_bytes'))}")
            if bench == "train_ab":
                figure += f", x{r.get('step_time_vs_base')} of base"
            setting = (f"{model.get('size')}/{model.get('patch_size')} batch {r.get('batch')} "
                       f"{model.get('dtype')} attention={model.get('attention')} "
                       f"remat={model.get('remat')} scan={model.get('scan_layers')}"
                       + (f" [{r.get('variant')}]" if bench == "train_ab" else ""))
        elif bench == "sample_latency":
            figure = (f"{r.get('seconds_per_video', r.get('seconds_per_batch', 0)):.3f} s per video"
                      f" ({r.get('num_steps')} steps)")
            setting = f"batch {r.get('batch_size', r.get('batch'))}"
        elif bench == "encode_throughput":
            figure = (f"{r.get('frames_per_s', 0):.1f} frames/s, "
                      f"{r.get('seconds_per_video', 0):.3f} s per video")
            setting = f"{r.get('image_size')} px, {r.get('dtype')}"
        else:
            continue
        rows.append(f"| {stage} | {setting} | {figure} | `{r.get('command', '')}` |")
    rows += ["", "| stage | status | seconds |", "|---|---|---|"]
    rows += [f"| {s['stage']} | {s['status']} | {s.get('seconds', '-')} |" for s in stages]
    return "\n".join(rows) + "\n"


def install_wheels(wheels: str | None, env: dict) -> None:
    """ml_collections (the configs import it) from carried wheels when it is not installed."""
    try:
        import ml_collections  # noqa: F401
        return
    except ImportError:
        pass
    found = sorted(glob.glob(os.path.join(wheels or "", "*.whl"))) if wheels else []
    if not found:
        raise SystemExit("ml_collections is not installed and --wheels names no folder of wheels: "
                         "download them as docs/benchmarks.md says and pass --wheels=DIR")
    target = os.path.join(os.path.abspath(wheels), "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--upgrade", "--target", target, *found], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [target, env.get("PYTHONPATH")]))


def stages(suite: Suite, tiny: bool) -> None:
    if tiny:  # the CPU smoke test: the same stages at sizes that run in seconds
        train = ["--config=configs/tiny.py", "--steps=1"]
        sizes = {"S": (2,), "B": (2,), "XL": (2,)}
        suite.run("matmul", "matmul_peak.py", ["--sizes=64", "--repeats=1"], 5)
        for size, batches in sizes.items():
            suite.largest_batch(f"train {size}", "train_throughput.py", train, batches, 5)
        suite.run("train A/B XL", "train_ab.py",
                  [*train, "--batch_size=2", "--rounds=1", "--variant=--remat=dots"], 5)
        suite.run("DDIM-50 XL", "sample_latency.py",
                  ["--config=configs/tiny.py", "--num_steps=2", "--repeats=1"], 5)
        suite.run("VAE encode", "encode_throughput.py",
                  ["--image_size=16", "--frames=1", "--per_device_batch=1",
                   "--block_out_channels=8,8", "--layers_per_block=1"], 5)
        return
    suite.run("matmul", "matmul_peak.py", ["--repeats=3"], 30)
    base = ["--config=configs/ffs_xl.py", *TRAIN_FLAGS]
    for size in ("S", "B", "XL"):
        suite.largest_batch(f"train {size}/2", "train_throughput.py", [*base, f"--size={size}"],
                            BATCHES[size], 45)
    xl_batch = next((r["batch"] for r in suite.records
                     if r.get("bench") == "train_throughput" and r["model"]["size"] == "XL"), 1)
    suite.run("train A/B XL/2", "train_ab.py",
              ["--config=configs/ffs_xl.py", "--size=XL", f"--batch_size={xl_batch}",
               "--dtype=bfloat16", "--attention=cudnn", "--rounds=3",
               *[f"--variant={v}" for v in AB_VARIANTS]], 150)
    suite.run("DDIM-50 XL/2", "sample_latency.py",
              ["--config=configs/ffs_xl.py", "--size=XL", "--batch_size=1", "--num_steps=50",
               "--dtype=bfloat16", "--attention=cudnn", "--repeats=3"], 60)
    suite.run("VAE encode", "encode_throughput.py",
              ["--image_size=256", "--frames=64", "--per_device_batch=8", "--dtype=bfloat16"], 40)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "device_suite_out")
    parser.add_argument("--budget_s", type=float, default=480.0,
                        help="stop starting stages after this many seconds")
    parser.add_argument("--wheels", default=None, help="a folder of wheels (ml_collections)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    args = parser.parse_args(argv)
    load_before = benchlib.load_average()
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the largest batch that fits
    env["PYTHONUNBUFFERED"] = "1"
    install_wheels(args.wheels, env)
    suite = Suite(args.out, args.budget_s, args.tiny, env)
    try:
        stages(suite, args.tiny)
    finally:
        json_path, md_path = suite.write()
        # The common fields come from the stages' own records: this process never initializes a
        # backend (on a GPU it would take the memory the stages need).
        first = next(iter(suite.records), {})
        common = {k: first.get(k) for k in ("device", "platform", "jax", "python")}
        benchlib.emit(dict(
            bench="device_suite", **common, json=json_path, markdown=md_path,
            stages=len(suite.stages), ok=sum(s["status"] == "ok" for s in suite.stages),
            budget_s=args.budget_s), load_before)


if __name__ == "__main__":
    main()
