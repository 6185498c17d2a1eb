"""The training-timestep experiment command: one clear line for bad input, the scheme[:p] and --p
forms, the tables, the stored results of earlier versions read back, and tiny end-to-end runs
with the real training, sampler and I3D on a folder of videos made here (resumable)."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from fvdm_jax.config.load import load_config
from fvdm_jax.data import media
from fvdm_jax.experiments import ptss
from fvdm_jax.experiments.results import Run, results_markdown, summarize

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Cheaper still for the default suite's runs: no learned variance, one sampling step, and the
# EMA equal to the weights (decay 0), so that 2 steps already make two models' samples differ.
FAST_SETTINGS = ["--set=model.learn_sigma=False", "--set=sample.num_steps=1", "--set=train.ema_decay=0.0"]
HAS_HISTORY_GUIDANCE = "history_guidance" in load_config(os.path.join(ROOT, "configs", "default.py")).sample
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
    (["--schemes=ptss:0.2,fop"], "unknown scheme 'fop'; use some of ptss,independent,fopp,ptss_fopp"),
    (["--schemes=fopp:0.2"], "fopp has no coin and takes no p; write fopp"),
    (["--schemes=ptss:1.5"], "every p must be in [0, 1] (got ptss:1.5)"),
    (["--schemes=ptss:x"], "'ptss:x' needs a number after ':'"),
    (["--schemes=,"], "--schemes is empty"),
    (["--p=0", "--schemes=fopp"], "give --p or --schemes, not both (--p=0 is --schemes=ptss:0)"),
    (["--schemes=ptss,ptss:0.2"], "the runs repeat p0.2 (a scheme without :p takes the config's ptss.p=0.2)"),
    (["--history_guidance=0,-1"], "give distinct scales >= 0"),
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


def test_schemes_and_the_p_shorthand_name_the_runs():
    def runs(*argv):
        return ptss.check_args(ptss.parse_args(["--data=demo", "--out=o", *argv]))[0]

    # --p is PTSS at each p, and the default is the p ablation; their workdirs keep the names
    # of earlier versions, so the stored results of docs/results/ptss_demo read back.
    assert runs() == [Run("ptss", p) for p in (0.0, 0.2, 0.5, 1.0)]
    assert [r.name for r in runs()] == sorted(os.listdir(os.path.join(ROOT, "docs", "results", "ptss_demo")))[:4]
    assert runs("--p=0,0.2") == runs("--schemes=ptss:0,ptss:0.2")
    mixed = runs("--schemes=ptss:0.2,ptss:0,independent,fopp,ptss_fopp:0.5,ptss_fopp")
    assert [r.name for r in mixed] == ["p0.2", "p0", "independent", "fopp", "ptss_fopp_p0.5", "ptss_fopp"]
    assert [r.label for r in mixed][2:5] == ["independent", "fopp", "ptss_fopp p=0.5"]
    config = ptss.base_config(ptss.parse_args(["--data=demo", "--out=o"]))
    resolved = ptss.resolve_runs(mixed, config)  # a coin scheme without :p takes the config's p
    assert resolved[-1] == Run("ptss_fopp", float(config.ptss.p)) and resolved[:5] == mixed[:5]
    model = ptss.run_config(config, resolved[3])
    assert (model.ptss.scheme, model.ptss.p) == ("fopp", config.ptss.p) and config.ptss.scheme == "ptss"
    assert ptss.guidance_tag(config, None) == ptss.guidance_tag(config, 0.0) == ""
    assert ptss.fvd_name("i2v", 3, "") == os.path.join("fvd", "i2v_seed3.json")
    if HAS_HISTORY_GUIDANCE:
        assert ptss.guidance_tag(config, 1.5) == "_hg1.5"
        config.sample.history_guidance_mode, config.sample.history_noise_level = "fractional", 500
        assert ptss.guidance_tag(config, 1.5) == "_hg1.5_fractional500"


def test_stored_results_of_earlier_versions_read_back_without_training(tmp_path):
    """docs/results/ptss_demo, written before schemes existed, copied into OUT: the default
    command computes nothing and writes the same p x task table."""
    out = tmp_path / "out"
    shutil.copytree(os.path.join(ROOT, "docs", "results", "ptss_demo"), out)
    stored = open(out / "results.md").read()
    summary = ptss.run(["--data=demo", f"--out={out}", "--tasks=generate,i2v,interpolate"])
    assert len(summary["rows"]) == 4 * 3 * 2 and summary["seconds_this_run"] < 60
    assert {r["run"] for r in summary["rows"]} == {"p0", "p0.2", "p0.5", "p1"}
    assert all(r["scheme"] == "ptss" and r["history_guidance"] == (None if r["task"] == "generate" else 0.0)
               for r in summary["rows"])
    table = open(out / "results.md").read()
    assert table[table.index("| p |"):] == stored[stored.index("| p |"):]
    assert not any(os.path.exists(out / run / "checkpoints") for run in ("p0", "p0.2", "p0.5", "p1"))


@pytest.mark.slow  # ~25-40 s on 2 cores; the command's argument and result tests stay
def test_tiny_scheme_comparison_end_to_end_and_resume(tmp_path):
    """Two schemes through the real training, sampler and I3D (the default suite's run)."""
    data = write_videos(tmp_path / "videos", 8)
    out = str(tmp_path / "out")
    args = [f"--data={data}", f"--out={out}", "--schemes=ptss:0.5,fopp", "--steps=2",
            "--tasks=generate", "--eval_seeds=3", "--num_videos=2", *TINY_SETTINGS, *FAST_SETTINGS]
    summary = ptss.run(args)
    rows = summary["rows"]
    assert [(r["run"], r["scheme"], r["p"], r["task"], r["seed"]) for r in rows] == [
        ("p0.5", "ptss", 0.5, "generate", 3), ("fopp", "fopp", None, "generate", 3)]
    assert all(np.isfinite(r["fvd"]) and r["fvd"] > 0 and r["num_generated"] == 2 for r in rows)
    assert rows[0]["fvd"] != rows[1]["fvd"]  # two models, trained with different timesteps
    for name, scheme in (("p0.5", "ptss"), ("fopp", "fopp")):
        assert json.load(open(os.path.join(out, name, "fvd", "generate_seed3.json")))["scheme"] == scheme
    table = open(os.path.join(out, "results.md")).read()
    assert "# Training timestep schemes" in table and "| scheme | generate |" in table
    assert "| ptss p=0.5 |" in table and "| fopp |" in table and "history guidance" not in table
    assert sorted(os.listdir(os.path.join(out, "sheets"))) == ["fopp_generate.png", "p0.5_generate.png"]
    assert os.path.isfile(os.path.join(out, "results.png"))
    results = json.load(open(os.path.join(out, "results.json")))
    assert [(t["run"], t["scheme"], t["p"]) for t in results["table"]] == [("p0.5", "ptss", 0.5),
                                                                           ("fopp", "fopp", None)]
    # A rerun trains and evaluates nothing: every model and FVD is read back, no file rewritten.
    def stored():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for name in ("p0.5", "fopp")
                for d, _, names in os.walk(os.path.join(out, name)) for f in names}

    before = stored()
    assert ptss.run(args)["rows"] == rows and stored() == before


