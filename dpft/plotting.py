"""The PNGs of a run directory, drawn from its ``metrics.jsonl`` in one place.

    from dpft.plotting import Panel, plot_run
    plot_run(RUN_DIR, [Panel("return", [("train/return", "train"), ("eval/return", "eval")])], "curves.png")

Used by ``finetune_curves.png`` (:func:`dpft.agents.finetune.plot_finetune_curves`), ``alignment.png``
(:func:`dpft.agents.inril.plot_alignment`) and the seed bands of ``tools/plot_seeds.py`` (:func:`plot_bands`).

Rules every plot follows: one panel per :class:`Panel` in a row, x is ``x_key`` (``env_steps`` by default)
and a record counts for a series only when both its x and the series' key hold a number (``None`` and missing
keys are skipped, NaN is kept out); ``eval/*`` series are drawn with markers (evaluations are sparse), the
others as lines; a panel with no data is left empty (no legend); the figure's title is the run directory's
name. Nothing is written (``None`` returned) when no panel has any data. matplotlib's ``Agg`` backend is
selected on first use, so it works without a display.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np


@dataclass
class Panel:
    """One axis: ``series`` are ``(metrics key, legend label)`` pairs drawn against ``x_key``."""

    title: str
    series: List[Tuple[str, str]] = field(default_factory=list)
    ylabel: Optional[str] = None
    logy: bool = False  # log scale (only when every plotted value is > 0)


def series(records: Sequence[Mapping[str, Any]], key: str,
           x_key: str = "env_steps") -> Optional[Tuple[List[float], List[float]]]:
    """``(xs, ys)`` of the records holding numbers (not bool, finite y) under both ``x_key`` and ``key``, in
    record order; ``None`` when there are none."""
    xs, ys = [], []  # type: List[float], List[float]
    for r in records:
        x, y = r.get(x_key), r.get(key)
        if _num(x) and _num(y) and math.isfinite(float(y)):
            xs.append(float(x))
            ys.append(float(y))
    return (xs, ys) if xs else None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_panels(records: Sequence[Mapping[str, Any]], panels: Sequence[Panel], path: str, title: str = "",
                x_key: str = "env_steps", x_label: Optional[str] = None, panel_size: Tuple[float, float] = (4.0, 3.6),
                dpi: int = 110) -> Optional[str]:
    """Draw ``panels`` (one row) from ``records`` into ``path``; returns ``path``, or ``None`` (nothing written)
    when no panel has data."""
    data = [[(key, label, series(records, key, x_key)) for key, label in p.series] for p in panels]
    if not any(s for row in data for _, _, s in row):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, panel, row in zip(axes[0], panels, data):
        for key, label, s in row:
            if s:
                ax.plot(s[0], s[1], "o-" if key.startswith("eval/") else "-", ms=3, label=label)
        if panel.logy and ax.lines and all(y > 0 for line in ax.lines for y in line.get_ydata()):
            ax.set_yscale("log")
        if panel.title:
            ax.set_title(panel.title)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        ax.set_xlabel(x_label or x_key.replace("_", " "))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_run(run_dir: str, panels: Sequence[Panel], filename: str, path: Optional[str] = None,
             x_key: str = "env_steps", **kwargs: Any) -> Optional[str]:
    """``RUN_DIR/filename`` (or ``path``) from ``RUN_DIR/metrics.jsonl``, titled with the run's name; ``None``
    when the run has no data for any panel. ``kwargs`` go to :func:`plot_panels`."""
    from dpft.metrics import read_metrics

    records = read_metrics(run_dir)
    if not records:
        return None
    title = kwargs.pop("title", None) or os.path.basename(os.path.abspath(run_dir))
    return plot_panels(records, panels, path or os.path.join(run_dir, filename), title=title, x_key=x_key, **kwargs)


def seed_band(curves: Sequence[Tuple[np.ndarray, np.ndarray]], points: int = 50):
    """``(grid, mean, std)`` over seeds: each ``(x, y)`` curve (x increasing) linearly interpolated onto a
    common grid from the latest first x to the earliest last x (so every point averages every seed);
    population std (``ddof=0``)."""
    hi = min(float(c[0][-1]) for c in curves)
    lo = max(float(c[0][0]) for c in curves)
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([hi])
    vals = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, vals.mean(0), vals.std(0)


def first_reach(grid: np.ndarray, mean: np.ndarray, target: float) -> Optional[float]:
    """The first ``grid`` x at which ``mean`` reaches ``target`` (``mean >= target``), linearly interpolated
    between the two grid points around the crossing; ``None`` if it never does. Shapes: ``grid, mean (P,)``."""
    grid = np.asarray(grid, dtype=float)
    mean = np.asarray(mean, dtype=float)
    hit = np.nonzero(mean >= float(target))[0]
    if hit.size == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return float(grid[0])
    x0, x1, y0, y1 = grid[i - 1], grid[i], mean[i - 1], mean[i]
    return float(x0 + (x1 - x0) * (float(target) - y0) / (y1 - y0))


def plot_bands(bands: Mapping[str, Tuple[np.ndarray, np.ndarray, np.ndarray, int]], path: str, x_label: str,
               y_label: str, title: str = "", hlines: Sequence[Tuple[str, float]] = (), dpi: int = 120) -> str:
    """Mean +- std bands: ``bands[label] = (grid, mean, std, seeds)`` (:func:`seed_band` and the seed count),
    each a line labelled ``"label (n=seeds)"`` and a shaded band; ``hlines`` are ``(label, value)`` dashed
    reference lines. Writes ``path`` (its folder is created) and returns it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (grid, mean, std, n) in bands.items():
        ax.plot(grid, mean, label="%s (n=%d)" % (label, n))
        ax.fill_between(grid, mean - std, mean + std, alpha=0.2)
    for label, value in hlines:
        ax.axhline(float(value), ls="--", c="gray", lw=1)
        ax.text(ax.get_xlim()[0], float(value), " " + label, va="bottom", fontsize=8, color="gray")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title or y_label)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


__all__ = ["Panel", "series", "plot_panels", "plot_run", "seed_band", "plot_bands"]
