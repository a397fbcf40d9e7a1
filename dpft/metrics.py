"""Training metrics: JSON lines in ``RUN_DIR/metrics.jsonl``, optional wandb, and a loss-curve PNG.

Every :meth:`MetricsLogger.log` call appends one line ``{"step": 1000, "time": 12.3, "loss": ..., ...}``
and flushes it, so a killed run keeps every line it logged. On resume from step ``k`` the logger first
drops the lines with ``step > k`` (they came from the part of the run that is redone), so the curves stay
consistent with the weights.

wandb is opt-in (``use_wandb=True``; ``pip install dpft[wandb]``). ``wandb_mode="offline"`` works without an
account (``wandb sync`` uploads later); the run id is kept in ``RUN_DIR/wandb_run_id.txt`` and reused on
resume. Only rank 0 logs under DDP (``rank0=False`` makes every method a no-op).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

from dpft.errors import DpftError

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
WANDB_ID_FILE = "wandb_run_id.txt"


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """All records of ``RUN_DIR/metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def truncate_metrics(run_dir: str, max_step: int) -> int:
    """Rewrite metrics.jsonl without the records whose ``step > max_step``; returns how many were dropped."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    records = read_metrics(run_dir)
    kept = [r for r in records if int(r.get("step", 0)) <= max_step]
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(records) - len(kept)


def _clean(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # tensors / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class MetricsLogger:
    """Append metrics to ``RUN_DIR/metrics.jsonl`` and optionally to wandb.

    Args:
        run_dir: the run directory (created if needed).
        use_wandb: also log to wandb (lazy import; DpftError if it is not installed).
        wandb_project / wandb_mode: wandb project and mode (``online | offline | disabled``).
        config_dict: the run config, sent to wandb.
        rank0: False on DDP ranks other than 0 (nothing is written).
        start_step: the step training starts from: records with a larger step are dropped first
            (0 for a fresh run, the checkpoint step on resume).
    """

    def __init__(self, run_dir: str, use_wandb: bool = False, wandb_project: str = "dpft",
                 wandb_mode: str = "online", config_dict: Optional[Mapping[str, Any]] = None,
                 rank0: bool = True, start_step: int = 0):
        self.run_dir = run_dir
        self.rank0 = bool(rank0)
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = None
        self._wandb_run = None
        self._t0 = time.time()
        if not self.rank0:
            return
        os.makedirs(run_dir, exist_ok=True)
        truncate_metrics(run_dir, int(start_step))
        self._file = open(self.path, "a")
        if use_wandb:
            self._wandb_run = _init_wandb(run_dir, wandb_project, wandb_mode, config_dict, resume=start_step > 0)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write ``{"step": step, "time": seconds since start, **metrics}`` (flushed) and send it to wandb."""
        if not self.rank0 or self._file is None:
            return
        record = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            record[k] = _clean(v)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _init_wandb(run_dir: str, project: str, mode: str, config_dict: Optional[Mapping[str, Any]], resume: bool):
    try:
        import wandb
    except ImportError:
        raise DpftError("logger=wandb needs the wandb package, which is not installed: pip install dpft[wandb] "
                        "(or use logger=none; metrics.jsonl is always written).") from None
    id_path = os.path.join(run_dir, WANDB_ID_FILE)
    run_id = None
    if resume and os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip() or None
    try:
        run = wandb.init(project=project, mode=mode, dir=run_dir, config=dict(config_dict or {}),
                         id=run_id, resume="allow" if run_id else None,
                         name=os.path.basename(os.path.normpath(run_dir)))
    except Exception as e:  # wandb raises its own error types (no login, network, bad project)
        raise DpftError("wandb could not start a run in project '%s' (mode=%s): %s. Use wandb_mode=offline to "
                        "log without an account, or logger=none." % (project, mode, str(e).splitlines()[0]
                                                                      if str(e) else type(e).__name__)) from None
    if run is not None and getattr(run, "id", None):
        with open(id_path, "w") as f:
            f.write(str(run.id) + "\n")
    return run


def plot_loss_curve(run_dir: str, path: Optional[str] = None) -> Optional[str]:
    """Plot train ``loss`` and ``valid_loss`` against step from metrics.jsonl into ``loss_curve.png``.

    Returns the PNG path, or None when there is nothing to plot. Uses matplotlib's Agg canvas directly
    (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    series = {}
    for key, label in (("loss", "train loss"), ("valid_loss", "valid loss (EMA)")):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            series[label] = pts
    if not series:
        return None
    path = path or os.path.join(run_dir, LOSS_CURVE_FILE)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
    if all(y > 0 for pts in series.values() for _, y in pts):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


__all__ = ["MetricsLogger", "read_metrics", "truncate_metrics", "plot_loss_curve", "METRICS_FILE",
           "LOSS_CURVE_FILE"]