NO_HISTORY_GUIDANCE = ("configs/default.py has no sample.history_guidance yet: the sampler cannot be "
                       "guided by history, so --history_guidance has nothing to set")


@pytest.mark.skipif(not HAS_HISTORY_GUIDANCE, reason=NO_HISTORY_GUIDANCE)
def test_history_guidance_reaches_the_sampler_of_the_zero_shot_tasks(tmp_path):
    from fvdm_jax.sampling.sampler import VideoSampler

    config = ptss.base_config(ptss.parse_args(["--data=demo", "--out=o"]))
    assert VideoSampler.from_config(ptss.guided_config(config, 0.0)).history_guidance is None
    guided = VideoSampler.from_config(ptss.guided_config(config, 1.5)).history_guidance
    assert guided.scale == 1.5 and guided.mode == "vanilla"
    assert config.sample.history_guidance == 0.0  # the base config is left alone
    assert ptss.guided_config(config, None) is config  # generate: no history frames
    # A scale's bad sampling settings stop the command before anything trains.
    with pytest.raises(ptss.ExperimentError, match="fractional' needs sample.history_noise_level"):
        ptss.run(["--data=demo", f"--out={tmp_path / 'out'}", "--history_guidance=0,1.5",
                  "--set=sample.history_guidance_mode=fractional"])
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_HISTORY_GUIDANCE, reason=NO_HISTORY_GUIDANCE)
def test_history_guidance_is_an_axis_of_the_zero_shot_tasks(tmp_path):
    data = write_videos(tmp_path / "videos", 8)
    out = str(tmp_path / "out")
    # 4 steps: zero-initialized gates keep the blocks (and so the history) out of the output
    # until the third update (the first has lr 0, the second moves only the final layer). Even
    # then this model's history changes its eps by ~1e-5, so a scale of 2000 makes it visible.
    args = [f"--data={data}", f"--out={out}", "--schemes=fopp", "--history_guidance=0,2000", "--steps=4",
            "--tasks=i2v", "--eval_seeds=3", "--num_videos=2", *TINY_SETTINGS, *FAST_SETTINGS]
    rows = ptss.run(args)["rows"]
    assert [(r["task"], r["history_guidance"]) for r in rows] == [("i2v", 0.0), ("i2v", 2000.0)]
    assert rows[1]["history_guidance_mode"] == "vanilla" and "history_guidance_mode" not in rows[0]
    assert all(np.isfinite(r["fvd"]) for r in rows) and rows[0]["fvd"] != rows[1]["fvd"]
    assert sorted(os.listdir(os.path.join(out, "fopp", "fvd"))) == ["i2v_hg2000_seed3.json", "i2v_seed3.json"]
    assert sorted(os.listdir(os.path.join(out, "sheets"))) == ["fopp_i2v.png", "fopp_i2v_hg2000.png"]
    table = open(os.path.join(out, "results.md")).read()
    assert "| scheme | history guidance | i2v |" in table
    assert "| fopp | 0 |" in table and "| fopp | 2000 |" in table
    assert ptss.run(args)["rows"] == rows  # read back: nothing is recomputed


