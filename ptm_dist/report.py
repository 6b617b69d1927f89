"""`ptm report DIR`: figures and a markdown report for a run or a sweep directory.

    ptm report runs/tiny           # -> runs/tiny/report/{report.md, loss.png, lr.png, ...}
    ptm report sweeps/my-sweep     # -> per-trial metric curves, hyperparameter vs metric

A run directory holds ``metrics.jsonl`` (pretraining lines with tokens/s, or fine-tuning lines
per epoch); a sweep directory holds ``sweep.json``, ``trials.csv`` and ``trials/<id>/``.
Figures are PNGs drawn with matplotlib's Agg backend (no display needed). Object-storage
directories (s3://...) work too: the report is drawn locally and uploaded to ``DIR/report/``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import storage
from ptm_dist.errors import ReportError
from ptm_dist.tracking import read_metrics


def report(path: str) -> str:
    """Write ``<path>/report/`` (figures and report.md); returns the report directory."""
    src = storage.absolute(path)
    if storage.exists(storage.join(src, "sweep.json")):
        kind = "sweep"
    elif storage.exists(storage.join(src, "metrics.jsonl")):
        kind = "run"
    else:
        raise ReportError(f"{path}: neither a run directory (metrics.jsonl) nor a sweep directory "
                          "(sweep.json)")
    out = storage.join(src, "report")
    local = Path(out) if not storage.is_uri(out) else Path(tempfile.mkdtemp(prefix="ptm-report-"))
    local.mkdir(parents=True, exist_ok=True)
    (run_report if kind == "run" else sweep_report)(src, local)
    if storage.is_uri(out):
        import pyarrow.fs as pafs

        fs, dest = storage.resolve(out)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        shutil.rmtree(local, ignore_errors=True)
    return out


# ------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(title: str, xlabel: str, ylabel: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    return fig, ax


def _save(fig, out: Path, name: str, figures: list[tuple[str, str]], caption: str) -> None:
    fig.tight_layout()
    fig.savefig(out / name)
    _plt().close(fig)
    figures.append((name, caption))


def _engineering(ax, axis: str = "x") -> None:
    from matplotlib.ticker import EngFormatter

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(EngFormatter(sep=""))


def _log_if_wide(ax, values: list[float], axis: str = "y", ratio: float = 20.0) -> bool:
    """Log scale when positive values span more than ``ratio``."""
    pos = [v for v in values if v is not None and v > 0]
    if pos and min(pos) > 0 and max(pos) / min(pos) > ratio and len(pos) == len([v for v in values if v is not None]):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        return True
    return False


# ------------------------------------------------------------------ runs


def _series(lines: list[dict], x: str, y: str) -> tuple[list, list]:
    pts = [(m[x], m[y]) for m in lines if m.get(x) is not None and m.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_report(run_dir: str, out: Path) -> None:
    lines = read_metrics(run_dir)
    if not lines:
        raise ReportError(f"{run_dir}/metrics.jsonl: no metrics lines yet")
    job_path = storage.join(run_dir, "job.yaml")
    job_text = storage.read_text(job_path) if storage.exists(job_path) else ""
    job = yaml.safe_load(job_text) or {} if job_text else {}
    pretraining = any("tokens_per_s" in m or "tokens" in m for m in lines)
    figures: list[tuple[str, str]] = []
    if pretraining:
        _pretrain_figures(lines, out, figures)
        facts, hardware = _pretrain_tables(run_dir, lines, job)
    else:
        _finetune_figures(lines, out, figures)
        facts, hardware = _finetune_tables(lines), []
    name = (job.get("run") or {}).get("name") or run_dir.rstrip("/").rsplit("/", 1)[-1]
    md = [f"# Report: {name}", "",
          f"Run directory: `{run_dir}`  ",
          (f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `ptm report` "
          f"from `metrics.jsonl` ({len(lines)} lines)."), "",
          "## Final metrics", "", *_table(["metric", "value"], facts), ""]
    if hardware:
        md += ["## Hardware and throughput", "", *_table(["item", "value"], hardware), ""]
    md += ["## Figures", ""]
    for name_, caption in figures:
        md += [f"### {caption}", "", f"![{caption}]({name_})", ""]
    if job_text:
        md += ["## Job", "", "The resolved job (`job.yaml`):", "", "```yaml", job_text.rstrip(), "```", ""]
    (out / "report.md").write_text("\n".join(md))


def _pretrain_figures(lines: list[dict], out: Path, figures: list) -> None:
    train = [m for m in lines if "loss" in m and "tokens_per_s" in m]
    evals = [m for m in lines if "eval_loss" in m]
    x = "tokens" if all("tokens" in m for m in train + evals) else "step"
    fig, ax = _figure("Training and held-out loss", "tokens seen" if x == "tokens" else "optimizer step",
                      "cross-entropy loss (nats/token)")
    ax.plot(*_series(train, x, "loss"), label="train loss (mean over the log window)", lw=1.4)
    ax.plot(*_series(evals, x, "eval_loss"), "o-", label="held-out loss", ms=4, lw=1.2)
    # A log scale only when the loss falls by more than 3x: it keeps the late, slow part visible.
    if _log_if_wide(ax, [m["loss"] for m in train] + [m["eval_loss"] for m in evals], "y", 3.0):
        ax.set_ylabel("cross-entropy loss (nats/token, log scale)")
    if x == "tokens":
        _engineering(ax)
    ax.legend()
    _save(fig, out, "loss.png", figures, "Loss against tokens seen")

    if any("lr" in m for m in train):
        fig, ax = _figure("Learning-rate schedule", "optimizer step", "learning rate")
        ax.plot(*_series(train, "step", "lr"), lw=1.4)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        _save(fig, out, "lr.png", figures, "Learning rate (warmup, then train.schedule)")

    task_keys = _task_keys(lines)
    if task_keys:  # train.eval_tasks (and ptm eval of the run): lm-evaluation-harness scores
        scored = [m for m in lines if any(k in m for k in task_keys)]
        tx = "tokens" if all("tokens" in m for m in scored) else "step"
        fig, ax = _figure("Downstream tasks (lm-evaluation-harness)", "tokens seen" if tx == "tokens" else
                          "optimizer step", "score")
        for key in task_keys:
            ax.plot(*_series(scored, tx, key), "o-", label=key[len("eval/"):], ms=4, lw=1.2)
        if tx == "tokens":
            _engineering(ax)
        ax.legend()
        _save(fig, out, "eval_tasks.png", figures, "Downstream task scores against tokens seen")

    steps, tps = _series(train, "step", "tokens_per_s")
    fig, ax = _figure("Throughput", "optimizer step", "tokens/s (all workers)")
    ax.plot(steps, tps, lw=1.2, label="per log window")
    if len(tps) > 1:
        mean = sum(tps[1:]) / len(tps[1:])
        ax.axhline(mean, color="C1", ls="--", lw=1, label=f"mean after the first window: {mean:,.0f}")
        ax.legend()
    _engineering(ax, "y")
    ax.set_ylim(bottom=0)
    _save(fig, out, "throughput.png", figures, "Tokens per second")

    steps, mfu = _series(train, "step", "mfu")
    if mfu:
        fig, ax = _figure("Model FLOPs utilisation", "optimizer step", "MFU (% of datasheet bf16 peak)")
        ax.plot(steps, [100 * v for v in mfu], lw=1.2)
        ax.set_ylim(bottom=0)
        _save(fig, out, "mfu.png", figures, "MFU")

    steps, wait = _series(train, "step", "data_wait_frac")
    if wait:
        fig, ax = _figure("Time waiting for data", "optimizer step", "% of step time waiting for the data stream")
        pct = [100 * v for v in wait]
        ax.plot(steps, pct, lw=1.2)
        if _log_if_wide(ax, pct, "y", 50.0):
            ax.set_ylabel("% of step time waiting for the data stream (log scale)")
        else:
            ax.set_ylim(bottom=0)
        _save(fig, out, "data_wait.png", figures, "Data wait")

    steps, norms = _series(train, "step", "grad_norm")
    if norms:
        fig, ax = _figure("Gradient norm (before clipping)", "optimizer step", "global L2 norm (log scale)")
        ax.plot(steps, norms, lw=1.2)
        ax.set_yscale("log")
        _save(fig, out, "grad_norm.png", figures, "Gradient norm")


def _task_keys(lines: list[dict]) -> list[str]:
    """The ``eval/<task>/<metric>`` keys of a run's metrics, in order of first appearance."""
    return list(dict.fromkeys(k for m in lines for k in m if k.startswith("eval/")))


