"""Mean +- std curves over seeds from dpft run directories, and a table of final values.

    python tools/plot_seeds.py --x env_steps --y eval/return --out docs/hopper_ppo.png \
        "PPO=runs/hopper_s0,runs/hopper_s1,runs/hopper_s2" "DPPO=runs/dppo_s0,runs/dppo_s1,runs/dppo_s2"

Each positional argument is ``LABEL=RUN_DIR[,RUN_DIR...]`` (one run per seed). Records of every run's
``metrics.jsonl`` that carry both keys are read; each seed's curve is linearly interpolated onto a common grid
of ``x`` (up to the shortest run's last ``x``, so every point averages all seeds) and the mean and standard
deviation (population, ``ddof=0``) over seeds are plotted as a line and a band. The final value of each seed
is its last record, or with ``--last N`` the mean of its last N records (for noisy per-iteration values such as
``train/return``); the table prints ``mean +- std (n=seeds)``, the per-seed finals and the ``x`` each run reached.

``--reach LABEL`` adds a second table: for every group, the ``x`` at which its mean curve first reaches the
last point of group ``LABEL``'s mean curve (interpolated between grid points; :func:`dpft.plotting.first_reach`) and its
ratio to ``LABEL``'s own (the IN-RIL paper's "0.44x the env steps of RL-only").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

import numpy as np

from dpft.plotting import first_reach, plot_bands, seed_band


def read_curve(run_dir: str, x_key: str, y_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the records of ``RUN_DIR/metrics.jsonl`` holding both keys (finite values), sorted by x."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit("plot_seeds: '%s' has no metrics.jsonl." % run_dir)
    xs, ys = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            x, y = rec.get(x_key), rec.get(y_key)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and np.isfinite(y):
                xs.append(float(x))
                ys.append(float(y))
    if not xs:
        raise SystemExit("plot_seeds: no record of '%s' holds both '%s' and '%s'." % (path, x_key, y_key))
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(ys)[order]


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", help="LABEL=RUN_DIR[,RUN_DIR...]")
    p.add_argument("--x", default="env_steps")
    p.add_argument("--y", default="eval/return")
    p.add_argument("--out", default=None, help="PNG path")
    p.add_argument("--title", default="")
    p.add_argument("--hline", action="append", default=[], help="LABEL=VALUE horizontal reference line")
    p.add_argument("--reach", default=None, help="LABEL of the group whose final mean-curve value the others must reach")
    p.add_argument("--last", type=int, default=1, help="final value of a seed = mean of its last N records")
    a = p.parse_args(argv)
    if a.last < 1:
        raise SystemExit("plot_seeds: --last %d must be >= 1." % a.last)
    groups = {}  # type: Dict[str, List[str]]
    for g in a.groups:
        if "=" not in g:
            raise SystemExit("plot_seeds: '%s' is not LABEL=RUN_DIR[,RUN_DIR...]." % g)
        label, dirs = g.split("=", 1)
        groups[label] = [d for d in dirs.split(",") if d]
    what = "final %s" % a.y if a.last == 1 else "%s, mean of the last %d records" % (a.y, a.last)
    print("| method | seeds | %s (mean +- std) | per seed | %s reached |" % (what, a.x))
    print("|---|---|---|---|---|")
    if a.reach is not None and a.reach not in groups:
        raise SystemExit("plot_seeds: --reach %s is not one of the groups %s." % (a.reach, list(groups)))
    bands = {}
    for label, dirs in groups.items():
        curves = [read_curve(d, a.x, a.y) for d in dirs]
        finals = np.array([float(np.mean(c[1][-a.last:])) for c in curves])
        reached = sorted(int(c[0][-1]) for c in curves)
        print("| %s | %d | %.3f +- %.3f | %s | %s |" % (label, len(dirs), finals.mean(), finals.std(),
                                                      ", ".join("%.3f" % f for f in finals), reached))
        bands[label] = seed_band(curves)
    if a.reach is not None:
        target = float(bands[a.reach][1][-1])  # its mean curve's last point (= the mean of finals when seeds end together)
        ref = first_reach(bands[a.reach][0], bands[a.reach][1], target)
        print()
        print("| method | %s to reach %s's final mean %.3f | ratio to %s |" % (a.x, a.reach, target, a.reach))
        print("|---|---|---|")
        for label, (grid, mean, _std) in bands.items():
            x = first_reach(grid, mean, target)
            ratio = "%.2fx" % (x / ref) if x is not None and ref else "-"
            print("| %s | %s | %s |" % (label, "not reached" if x is None else "%d" % round(x), ratio))
    if a.out:
        hlines = [(h.split("=", 1)[0], float(h.split("=", 1)[1])) for h in a.hline]
        plot_bands({label: band + (len(groups[label]),) for label, band in bands.items()}, a.out, a.x, a.y,
                   title=a.title, hlines=hlines)
        print("wrote %s" % a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
