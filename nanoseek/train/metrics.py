"""Run metrics: one JSON line per logged step in `RUN_DIR/metrics.jsonl`, and PNG curves from them.

    log = MetricsLogger(run_dir)                       # a fresh run: starts the file empty
    log = MetricsLogger(run_dir, resume_step=200)      # a resumed run: drops lines after step 200, appends
    log.log(step=201, **{"loss/train": 2.31, "lr": 3e-4, "expert_load/layer1": 1.2})
    paths = plot_run(run_dir)                          # RUN_DIR/plots/<group>.png, one per metric group

Keys are "group/name" (or a bare name, its own group); `plot_run` draws one figure per group, so
"loss/train", "loss/mtp" and "loss/heldout" share axes. A resumed run truncates lines beyond its
checkpoint's step first, so the curve holds each step once and equals the uninterrupted run's.
Only rank 0 of a distributed run writes (the caller decides; the logger does nothing when `enabled` is False).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError
from nanoseek.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"
SKIP_PLOT = {"step", "time", "epoch"}


class MetricsError(NanoseekError):
    """A run directory without readable metrics."""


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _clean(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it visible rather than invalid
    return v


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of RUN_DIR/metrics.jsonl as a dict; a torn last line (killed mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise MetricsError(f"no {METRICS_FILE} in {run_dir}")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise MetricsError(f"{path}:{i + 1} is not valid JSON") from None
    return rows


def metric_groups(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Group name -> metric keys, in first-seen order ("loss/train" -> group "loss")."""
    groups: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key in SKIP_PLOT or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            group = key.split("/", 1)[0]
            if key not in groups[group]:
                groups[group].append(key)
    return dict(groups)


LOG_SCALE = {"loss", "lr", "grad_norm"}


Series = list[tuple[str, list[tuple[float, float]]]]  # (label, [(step, value), ...]) per line


def plot_series(
    path: str | os.PathLike,
    title: str,
    series: Series,
    *,
    ylabel: str | None = None,
    log_y: bool = False,
    size: tuple[float, float] = (7, 4),
) -> Path:
    """One PNG of lines over steps (the one plotting routine: run curves and the zero report's figures)."""
    # matplotlib takes about a second to import: only runs that plot pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # lazy too, as above

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, pts in series:
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, marker="o" if len(pts) < 30 else None, markersize=3, linewidth=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """One PNG per metric group under RUN_DIR/plots (or out_dir), x axis the step. Returns the paths."""
    rows = read_metrics(run_dir)
    if not rows:
        raise MetricsError(f"{Path(run_dir) / METRICS_FILE} is empty: nothing to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for group, keys in metric_groups(rows).items():
        series = [
            (k, [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r]) for k in keys
        ]
        log_y = group in LOG_SCALE and all(v > 0 for _, pts in series for _, v in pts)
        paths.append(plot_series(out / f"{group.replace(os.sep, '_')}.png", group, series, log_y=log_y))
    return paths