def _pretrain_tables(run_dir: str, lines: list[dict], job: dict) -> tuple[list, list]:
    train = [m for m in lines if "tokens_per_s" in m]
    evals = [m for m in lines if "eval_loss" in m]
    facts: list[list[str]] = []
    if train:
        last = train[-1]
        max_steps = (job.get("train") or {}).get("max_steps")
        facts.append(["optimizer steps", f"{last['step']:,}" + (f" of {max_steps:,}" if max_steps else "")])
        if "tokens" in last:
            facts.append(["tokens seen", f"{last['tokens']:,}"])
        facts.append(["train loss (last log window)", f"{last['loss']:.4f}"])
    if evals:
        first, final = evals[0]["eval_loss"], evals[-1]["eval_loss"]
        facts.append(["held-out loss, first -> last",
                      f"{first:.4f} -> {final:.4f} ({final / first:.0%} of the first)"])
        facts.append(["held-out perplexity (last)", f"{math.exp(min(final, 50)):.2f}"])
    for key in _task_keys(lines):
        scored = [m for m in lines if key in m]
        first, final = scored[0], scored[-1]
        facts.append([f"{key[len('eval/'):]}, step {first['step']:,} -> {final['step']:,}",
                      f"{first[key]:.4f} -> {final[key]:.4f}"])
    hardware: list[list[str]] = []
    ckpt = ckpt_lib.latest_complete_checkpoint(run_dir)
    meta = ckpt_lib.read_meta(ckpt) if ckpt else {}
    scaling = job.get("scaling") or {}
    workers = meta.get("world_size", scaling.get("num_workers"))
    nodes = meta.get("nodes") or []
    hardware.append(["workers", str(workers) if workers is not None else "not recorded"])
    hardware.append(["nodes", str(len(set(nodes))) if nodes else "not recorded"])
    hardware.append(["device", str(meta.get("device", "not recorded"))])
    hardware.append(["precision", str(meta.get("precision", (job.get("train") or {}).get("precision", "?")))])
    if "zero_stage" in meta or job.get("zero"):
        hardware.append(["ZeRO stage", str(meta.get("zero_stage", (job.get("zero") or {}).get("stage")))])
    t, d = job.get("train") or {}, job.get("data") or {}
    if t and d and workers:
        per_step = t["micro_batch"] * t["grad_accum"] * d["seq_len"] * workers
        hardware.append(["tokens per optimizer step", f"{per_step:,}"])
    if train:
        rates = [m["tokens_per_s"] for m in train[1:]] or [train[-1]["tokens_per_s"]]
        mean = sum(rates) / len(rates)
        hardware.append(["mean tokens/s (after the first window)", f"{mean:,.0f}"])
        if workers:
            hardware.append(["mean tokens/s per worker", f"{mean / workers:,.0f}"])
        mfus = [m["mfu"] for m in train[1:] if m.get("mfu") is not None]
        hardware.append(["mean MFU", f"{sum(mfus) / len(mfus):.1%}" if mfus else "not measured (no GPU peak known)"])
        waits = [m["data_wait_frac"] for m in train[1:] if m.get("data_wait_frac") is not None]
        if waits:
            hardware.append(["mean data wait", f"{sum(waits) / len(waits):.2%} of step time"])
    if ckpt:
        hardware.append(["newest complete checkpoint", f"`{ckpt.rsplit('/', 1)[-1]}`"])
    return facts, hardware


