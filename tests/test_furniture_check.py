"""tools/furniture_check.py against the CPU fake (``--fake``): every check runs and reports its figures."""
from __future__ import annotations

import json

from tools.furniture_check import main, run_checks


def test_furniture_check_runs_every_check_on_the_fake(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["--fake", "--envs", "4", "--chunks", "2", "--act-steps", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = {r["check"]: r for r in json.loads(out.read_text())}
    assert list(report) == ["imports", "build", "obstacle_pose", "throughput", "partial_reset_drift", "nan_env"]
    assert all(r["ok"] is True for r in report.values()), report
    assert report["obstacle_pose"]["max_position_error_m"] < 1e-6  # randomize_obstacle=False: the nominal pose
    assert report["throughput"]["env_steps"] == 4 * 2 * 4 and report["throughput"]["env_steps_per_s"] > 0
    nan = report["nan_env"]
    assert nan["cut_env0"] and nan["other_envs_cut"] == 0 and nan["other_envs_finite"]
    assert nan["env0_finite_after_reset"] and nan["nan_episodes_in_later_chunks"] == 0
    assert report["partial_reset_drift"]["running_envs_max_drift_mm"] >= 0.0
    assert "nan_env" in text and "FAILED" not in text


def test_a_failing_check_is_reported_not_raised(monkeypatch):
    import tools.furniture_check as fc

    def broken(env, obs, chunks):
        raise RuntimeError("PhysX exploded")

    monkeypatch.setattr(fc, "_throughput", broken)
    report = {r["check"]: r for r in run_checks("lamp", envs=2, chunks=1, act_steps=2, fake=True)}
    assert report["throughput"]["ok"] is False and "PhysX exploded" in report["throughput"]["error"]
    assert report["nan_env"]["ok"] is True  # later checks still run
    assert main(["--fake", "--envs", "0"]) == 2
