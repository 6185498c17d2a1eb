"""The runs, file names, tables and figure of the training-timestep experiment
(fvdm_jax/experiments/ptss.py).

A run is one trained model: a scheme of the `ptss.scheme` registry with its p (None for the
schemes without a coin). Its rows are FVDs per (task, history guidance, evaluation seed), each
stored under `fvd_name`; the history guidance of a task without history frames (generate) is
None. `summarize` groups them, `results_markdown` writes the run x task table (with a
history-guidance column when the scales are an axis of the experiment), `results_plot` the
figure.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from fvdm_jax.diffusion.tasks import get_task
from fvdm_jax.runtime import files


def has_history(task: str) -> bool:
    """Whether a task conditions on real frames (i2v, interpolate, extend): history guidance
    applies to it; generate has none."""
    return get_task(task).evaluation in ("window", "context")


@dataclasses.dataclass(frozen=True)
class Run:
    """One model of the experiment: its training timestep scheme and p (None: no coin)."""

    scheme: str
    p: float | None

    @property
    def name(self) -> str:
        """The workdir under OUT (PTSS keeps the p<p> names of earlier versions: they resume)."""
        if self.scheme == "ptss":
            return f"p{self.p:g}"
        return self.scheme if self.p is None else f"{self.scheme}_p{self.p:g}"

    @property
    def label(self) -> str:
        return self.scheme if self.p is None else f"{self.scheme} p={self.p:g}"


def guidance_tag(config, guidance: float | None) -> str:
    """'' without history guidance, else _hg<g> (vanilla) or _hg<g>_fractional<tau>: the part of
    a task's file names that tells its guidance apart."""
    if not guidance:
        return ""
    sample = config.sample
    if sample.get("history_guidance_mode", "vanilla") == "fractional":
        return f"_hg{guidance:g}_fractional{sample.get('history_noise_level')}"
    return f"_hg{guidance:g}"


def fvd_name(task: str, seed: int, tag: str = "") -> str:
    """fvd/<task><guidance tag>_seed<s>.json."""
    return os.path.join("fvd", f"{task}{tag}_seed{seed}.json")


def evaluations(tasks, seeds, guidances) -> list[tuple[str, float | None, int]]:
    """(task, guidance, seed) of every FVD of one model; guidance None for tasks without history."""
    return [(task, guidance, seed) for task in tasks
            for guidance in (guidances if has_history(task) else (None,)) for seed in seeds]


def only_ptss(runs) -> bool:
    """True when every run is PTSS: the table and figure are then the p ablation's."""
    return all(run.scheme == "ptss" for run in runs)


def summarize(rows: list[dict], runs, tasks, guidances=(0.0,)) -> dict:
    """{(run name, task, guidance): (mean, spread, count)} with spread = max - min over the
    evaluation seeds; guidance is None for the tasks without history frames."""
    table = {}
    for run in runs:
        for task in tasks:
            for guidance in (guidances if has_history(task) else (None,)):
                values = [r["fvd"] for r in rows if r["run"] == run.name and r["task"] == task
                          and r.get("history_guidance") == guidance]
                if values:
                    table[(run.name, task, guidance)] = (sum(values) / len(values),
                                                         max(values) - min(values), len(values))
    return table


def _cell(table, run, task, guidance):
    return table.get((run.name, task, guidance), (float("nan"), float("nan"), 0))


def results_markdown(table: dict, runs, tasks, info: dict, guidances=(0.0,),
                     guidance_axis: bool = False) -> str:
    """The run (x history guidance, with `guidance_axis`) x task table: mean FVD ± half the
    spread, the best of each task in bold."""
    ptss_only = only_ptss(runs)
    axis = guidance_axis
    title = "PTSS ablation" if ptss_only else "Training timestep schemes"
    head = ["p" if ptss_only else "scheme"] + (["history guidance"] if axis else []) + list(tasks)
    lines = [f"# {title}: FVD (lower is better), mean over {info['num_seeds']} evaluation seeds "
             f"(± half the max-min spread)", "",
             f"data: {info['data']}  ", f"recipe: {info['config']}, {info['steps']} steps, seed "
             f"{info['seed']}; {info['num_videos']} videos per FVD; {info['frames']} frames (extend: "
             f"{2 * info['frames']})", "",
             "| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]

    def key_guidance(task, guidance):
        return guidance if has_history(task) else None

    best = {task: min((table[key][0] for run in runs for g in guidances
                       if (key := (run.name, task, key_guidance(task, g))) in table),
                      default=float("inf")) for task in tasks}
    for run in runs:
        for guidance in guidances:
            cells = []
            for task in tasks:
                mean, spread, _ = _cell(table, run, task, key_guidance(task, guidance))
                text = f"{mean:.1f} ± {spread / 2:.1f}"
                cells.append(f"**{text}**" if mean == best[task] else text)
            first = [f"{run.p:g}" if ptss_only else run.label]
            if axis:
                first.append(f"{guidance:g}")
            lines.append("| " + " | ".join(first + cells) + " |")
    no_history = [task for task in tasks if not has_history(task)]
    if axis and no_history:
        lines += ["", f"{', '.join(no_history)}: no history frames to guide on, so one evaluation "
                  "without history guidance, repeated in every guidance row."]
    return "\n".join(lines) + "\n"


def results_plot(table: dict, runs, tasks, path: str, guidances=(0.0,),
                 guidance_axis: bool = False) -> str | None:
    """FVD per run, one line per task (and history guidance): against p when every run is PTSS,
    else over the runs in their order. The spread is drawn as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        logging.warning("no results plot (%s): pip install matplotlib", error)
        return None
    ptss_only = only_ptss(runs)
    axis = guidance_axis
    position = {run.name: (run.p if ptss_only else i) for i, run in enumerate(runs)}
    figure, plot = plt.subplots(figsize=(6.4 if ptss_only else max(6.4, 1.6 * len(runs)), 4.0), dpi=100)
    for task in tasks:
        for guidance in (guidances if has_history(task) else (None,)):
            cells = [(run, table[(run.name, task, guidance)]) for run in runs
                     if (run.name, task, guidance) in table]
            label = task if not (axis and has_history(task)) else f"{task}, guidance {guidance:g}"
            plot.errorbar([position[run.name] for run, _ in cells], [c[0] for _, c in cells],
                          yerr=[c[1] / 2 for _, c in cells], marker="o", capsize=3, label=label)
    if ptss_only:
        plot.set_xlabel("PTSS probability p")
    else:
        plot.set_xticks(range(len(runs)), [run.label for run in runs])
        plot.set_xlabel("training timestep scheme")
    plot.set_ylabel("FVD (lower is better)")
    plot.set_title("PTSS ablation" if ptss_only else "Training timestep schemes")
    plot.grid(True, alpha=0.3)
    plot.legend(fontsize="small")
    figure.tight_layout()
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary)
    plt.close(figure)
    return path