_OTHERS = [f"C{k}" for k in range(10) if k != 3]  # C3 (red) marks the best trial
_SCORES = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "f1", "precision", "recall")


def _finetune_figures(lines: list[dict], out: Path, figures: list) -> None:
    epochs = [m for m in lines if "epoch" in m and "eval_loss" in m]
    fig, ax = _figure("Training and evaluation loss", "epoch", "cross-entropy loss (nats)")
    ax.plot(*_series(epochs, "epoch", "loss"), "o-", label="train loss", ms=4)
    ax.plot(*_series(epochs, "epoch", "eval_loss"), "s-", label="eval loss", ms=4)
    ax.legend()
    _save(fig, out, "loss.png", figures, "Loss per epoch")
    present = [k for k in _SCORES if any(k in m for m in epochs)]
    if present:
        fig, ax = _figure("Evaluation metrics", "epoch", "score (0 to 1)")
        for k in present:
            ax.plot(*_series(epochs, "epoch", k), "o-", label=k, ms=4)
        ax.set_ylim(0, 1.02)
        ax.legend()
        _save(fig, out, "eval_metrics.png", figures, "Evaluation metrics per epoch")
    if any("lr" in m for m in epochs):
        fig, ax = _figure("Learning rate", "epoch", "learning rate (end of epoch)")
        ax.plot(*_series(epochs, "epoch", "lr"), "o-", ms=4)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        _save(fig, out, "lr.png", figures, "Learning rate")