@pytest.mark.skipif(HAS_HISTORY_GUIDANCE, reason="configs/default.py has sample.history_guidance")
def test_history_guidance_without_the_config_key_is_one_line(tmp_path):
    with pytest.raises(ptss.ExperimentError, match="the config has no sample.history_guidance"):
        ptss.run(["--data=demo", f"--out={tmp_path}", "--history_guidance=0,1.5"])


@pytest.mark.slow
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
    runs = [Run("ptss", 0.0), Run("ptss", 0.2)]
    rows = [{"run": "p0", "task": "generate", "seed": 0, "fvd": 100.0},
            {"run": "p0", "task": "generate", "seed": 1, "fvd": 120.0},
            {"run": "p0.2", "task": "generate", "seed": 0, "fvd": 90.0},
            {"run": "p0.2", "task": "generate", "seed": 1, "fvd": 96.0},
            {"run": "p0.2", "task": "i2v", "seed": 0, "fvd": 50.0, "history_guidance": 0.0}]
    table = summarize(rows, runs, ["generate", "i2v"])
    assert table[("p0", "generate", None)] == (110.0, 20.0, 2) and table[("p0.2", "generate", None)] == (93.0, 6.0, 2)
    assert ("p0", "i2v", 0.0) not in table and table[("p0.2", "i2v", 0.0)] == (50.0, 0.0, 1)
    info = {"num_seeds": 2, "data": "d", "config": "c", "steps": 5, "seed": 0, "num_videos": 2, "frames": 9}
    markdown = results_markdown(table, runs, ["generate", "i2v"], info)
    assert "| p | generate | i2v |" in markdown  # every run is PTSS: the p ablation's table
    assert "| 0 | 110.0 ± 10.0 | nan ± nan |" in markdown  # a missing cell says so
    assert "| 0.2 | **93.0 ± 3.0** | **50.0 ± 0.0** |" in markdown  # the best per task in bold


def test_scheme_table_with_a_history_guidance_axis():
    runs = [Run("ptss", 0.2), Run("fopp", None)]
    rows = [{"run": "p0.2", "task": "generate", "seed": 0, "fvd": 80.0, "history_guidance": None},
            {"run": "fopp", "task": "generate", "seed": 0, "fvd": 70.0, "history_guidance": None}]
    rows += [{"run": run, "task": "i2v", "seed": 0, "fvd": fvd, "history_guidance": g}
             for run, g, fvd in (("p0.2", 0.0, 60.0), ("p0.2", 3.0, 40.0), ("fopp", 0.0, 65.0),
                                 ("fopp", 3.0, 45.0))]
    table = summarize(rows, runs, ["generate", "i2v"], [0.0, 3.0])
    info = {"num_seeds": 1, "data": "d", "config": "c", "steps": 5, "seed": 0, "num_videos": 2, "frames": 9}
    markdown = results_markdown(table, runs, ["generate", "i2v"], info, [0.0, 3.0], guidance_axis=True)
    assert markdown.startswith("# Training timestep schemes")
    assert "| scheme | history guidance | generate | i2v |" in markdown
    assert "| ptss p=0.2 | 0 | 80.0 ± 0.0 | 60.0 ± 0.0 |" in markdown
    assert "| ptss p=0.2 | 3 | 80.0 ± 0.0 | **40.0 ± 0.0** |" in markdown
    assert "| fopp | 0 | **70.0 ± 0.0** | 65.0 ± 0.0 |" in markdown
    assert "| fopp | 3 | **70.0 ± 0.0** | 45.0 ± 0.0 |" in markdown
    assert "generate: no history frames to guide on" in markdown
