"""dpft/plotting.py: the shared run-PNG helper (series selection rules, empty runs, the three users)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest


def _write(run, recs):
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_series_keeps_only_numeric_finite_points():
    from dpft.plotting import series

    recs = [{"env_steps": 0, "a": 1.0}, {"env_steps": 10, "a": None}, {"env_steps": 20}, {"a": 3.0},
            {"env_steps": 30, "a": float("nan")}, {"env_steps": 40, "a": True}, {"env_steps": 50, "a": 2}]
    assert series(recs, "a") == ([0.0, 50.0], [1.0, 2.0])
    assert series(recs, "b") is None
    assert series([{"it": 1, "a": 5.0}], "a", x_key="it") == ([1.0], [5.0])


def test_plot_run_draws_panels_and_skips_empty_runs(tmp_path):
    import matplotlib.image as mpimg

    from dpft.plotting import Panel, plot_run

    run = str(tmp_path / "run")
    _write(run, [{"env_steps": i * 10, "train/return": float(i), "eval/return": (float(i) if i % 2 == 0 else None),
                  "loss": math.exp(-i)} for i in range(6)])
    panels = [Panel("return", [("train/return", "train"), ("eval/return", "eval")]),
              Panel("loss", [("loss", "loss")], logy=True), Panel("nothing", [("absent", "x")])]
    out = plot_run(run, panels, "curves.png")
    assert out == os.path.join(run, "curves.png") and os.path.isfile(out)
    img = mpimg.imread(out)
    assert img.shape[1] > 2 * img.shape[0]  # three panels in a row
    assert plot_run(run, [Panel("none", [("absent", "x")])], "empty.png") is None
    assert not os.path.exists(os.path.join(run, "empty.png"))
    assert plot_run(str(tmp_path / "no_metrics"), panels, "x.png") is None


def test_seed_band_and_plot_bands(tmp_path):
    from dpft.plotting import plot_bands, seed_band

    a = (np.array([0.0, 10.0]), np.array([0.0, 10.0]))
    b = (np.array([0.0, 5.0, 20.0]), np.array([2.0, 4.0, 8.0]))
    grid, mean, std = seed_band([a, b], points=3)
    assert grid.tolist() == [0.0, 5.0, 10.0]  # up to the shorter run's last x
    # b at x=10: 4 + (8 - 4) * 5/15 = 16/3
    assert mean.tolist() == pytest.approx([1.0, 4.5, (10.0 + 16.0 / 3) / 2])
    assert std.tolist() == pytest.approx([1.0, 0.5, abs(10.0 - 16.0 / 3) / 2])
    out = plot_bands({"m": (grid, mean, std, 2)}, str(tmp_path / "sub" / "b.png"), "env steps", "return",
                     hlines=[("ref", 3.0)])
    assert os.path.isfile(out)


def test_first_reach_interpolates_the_crossing():
    from dpft.plotting import first_reach

    grid = np.array([0.0, 10.0, 20.0, 30.0])
    mean = np.array([1.0, 2.0, 6.0, 5.0])
    assert first_reach(grid, mean, 4.0) == pytest.approx(15.0)  # 10 + 10 * (4 - 2) / (6 - 2)
    assert first_reach(grid, mean, 6.0) == pytest.approx(20.0)  # reached exactly at a grid point
    assert first_reach(grid, mean, 0.5) == 0.0
    assert first_reach(grid, mean, 6.5) is None


def test_plot_seeds_reach_table(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plot_seeds", os.path.join(os.path.dirname(__file__), "..", "tools", "plot_seeds.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rl, fast = str(tmp_path / "rl"), str(tmp_path / "fast")
    _write(rl, [{"env_steps": 0, "eval/return": 0.0}, {"env_steps": 100, "eval/return": 10.0}])
    _write(fast, [{"env_steps": 0, "eval/return": 0.0}, {"env_steps": 100, "eval/return": 20.0}])
    assert mod.main(["RL=" + rl, "fast=" + fast, "--reach", "RL"]) == 0
    out = capsys.readouterr().out
    assert "| RL | 100 | 1.00x |" in out
    assert "| fast | 50 | 0.50x |" in out  # 20 * x / 100 = 10 at x = 50
    with pytest.raises(SystemExit, match="--reach nope is not one of the groups"):
        mod.main(["RL=" + rl, "--reach", "nope"])


def test_finetune_and_alignment_pngs_use_the_helper(tmp_path):
    from dpft.agents.finetune import plot_finetune_curves
    from dpft.agents.inril import plot_alignment

    run = str(tmp_path / "ft")
    _write(run, [{"iteration": 0, "env_steps": 0, "eval/success_rate": 0.0, "eval/return": 1.0},
                 {"iteration": 1, "env_steps": 16, "train/success_rate": 0.5, "train/return": 2.0, "inril/m": None}])
    assert plot_finetune_curves(run) == os.path.join(run, "finetune_curves.png")
    assert plot_alignment(run) is None  # no monitor data, m = inf: nothing to draw
    _write(run, [{"iteration": 1, "env_steps": 16, "inril/cos": 0.2, "inril/g_il_norm": 1.0, "inril/g_rl_norm": 2.0},
                 {"iteration": 2, "env_steps": 32, "inril/cos": -0.1, "inril/g_il_norm": 0.5,
                  "inril/g_rl_norm": 3.0, "eval/il_loss_heldout": 0.3, "cair/lambda": 0.6}])
    assert plot_alignment(run) == os.path.join(run, "alignment.png") and os.path.isfile(os.path.join(run, "alignment.png"))


def test_plot_seeds_tool_writes_bands(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_seeds", os.path.join(os.path.dirname(__file__), "..", "tools",
                                                                            "plot_seeds.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for s in (0, 1):
        _write(str(tmp_path / ("r%d" % s)), [{"env_steps": x, "eval/return": float(x + s)} for x in (0, 10, 20)])
    out = str(tmp_path / "p.png")
    assert mod.main(["A=%s,%s" % (tmp_path / "r0", tmp_path / "r1"), "--out", out, "--hline", "ref=5"]) == 0
    assert os.path.isfile(out)
    assert "| A | 2 | 20.500 +- 0.500 | 20.000, 21.000 | [20, 20] |" in capsys.readouterr().out
    # --last 2: each seed's mean of its last two records: (10 + 20) / 2 + s
    assert mod.main(["A=%s,%s" % (tmp_path / "r0", tmp_path / "r1"), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert "eval/return, mean of the last 2 records" in out and "| A | 2 | 15.500 +- 0.500 | 15.000, 16.000 | [20, 20] |" in out
    with pytest.raises(SystemExit, match="--last 0 must be >= 1"):
        mod.main(["A=%s" % (tmp_path / "r0"), "--last", "0"])
