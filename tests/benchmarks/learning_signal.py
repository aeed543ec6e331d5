"""Does each recipe's embedded default show its method working? Runs every method's default command (the tiny model
on data/toy) at several seeds, reads each run's results.json and metrics.jsonl, and writes

    runs/learning_signal/learning_signal.md     mean +- std (over seeds) of the method's own metric per arm
    runs/learning_signal/<method>.png           that metric per arm (bars, seed std) and the training curve
    runs/learning_signal/learning_signal.json   every number, with the wall time of each run

    python tests/benchmarks/learning_signal.py                       # all methods, seeds 0 1 2 (~1.7 h, one run at a time)
    python tests/benchmarks/learning_signal.py --methods dpo --seeds 0 1 2 --threads 1

A run whose results.json is in --out is read, not repeated: two invocations with other --methods and the same --out
use both cores (--threads 1 each, ~55 min for all), and a last one over every method writes the whole table.

A method "shows its effect" when its target arm beats its baseline arm by more than 3 points AND by more than twice
the seed-to-seed standard deviation of the difference (issue 17's bar); the table says which do. matplotlib is a
test-only requirement (requirements-test.txt)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _get(d, *path):
    for p in path:
        if d is None:
            return None
        d = d.get(p) if isinstance(d, dict) else None
    return d


def pct(x):
    return None if x is None else 100 * x if abs(x) <= 1.0 else x


# method -> its default command, the arms (name -> value from results.json, in points), which arm must beat which
# ("higher" or "lower" is better), and the metrics.jsonl phases whose curve is plotted (phase, key)
METHODS = {
    "dpo": dict(
        cmd=["dpo.py"], metric="closed accuracy on the toy test split (%)", better="higher",
        arms={"warm start (SFT)": lambda r: pct(_get(r, "before", "closed_accuracy")),
              "DPO": lambda r: pct(_get(r, "after", "closed_accuracy"))},
        target=("DPO", "warm start (SFT)"), curve=[("dpo", "margin")]),
    "mmedpo": dict(
        cmd=["mmedpo.py"], metric="closed accuracy on the toy test split (%)", better="higher",
        arms={"base": lambda r: pct(_get(r, "results", "base", "vqa", "closed_accuracy")),
              "DPO (uniform)": lambda r: pct(_get(r, "results", "dpo", "vqa", "closed_accuracy")),
              "MMedPO (weighted)": lambda r: pct(_get(r, "results", "mmedpo", "vqa", "closed_accuracy"))},
        target=("MMedPO (weighted)", "DPO (uniform)"), curve=[("dpo", "margin"), ("mmedpo", "margin")]),
    "mmed_rag": dict(
        cmd=["mmed_rag.py"], metric="VQA accuracy with retrieval on the toy test split (%)", better="higher",
        arms={"no retrieval (before RAG-PT)": lambda r: _get(r, "before", "plain", "vqa", "acc"),  # mmed_rag: in %
              "RAG (before RAG-PT)": lambda r: _get(r, "before", "rag", "vqa", "acc"),
              "RAG + RAG-PT": lambda r: _get(r, "after", "rag", "vqa", "acc")},
        target=("RAG + RAG-PT", "RAG (before RAG-PT)"), curve=[("stage1", "margin"), ("stage2", "margin")]),
    "stllava_med": dict(
        cmd=["stllava_med.py"], metric="closed accuracy on the toy test split (%)", better="higher",
        arms={"stage 1 (SQ-SFT)": lambda r: pct(_get(r, "sft", "closed_accuracy")),
              "stage 2 (self-generated DPO)": lambda r: pct(_get(r, "dpo", "closed_accuracy"))},
        target=("stage 2 (self-generated DPO)", "stage 1 (SQ-SFT)"), curve=[("dpo", "margin")]),
    "huatuo_vision": dict(
        cmd=["huatuo_vision.py"], metric="multiple-choice accuracy on the toy test split (%)", better="higher",
        # the paper's data ablation in miniature: the same two stages on the raw captions as answers (a second run)
        extra_runs={"raw": ["--pubmedvision-data", "raw"]},
        arms={"before training": lambda r: pct(_get(r, "before", "overall")),
              "raw captions (stage 2)": lambda r: pct(_get(r, "raw", "after_stage2", "overall")),
              "built records (stage 2)": lambda r: pct(_get(r, "after_stage2", "overall"))},
        target=("built records (stage 2)", "raw captions (stage 2)"), curve=[("stage2", "loss")]),
    "medrega": dict(
        cmd=["medrega.py"], metric="Text-to-Region acc@0.5 on the toy test split (%)", better="higher",
        arms={"before training": lambda r: pct(_get(r, "before", "t2r", "acc@0.5")),
              "after SFT": lambda r: pct(_get(r, "after", "t2r", "acc@0.5"))},
        target=("after SFT", "before training"), curve=[("sft", "loss")]),
}


def launch(cmd: list[str], run_dir: Path, threads: int):
    """One default run into run_dir (skipped when its results.json exists), its wall time in wall_s.txt."""
    if not (run_dir / "results.json").exists():
        t0 = time.time()
        p = subprocess.run([sys.executable] + cmd + ["--out", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    return json.loads((run_dir / "results.json").read_text())


def run(method: str, seed: int, out: Path, threads: int) -> dict:
    spec = METHODS[method]
    run_dir = out / method / f"seed{seed}"
    results = launch(spec["cmd"] + ["--seed", str(seed)], run_dir, threads)
    for name, flags in spec.get("extra_runs", {}).items():  # an ablation arm that is its own run
        results[name] = launch(spec["cmd"] + ["--seed", str(seed)] + flags, run_dir / name, threads)
    curves = {}
    for phase, key in spec["curve"]:
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if f'"phase": "{phase}"' in line]
        curves[f"{phase}/{key}"] = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    wall = float((run_dir / "wall_s.txt").read_text()) if (run_dir / "wall_s.txt").exists() else None
    return {"arms": {name: f(results) for name, f in spec["arms"].items()}, "curves": curves, "wall_s": wall}


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(method: str, runs: list[dict]) -> dict:
    spec = METHODS[method]
    arms = {name: mean_std([r["arms"][name] for r in runs]) for name in spec["arms"]}
    a, b = spec["target"]
    sign = 1 if spec["better"] == "higher" else -1
    diffs = [sign * (r["arms"][a] - r["arms"][b]) for r in runs if r["arms"][a] is not None and r["arms"][b] is not None]
    d_mean, d_std = mean_std(diffs)
    shown = d_mean is not None and d_mean > 3 and d_mean > 2 * d_std
    walls = [r["wall_s"] for r in runs if r["wall_s"]]
    return {"metric": spec["metric"], "arms": arms, "target": [a, b], "gain": d_mean, "gain_std": d_std,
            "shown": shown, "seeds": len(runs), "wall_s_mean": statistics.mean(walls) if walls else None}


def table(summary: dict) -> str:
    fmt = lambda m, s: "–" if m is None else f"{m:.1f} ± {s:.1f}"
    lines = ["| method | metric | arms (mean ± std over seeds) | gain of target arm | effect shown (> 3 and > 2 std) | "
             "wall time per run |", "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        arms = "; ".join(f"{name} {fmt(*v)}" for name, v in s["arms"].items())
        gain = fmt(s["gain"], s["gain_std"] or 0.0)
        wall = f"{s['wall_s_mean'] / 60:.1f} min" if s["wall_s_mean"] else "–"
        lines.append(f"| {method} | {s['metric']} | {arms} | {s['target'][0]} − {s['target'][1]}: {gain} | "
                     f"{'yes' if s['shown'] else 'no'} | {wall} |")
    return "\n".join(lines)


def plot(method: str, runs: list[dict], summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(summary["arms"])
    means = [summary["arms"][n][0] or 0 for n in names]
    stds = [summary["arms"][n][1] or 0 for n in names]
    ax1.bar(range(len(names)), means, yerr=stds, capsize=4, color=["#999999"] + ["#3366aa"] * (len(names) - 1))
    ax1.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax1.set_ylabel(summary["metric"], fontsize=8)
    ax1.set_title(f"{method}: {summary['seeds']} seeds", fontsize=9)
    for r in runs:
        for name, pts in r["curves"].items():
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], alpha=0.6, label=name)
    handles, labels = ax2.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax2.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax2.set_xlabel("optimizer step", fontsize=8)
    ax2.set_title("training curve (every seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_line(threads: int) -> str:
    """The torch build and CPU the runs ran on: another build (kernels, CPU capability) trains other tiny models from
    the same seeds (README, Learning signal on the toy)."""
    import platform

    import torch

    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{platform.machine()}, {os.cpu_count()} cores, {threads} thread(s) per run")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "runs" / "learning_signal"))
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, everything = {}, {}
    for method in args.methods.split(","):
        runs = [run(method, s, out, args.threads) for s in args.seeds]
        summary[method] = summarise(method, runs)
        everything[method] = {"summary": summary[method], "runs": runs}
        plot(method, runs, summary[method], out / f"{method}.png")
        print(table({method: summary[method]}).splitlines()[-1], flush=True)
    md = table(summary) + "\n\n" + build_line(args.threads)  # the numbers hold for this build only
    (out / "learning_signal.md").write_text(md + "\n")
    (out / "learning_signal.json").write_text(json.dumps({"build": build_line(args.threads), **everything}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
