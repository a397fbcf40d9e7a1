"""dpft quickstart stage skipping (agents/quickstart.py) with the three stage functions replaced by fast fakes:
a stage is skipped only when it completed with the same inputs, and a changed input re-runs the stages after it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpft.errors import DpftError


@pytest.fixture
def fakes(monkeypatch):
    import dpft.agents.pretrain as P
    import dpft.envs.demos as D
    import dpft.envs.rollout as R
    from dpft import checkpoint as C
    from dpft.normalization import MinMaxNormalizer
    from dpft.rundir import open_run_dir

    calls = []

    def make_demos(task, num, out, seed, noise, **kw):
        calls.append(("demos", num))
        with open(out, "wb") as f:
            f.write(("demos %d %s %s" % (num, seed, noise)).encode())
        return {}

    def pretrain(cfg):
        calls.append(("pretrain", int(cfg.steps), bool(cfg.resume), bool(cfg.overwrite)))
        with open_run_dir(cfg.out, "pretrain", resume=bool(cfg.resume), overwrite=bool(cfg.overwrite)):
            w = {"w": torch.tensor([float(b) for b in open(cfg.dataset, "rb").read()])}
            norm = MinMaxNormalizer({"state": (np.zeros(1), np.ones(1)), "action": (np.zeros(1), np.ones(1))})
            return C.save_checkpoint(cfg.out, int(cfg.steps), w, w, norm, {}, "steps: 1\n")

    def rollout_checkpoint(run, episodes, num_envs, seed, video, out_dir, **kw):
        calls.append(("rollout", episodes, video, seed))
        os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
        eps = []
        for i in range(episodes):
            v = None
            if i < video:
                v = "videos/episode_%03d.mp4" % i
                open(os.path.join(out_dir, v), "wb").write(b"mp4")
            eps.append({"episode": i, "seed": seed + i, "video": v, "success": True})
        result = {"success_rate": 1.0, "num_episodes": episodes, "episodes": eps,
                  "videos": [e["video"] for e in eps if e["video"]]}
        json.dump(result, open(os.path.join(out_dir, "result.json"), "w"))
        return result

    def finetune(cfg):
        calls.append(("finetune", int(cfg.iterations), bool(cfg.resume), bool(cfg.overwrite)))
        with open_run_dir(cfg.out, "finetune", resume=bool(cfg.resume), overwrite=bool(cfg.overwrite)):
            src = C.find_latest(cfg.checkpoint)
            w = {"w": torch.tensor([float(len(src)), float(cfg.iterations)])}
            norm = MinMaxNormalizer({"state": (np.zeros(1), np.ones(1)), "action": (np.zeros(1), np.ones(1))})
            return C.save_checkpoint(cfg.out, int(cfg.iterations), w, None, norm, {}, "iterations: 1\n")

    import dpft.agents.finetune as F

    monkeypatch.setattr(F, "finetune", finetune)
    monkeypatch.setattr(D, "make_demos", make_demos)
    monkeypatch.setattr(P, "pretrain", pretrain)
    monkeypatch.setattr(R, "rollout_checkpoint", rollout_checkpoint)
    return calls


def test_stages_skip_only_when_inputs_match(tmp_path, fakes):
    from dpft.agents.quickstart import quickstart

    out = str(tmp_path / "qs")
    kw = dict(out=out, demos=3, steps=2, episodes=4, videos=2, finetune=0)
    r = quickstart(**kw)
    assert fakes == [("demos", 3), ("pretrain", 2, False, False), ("rollout", 4, 2, 100000)]
    assert r["num_episodes"] == 4
    # nothing changed: every stage is skipped and the stored result is returned (not overwritten)
    del fakes[:]
    assert quickstart(**kw) == r and fakes == []
    # fewer episodes/videos: only the rollout re-runs, and the old videos are gone
    kw.update(episodes=1, videos=1)
    r1 = quickstart(**kw)
    assert fakes == [("rollout", 1, 1, 100000)]
    assert sorted(os.listdir(os.path.join(out, "rollout", "videos"))) == ["episode_000.mp4"]
    assert json.load(open(os.path.join(out, "rollout", "result.json")))["videos"] == r1["videos"]
    # a changed demos= regenerates the data, retrains from scratch (overwrite) and re-evaluates
    del fakes[:]
    kw.update(demos=5)
    quickstart(**kw)
    assert fakes == [("demos", 5), ("pretrain", 2, False, True), ("rollout", 1, 1, 100000)]
    stages = json.load(open(os.path.join(out, "stages.json")))
    assert stages["demos"]["inputs"]["num"] == 5 and all(s["complete"] for s in stages.values())


def test_killed_pretraining_resumes_and_foreign_out_refused(tmp_path, fakes):
    from dpft.agents.quickstart import quickstart

    out = tmp_path / "qs"
    quickstart(out=str(out), demos=3, steps=2, episodes=1, videos=0, finetune=0)
    stages = json.load(open(out / "stages.json"))
    stages["pretrain"]["complete"] = False  # as if killed during training
    json.dump(stages, open(out / "stages.json", "w"))
    del fakes[:]
    quickstart(out=str(out), demos=3, steps=2, episodes=1, videos=0, finetune=0)
    assert fakes[0] == ("pretrain", 2, True, False)  # same inputs: resume, not start over
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(DpftError, match="is not empty and is not a dpft run directory"):
        quickstart(out=str(foreign))
    assert os.listdir(foreign) == ["notes.txt"]


def test_quickstart_dir_written_before_stage_records_is_adopted_and_rerun(tmp_path, fakes):
    from dpft.agents.quickstart import quickstart

    out = tmp_path / "old"
    (out / "rollout" / "videos").mkdir(parents=True)
    (out / "rollout" / "videos" / "episode_005.mp4").write_bytes(b"old")
    (out / "lift_demos.hdf5").write_bytes(b"old demos")
    quickstart(out=str(out), demos=3, steps=2, episodes=1, videos=0, finetune=0)
    # no record of the inputs: every stage re-runs, and nothing of the old rollout stays
    assert [c[0] for c in fakes] == ["demos", "pretrain", "rollout"]
    assert os.listdir(out / "rollout" / "videos") == []


def test_finetune_stage_runs_after_pretraining_and_prints_before_and_after(tmp_path, fakes, capsys):
    from dpft.agents.quickstart import quickstart

    out = tmp_path / "qs"
    kw = dict(out=str(out), demos=3, steps=2, episodes=2, videos=0, finetune=3)
    r = quickstart(**kw)
    assert fakes == [("demos", 3), ("pretrain", 2, False, False), ("rollout", 2, 0, 100000),
                     ("finetune", 3, False, False), ("rollout", 2, 0, 100000)]
    assert r["pretrained"]["num_episodes"] == 2 and os.path.isfile(out / "rollout_finetuned" / "result.json")
    assert "pretrained -> 100% after DPPO fine-tuning" in capsys.readouterr().out
    del fakes[:]
    assert quickstart(**kw)["success_rate"] == r["success_rate"] and fakes == []  # all five stages reused
    kw.update(finetune=4)  # a longer fine-tuning budget: only stages 4 and 5 re-run (the old run is replaced)
    quickstart(**kw)
    assert fakes == [("finetune", 4, False, True), ("rollout", 2, 0, 100000)]


def test_rollouts_and_finetune_evaluation_use_the_same_settings(tmp_path, fakes, monkeypatch):
    """Issue 19 item 5: the fine-tuning run's iteration-0 evaluation runs the pretrained rollout's episodes with the
    same seeds, number of envs (one shared noise stream), episode length limit and threads; the pretrained rollout
    once ran 2 envs (the core count) x 300 steps on 20 seeds beside an evaluation of 4 envs x 200 steps on 10."""
    import dpft.agents.finetune as F
    import dpft.envs.rollout as R
    from dpft.agents.quickstart import QUICKSTART_ENVS, QUICKSTART_THREADS, quickstart

    seen = {}
    ft_fake, ro_fake = F.finetune, R.rollout_checkpoint

    def finetune(cfg):
        seen["ft"] = cfg
        return ft_fake(cfg)

    def rollout_checkpoint(run, episodes, num_envs, seed, video, out_dir, **kw):
        seen.setdefault("rollouts", []).append((episodes, num_envs, seed, kw.get("env_options")))
        return ro_fake(run, episodes, num_envs, seed, video, out_dir, **kw)

    monkeypatch.setattr(F, "finetune", finetune)
    monkeypatch.setattr(R, "rollout_checkpoint", rollout_checkpoint)
    quickstart(out=str(tmp_path / "qs"), demos=3, steps=2, episodes=6, videos=0, finetune=2)
    ft = seen["ft"]
    assert [r[:3] for r in seen["rollouts"]] == [(6, QUICKSTART_ENVS, 100000)] * 2
    assert all("max_episode_steps" not in (r[3] or {}) for r in seen["rollouts"])
    assert (ft.eval_episodes, ft.envs, ft.eval_seed, ft.max_episode_steps) == (6, QUICKSTART_ENVS, 100000, None)
    assert ft.terminate_on_success and ft.num_threads == QUICKSTART_THREADS == 1