def _finetune_tables(lines: list[dict]) -> list:
    epochs = [m for m in lines if "epoch" in m and "eval_loss" in m]
    if not epochs:
        return [["lines", str(len(lines))]]
    last = epochs[-1]
    facts = [["epochs", str(last["epoch"])]]
    for k in ("loss", "eval_loss", *_SCORES):
        if last.get(k) is not None:
            facts.append([f"{k} (last epoch)", f"{last[k]:.4f}"])
    return facts


# ------------------------------------------------------------------ sweeps


def _read_json(path: str) -> dict:
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def _number(text: str):
    try:
        v = float(text)
    except (TypeError, ValueError):
        return text
    return int(v) if v.is_integer() and "." not in str(text) and "e" not in str(text).lower() else v


def sweep_report(sweep_dir: str, out: Path) -> None:
    sweep = _read_json(storage.join(sweep_dir, "sweep.json"))
    best = _read_json(storage.join(sweep_dir, "best.json"))
    metric, mode = sweep.get("metric", "eval_loss"), sweep.get("mode", "min")
    trials_csv = storage.join(sweep_dir, "trials.csv")
    if not storage.exists(trials_csv):
        raise ReportError(f"{sweep_dir}: sweep.json but no trials.csv (is the sweep still running?)")
    rows = list(csv.DictReader(io.StringIO(storage.read_text(trials_csv))))
    if not rows:
        raise ReportError(f"{trials_csv}: no trials yet")
    fixed = {"trial_id", "status", "epochs", metric}
    hp_keys = [k for k in (rows[0].keys() if rows else []) if k not in fixed]
    curves: dict[str, list[dict]] = {}
    for row in rows:
        tid = row["trial_id"]
        lines = read_metrics(storage.join(sweep_dir, "trials", tid))
        curves[tid] = [m for m in lines if "epoch" in m and "eval_loss" in m]
    best_id = best.get("trial_id")
    figures: list[tuple[str, str]] = []

    def final(tid: str, row: dict):
        v = _number(row.get(metric, ""))
        if isinstance(v, (int, float)):
            return v
        vals = [m[metric] for m in curves.get(tid, []) if m.get(metric) is not None]
        return (max if mode == "max" else min)(vals) if vals else None

    for key, title in ((metric, f"{metric} per trial"), ("eval_loss", "Evaluation loss per trial")):
        if key == "eval_loss" and metric == "eval_loss":
            continue
        fig, ax = _figure(title + " (short lines: stopped early by the scheduler)", "epoch",
                          key if key != "eval_loss" else "eval loss (nats)")
        for i, (tid, lines) in enumerate(curves.items()):
            xs, ys = _series(lines, "epoch", key)
            if not xs:
                continue
            is_best = tid == best_id
            ax.plot(xs, ys, "o-", ms=3 if not is_best else 5, lw=2.6 if is_best else 1.0,
                    color="C3" if is_best else _OTHERS[i % len(_OTHERS)],
                    alpha=1.0 if is_best else 0.75, label=f"{tid} (best)" if is_best else tid,
                    zorder=3 if is_best else 2)
        if len(curves) <= 12:
            ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        name = "metric_per_trial.png" if key == metric else "eval_loss_per_trial.png"
        _save(fig, out, name, figures, title)

    for key in hp_keys:
        pts = [(_number(r[key]), final(r["trial_id"], r), r["trial_id"]) for r in rows]
        pts = [p for p in pts if p[1] is not None and p[0] != ""]
        if not pts:
            continue
        fig, ax = _figure(f"{key} against {metric}", key, f"{metric} ({'higher' if mode == 'max' else 'lower'} "
                          "is better)")
        numeric = all(isinstance(p[0], (int, float)) for p in pts)
        if numeric:
            xs = [p[0] for p in pts]
            _log_if_wide(ax, xs, "x")
        else:
            cats = sorted({str(p[0]) for p in pts})
            xs = [cats.index(str(p[0])) for p in pts]
            ax.set_xticks(range(len(cats)), cats)
        ys = [p[1] for p in pts]
        ax.scatter(xs, ys, s=40, color="C0", label="trial (final value)", zorder=2)
        for x, y, p in zip(xs, ys, pts, strict=True):
            if p[2] == best_id:
                ax.scatter([x], [y], s=140, marker="*", color="C3", label=f"best: {p[2]}", zorder=3)
        ax.legend(fontsize=8)
        safe = "".join(c if c.isalnum() else "_" for c in key)
        _save(fig, out, f"hp_{safe}.png", figures, f"{key} against {metric}")

    name = sweep_dir.rstrip("/").rsplit("/", 1)[-1]
    md = [f"# Sweep report: {name}", "",
          f"Sweep directory: `{sweep_dir}`  ",
          f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `ptm report`.", "",
          "## Sweep", "",
          *_table(["setting", "value"], [["metric", f"{metric} ({mode})"],
                             ["search", str(sweep.get("search", "?"))],
                             ["scheduler", str(sweep.get("scheduler", "?"))],
                             ["trials", f"{len(rows)} of {sweep.get('num_samples', len(rows))}"]]), ""]
    if sweep.get("space"):
        md += ["Search space:", "",
               *_table(["hyperparameter", "distribution"],
                       [[k, " ".join(f"{d} {json.dumps(v)}" for d, v in spec.items()) if isinstance(spec, dict)
                         else json.dumps(spec)] for k, spec in sweep["space"].items()]), ""]
    if best:
        md += ["## Best trial", "",
               f"`{best.get('trial_id')}`: {best.get('metric', metric)} = {_fmt(best.get('value'))}", ""]
        if best.get("config"):
            md += _table(["hyperparameter", "value"], [[k, _fmt(v)] for k, v in best["config"].items()])
            md.append("")
    header = list(rows[0].keys()) if rows else []
    ordered = sorted(rows, key=lambda r: (final(r["trial_id"], r) is None,
                                          -(final(r["trial_id"], r) or 0) if mode == "max"
                                          else (final(r["trial_id"], r) or 0)))
    md += ["## Trials", "", f"Sorted by {metric}, best first.", "",
           *_table(header, [[_fmt(_number(r[k])) for k in header] for r in ordered]), "",
           "## Figures", ""]
    for fname, caption in figures:
        md += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    (out / "report.md").write_text("\n".join(md))


# ------------------------------------------------------------------ markdown


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(x) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines
