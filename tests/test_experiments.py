"""The PTSS ablation command: one clear line for bad input, and a tiny end-to-end run with the real
training, sampler and I3D on a folder of videos made here (resumable)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from fvdm_jax import media
from fvdm_jax.experiments import ptss

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_SETTINGS = [
    "--set=model.hidden_size=32", "--set=model.depth=2", "--set=model.num_heads=2",
    "--set=model.num_frames=9", "--set=model.input_size=8", "--set=model.patch_size=2",
    "--set=data.frame_interval=1", "--set=train.batch_size=2", "--set=train.warmup_steps=1",
    "--set=train.log_every_steps=1", "--set=checkpoint.async_save=False", "--set=sample.num_steps=2",
    "--set=sample.batch_size=2", "--set=eval.batch_size=2", "--set=mesh.shape=(1,1,1)",
]


def write_videos(folder, count, frames=20, size=16, seed=0):
    """`count` MP4s of a coloured square moving across a gradient (each its own colour, speed)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        colour = rng.integers(40, 255, 3)
        speed = rng.uniform(0.3, 1.0)
        video = np.zeros((frames, size, size, 3), np.uint8)
        for t in range(frames):
            video[t] = (xx * 255 // size)[..., None] // 2
            x0 = int(t * speed) % (size - 4)
            video[t, 4:9, x0:x0 + 5] = colour
        media.write_mp4(os.path.join(folder, f"clip_{i:02d}.mp4"), video, fps=8)
    return str(folder)


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "fvdm_jax.experiments.ptss", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--p=0,1.5"], "every p must be in [0, 1]"),
    (["--p=0,x"], "give comma-separated numbers"),
    (["--steps=0"], "--steps=0 must be >= 1"),
    (["--tasks=generate,outpaint"], "unknown task(s) ['outpaint']"),
    (["--eval_seeds=1,1"], "give distinct integers"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
    code = ptss.main(["--data=demo", f"--out={tmp_path}", *args])
    assert code == 2
    with pytest.raises(ptss.ExperimentError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]")):
        ptss.run(["--data=demo", f"--out={tmp_path}", *args])


def test_bad_data_folders_are_one_line(tmp_path):
    few = write_videos(tmp_path / "few", 5)
    with pytest.raises(ptss.ExperimentError, match="has 5 usable videos .* needs >= 8"):
        ptss.run([f"--data={few}", f"--out={tmp_path / 'out'}", *TINY_SETTINGS])
    short = write_videos(tmp_path / "short", 8, frames=6)
    with pytest.raises(ptss.ExperimentError, match="no readable video .* 8 shorter than 9 frames"):
        ptss.run([f"--data={short}", f"--out={tmp_path / 'out'}", *TINY_SETTINGS])
    with pytest.raises(ptss.ExperimentError, match="is not a folder of videos"):
        ptss.run([f"--data={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}"])
    result = run_cli(f"--data={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fvdm_jax.experiments.ptss: error: --data=")
    assert "Traceback" not in result.stderr


def test_tiny_ablation_end_to_end_and_resume(tmp_path):
    data = write_videos(tmp_path / "videos", 8)
    out = str(tmp_path / "out")
    # generate and extend cover both FVD paths (from noise; from real clips' frames, here twice
    # the window) at both lengths; i2v and interpolate take extend's path (tests/test_report.py
    # runs them at full length).
    tasks = ("generate", "extend")
    args = [f"--data={data}", f"--out={out}", "--p=0,1", "--steps=2", f"--tasks={','.join(tasks)}",
            "--eval_seeds=3", "--num_videos=2", *TINY_SETTINGS]
    started = time.perf_counter()
    summary = ptss.run(args)
    first = time.perf_counter() - started
    rows = summary["rows"]
    assert len(rows) == 2 * 2  # p x task (one evaluation seed here; the spread is tested below)
    assert {(r["p"], r["task"], r["seed"]) for r in rows} == {(p, t, 3) for p in (0.0, 1.0) for t in tasks}
    assert all(np.isfinite(r["fvd"]) and r["fvd"] > 0 and r["num_generated"] == 2 for r in rows)
    assert {r["num_frames"] for r in rows if r["task"] == "extend"} == {18}
    # The two models differ (their p) and so do their FVDs; both saw the same data and seed.
    for p in ("p0", "p1"):
        saved = json.load(open(os.path.join(out, p, "fvd", "generate_seed3.json")))
        assert saved["steps"] == 2
    assert os.path.isfile(os.path.join(out, "results.png"))
    table = open(os.path.join(out, "results.md")).read()
    assert "| 0 |" in table and "| 1 |" in table and "extend" in table and "± 0.0" in table
    assert sorted(os.listdir(os.path.join(out, "sheets"))) == sorted(
        f"p{p}_{t}.png" for p in (0, 1) for t in tasks)
    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results["table"]) == 4 and results["info"]["steps"] == 2

    # A rerun trains and evaluates nothing: every model and FVD is read back.
    started = time.perf_counter()
    again = ptss.run(args)
    assert again["rows"] == rows and time.perf_counter() - started < first / 2
    # The stored FVDs alone are enough: without a model's checkpoints nothing is retrained.
    import shutil

    shutil.rmtree(os.path.join(out, "p0", "checkpoints"))
    assert ptss.run(args)["rows"] == rows
    assert not os.path.exists(os.path.join(out, "p0", "checkpoints"))


def test_summary_table_over_evaluation_seeds():
    rows = [{"p": 0.0, "task": "generate", "seed": 0, "fvd": 100.0},
            {"p": 0.0, "task": "generate", "seed": 1, "fvd": 120.0},
            {"p": 0.2, "task": "generate", "seed": 0, "fvd": 90.0},
            {"p": 0.2, "task": "generate", "seed": 1, "fvd": 96.0},
            {"p": 0.2, "task": "i2v", "seed": 0, "fvd": 50.0}]
    table = ptss.summarize(rows, [0.0, 0.2], ["generate", "i2v"])
    assert table[(0.0, "generate")] == (110.0, 20.0, 2) and table[(0.2, "generate")] == (93.0, 6.0, 2)
    assert (0.0, "i2v") not in table and table[(0.2, "i2v")] == (50.0, 0.0, 1)
    info = {"num_seeds": 2, "data": "d", "config": "c", "steps": 5, "seed": 0, "num_videos": 2, "frames": 9}
    markdown = ptss.results_markdown(table, [0.0, 0.2], ["generate", "i2v"], info)
    assert "| 0 | 110.0 ± 10.0 | nan ± nan |" in markdown  # a missing cell says so
    assert "| 0.2 | **93.0 ± 3.0** | **50.0 ± 0.0** |" in markdown  # the best p per task in bold
