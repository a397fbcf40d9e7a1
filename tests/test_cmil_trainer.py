"""CMIL trainer (agents/cmil.py, dpft/rl/cmil_agent.py, cmil_policy.py, cmil_replay.py): tiny sizes on CPU.

The env is a 64x64-pixel version of the point-mass FakeEnv (the conv stack needs 64x64 images), injected with
``env_fns``; the dataset is a synthetic robomimic file with 64x64 (or 48x48, resized) agentview images.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpft.envs.fake_env import FakeEnv
from dpft.errors import DpftError
from tests.synth import write_robomimic_hdf5

OBS_SPEC = {"robot0_eef_pos": 3, "object": 3}


class PixelReach(FakeEnv):
    """FakeEnv with a 64x64 ``agentview_image``; ``poison=True`` replaces every reward by a huge random number
    from an unseeded generator (different in every run)."""

    def __init__(self, poison: bool = False, **kw):
        super().__init__(max_episode_steps=8, **kw)
        self.poison = poison
        self._noise = np.random.default_rng()
        self.obs_shapes["agentview_image"] = (64, 64, 3)
        self.obs_dtypes["agentview_image"] = np.dtype(np.uint8)

    def _obs(self):
        obs = super()._obs()
        obs["agentview_image"] = self.render(64, 64)
        return obs

    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        if self.poison:
            r = float(self._noise.normal() * 1e9)
        return obs, r, term, trunc, info


TINY = ["cmil.deter=32", "cmil.stoch=8", "cmil.hidden=32", "cmil.depth=4", "cmil.ensemble=2", "cmil.mlp_units=16",
        "cmil.actor_layers=2", "cmil.actor_units=16", "cmil.critic_layers=2", "cmil.critic_units=16",
        "cmil.disc_layers=1", "cmil.disc_units=16", "cmil.batch_size=2", "cmil.seq_len=6", "cmil.imag_horizon=3",
        "cmil.pretrain_steps=1", "cmil.bc_init_steps=1", "cmil.seed_steps=5", "cmil.train_every=5",
        "cmil.train_steps=1", "cmil.replay_size=400", "cmil.target_every=2", "envs=1", "n_steps=10",
        "iterations=2", "eval_every=1", "eval_episodes=1", "save_every=1", "progress=false", "num_threads=1"]


@pytest.fixture
def pix_hdf5(tmp_path):
    path = tmp_path / "pix.hdf5"
    write_robomimic_hdf5(path, num_demos=3, lengths=[10, 12, 14], obs_spec=OBS_SPEC, action_dim=3, images=True,
                         image_shape=(64, 64, 3))
    return str(path)


def _cfg(dataset, out, *extra):
    from dpft.config import compose

    return compose("finetune", ["agent=cmil", "preset=cmil_cpu", "dataset=%s" % dataset, "out=%s" % out]
                   + TINY + list(extra))


def _train(dataset, out, *extra, poison=False, resume_from=None):
    from dpft.agents.cmil import CmilTrainer

    tr = CmilTrainer(_cfg(dataset, out, *extra), env_fns=[lambda: PixelReach(poison=poison)])
    try:
        tr.run()
        weights = {k: v.clone() for k, v in tr.model.state_dict().items()}
        for name, m in tr.learner.modules().items():
            weights.update({"%s.%s" % (name, k): v.clone() for k, v in m.state_dict().items()})
        return tr, weights
    finally:
        tr.close()


def _same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_replay_windows_alignment_and_state_roundtrip():
    from dpft.rl.cmil_replay import SequenceReplay

    r = SequenceReplay(7, (2, 2, 3), 1)
    for ep, t in ((1, 3), (2, 4), (3, 3)):  # 10 steps into 7: the first 3 are overwritten
        img = np.full((t, 2, 2, 3), ep, np.uint8)
        r.add_episode(img, np.arange(t, dtype=np.float32)[:, None] + 10 * ep)
    assert len(r) == 7 and r.episodes == 3
    state = r.state_dict()
    assert state["image"][:, 0, 0, 0].tolist() == [2, 2, 2, 2, 3, 3, 3]
    assert state["action"][:, 0].tolist() == [0, 21, 22, 23, 0, 31, 32]  # action[0] of an episode is zeroed
    assert state["is_first"].tolist() == [True, False, False, False, True, False, False]
    g = torch.Generator().manual_seed(0)
    b = r.sample(5, 3, g)
    assert b["image"].shape == (5, 3, 2, 2, 3) and b["image"].dtype == torch.uint8
    assert b["is_first"][:, 0].all()  # every window starts a filter
    r2 = SequenceReplay(7, (2, 2, 3), 1)
    r2.load_state_dict(state)
    b1 = r.sample(4, 3, torch.Generator().manual_seed(3))
    b2 = r2.sample(4, 3, torch.Generator().manual_seed(3))
    for k in b1:
        assert torch.equal(b1[k], b2[k])


def test_expert_data_alignment_and_resize(tmp_path):
    from dpft.agents.cmil import _dreamer_actions, load_expert

    path = tmp_path / "pix48.hdf5"
    written = write_robomimic_hdf5(path, num_demos=2, lengths=[5, 6], obs_spec=OBS_SPEC, action_dim=3, images=True,
                                   image_shape=(48, 48, 3))
    d = load_expert(str(path), "agentview_image", ["robot0_eef_pos"])
    assert d.images.shape == (11, 64, 64, 3) and d.images.dtype == np.uint8  # resized from 48x48
    assert d.proprio.shape == (11, 3)
    a = written["demo_0"]["actions"].astype(np.float32)
    shifted = _dreamer_actions(a)
    assert np.all(shifted[0] == 0) and np.allclose(shifted[1:], a[:-1])  # action[t] led to obs t


def test_trainer_iterations_shapes_files_and_schedule(pix_hdf5, tmp_path):
    out = str(tmp_path / "run")
    tr, _ = _train(pix_hdf5, out)
    # 20 env steps; seed_steps 5, then one round of 1 update every 5 steps: 3 rounds + 1 pretraining update
    assert tr.env_steps == 20 and tr.learner.updates == 4 and tr.learner.bc_steps == 1
    recs = _records(out)
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    last = recs[-1]
    for key in ("model_loss", "image_loss", "kl_loss", "disc_loss", "actor_loss", "bc_loss", "critic_loss",
                "imag_reward", "imag_disagreement", "eval/success_rate", "train/return", "env_steps"):
        assert key in last and last[key] is not None and np.isfinite(last[key]), key
    assert "pretrain/model_loss" in recs[1]
    assert os.path.isfile(os.path.join(out, "finetune_curves.png"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    from dpft.checkpoint import find_latest, read_json

    meta = read_json(os.path.join(find_latest(out), "meta.json"))
    assert meta["policy_kind"] == "cmil" and meta["act_steps"] == 1 and meta["obs_keys"] == ["agentview_image"]
    # replay: 3 expert episodes (36 steps) + 2 online iterations of 10 steps (episodes of 8 steps + cut ones)
    assert len(tr.replay) == 36 + 20 + tr.replay.episodes - 3


def test_learner_update_shapes_and_grads(pix_hdf5, tmp_path):
    from dpft.agents.cmil import CmilTrainer

    tr = CmilTrainer(_cfg(pix_hdf5, str(tmp_path / "u")), env_fns=[PixelReach])
    try:
        batch, expert = tr._sample(tr.replay), tr._sample(tr.expert)
        assert batch["image"].shape == (2, 6, 64, 64, 3) and batch["action"].shape == (2, 6, 3)
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        info = tr.learner.update(batch, expert)
        assert all(np.isfinite(v) for v in info.values())
        changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in tr.model.state_dict().items()
                   if not torch.equal(v, before[k])}
        assert {"wm.encoder", "wm.rssm", "wm.decoder", "actor.net"} <= changed
        # imagination rewards are (H, N) = (3, B * L)
        seq = tr.model.wm.imagine(lambda f: tr.model.actor.sample(f, True), tr.model.rssm.initial(4), 3)
        assert seq["feat"].shape == (4, 4, 40) and seq["ens_mean"].shape == (4, 4, 2, 8)
    finally:
        tr.close()


def test_env_rewards_never_reach_learning(pix_hdf5, tmp_path):
    a_tr, a = _train(pix_hdf5, str(tmp_path / "a"))
    b_tr, b = _train(pix_hdf5, str(tmp_path / "b"), poison=True)
    _same(a, b)  # identical weights whatever the env rewards are
    ra, rb = _records(str(tmp_path / "a")), _records(str(tmp_path / "b"))
    assert ra[-1]["train/return"] != rb[-1]["train/return"]  # the rewards were different (and logged)
    assert abs(rb[-1]["eval/return"]) > 1e3


def test_resume_is_exact(pix_hdf5, tmp_path):
    _, full = _train(pix_hdf5, str(tmp_path / "full"), "iterations=3")
    part = str(tmp_path / "part")
    _train(pix_hdf5, part, "iterations=2")  # "killed" after its checkpoint at iteration 2
    tr, resumed = _train(pix_hdf5, part, "iterations=3", "resume=true")
    assert tr.iteration == 3
    _same(full, resumed)
    assert [r["iteration"] for r in _records(part)] == [0, 1, 2, 3]


def test_policy_kind_stateful_reset_in_rollout(pix_hdf5, tmp_path):
    import dpft
    from dpft.envs.rollout import rollout
    from dpft.rl.cmil_policy import CmilPolicy

    out = str(tmp_path / "run")
    _train(pix_hdf5, out, "iterations=1", "cmil.pretrain_steps=0")
    p = dpft.load_policy(out)
    assert isinstance(p, CmilPolicy) and p.stateful and p.weights == "model"
    env = PixelReach()
    obs = {"agentview_image": env.reset(seed=1)["agentview_image"][None]}
    fresh = p.act(obs, seed=0)
    p.act(obs, seed=0)  # the latent moved on
    second = p.act(obs, seed=0)
    p.reset([0])
    after_reset = p.act(obs, seed=0)
    assert np.array_equal(after_reset, fresh) and not np.array_equal(second, fresh)
    assert fresh.shape == (1, 1, 3)
    calls = []
    orig = p.reset
    p.reset = lambda rows=None: (calls.append(rows), orig(rows))[1]
    res = rollout(p, [PixelReach, PixelReach], episodes=3, seed=5, mode="inline", progress=False)
    assert res["num_episodes"] == 3
    assert calls[0] is None and ([0] in calls or [1] in calls)  # all rows at the start, then the finished row
    # checkpoint=<a CMIL run> initializes the encoder (only the encoder) from it
    from dpft.agents.cmil import CmilTrainer

    tr = CmilTrainer(_cfg(pix_hdf5, str(tmp_path / "init"), "checkpoint=%s" % out, "seed=7"), env_fns=[PixelReach])
    try:
        for k, v in p.model.wm.encoder.state_dict().items():
            assert torch.equal(tr.model.wm.encoder.state_dict()[k], v)
        assert not torch.equal(next(tr.model.actor.parameters()), next(p.model.actor.parameters()))  # seed 7
    finally:
        tr.close()


def test_errors(pix_hdf5, tmp_path):
    from dpft.agents.cmil import CmilTrainer
    from dpft.config import compose, to_object

    low = tmp_path / "low.hdf5"
    write_robomimic_hdf5(low, obs_spec=OBS_SPEC, action_dim=3)
    with pytest.raises(DpftError, match=r"no camera key 'agentview_image'.*robot0_eef_pos"):
        CmilTrainer(_cfg(str(low), str(tmp_path / "x")), env_fns=[PixelReach])
    from dpft.agents.finetune import Finetuner, finetune

    with pytest.raises(DpftError, match=r"no camera key"):  # finetune() hands agent=cmil to the CMIL trainer
        finetune(_cfg(str(low), str(tmp_path / "x2")))
    with pytest.raises(DpftError, match="not run by Finetuner"):
        Finetuner(_cfg(pix_hdf5, str(tmp_path / "x3")))
    with pytest.raises(DpftError, match="agent=cmil needs dataset="):
        to_object(compose("finetune", ["agent=cmil", "out=%s" % (tmp_path / "y")])).validate()
    with pytest.raises(DpftError, match="only read by agent=cmil"):
        to_object(compose("finetune", ["agent=ppo", "env=hopper", "dataset=%s" % pix_hdf5,
                                       "out=%s" % (tmp_path / "z")])).validate()
    with pytest.raises(DpftError, match=r"cmil.deter=0 must be >= 1"):
        to_object(_cfg(pix_hdf5, str(tmp_path / "w"), "cmil.deter=0")).validate()
    with pytest.raises(DpftError, match="reward_form"):
        to_object(_cfg(pix_hdf5, str(tmp_path / "w"), "cmil.reward_form=logit")).validate()
    # a non-CMIL checkpoint cannot initialize the DreamerV2 encoder
    from dpft.checkpoint import save_checkpoint
    from dpft.normalization import MinMaxNormalizer

    ck = str(tmp_path / "diff")
    save_checkpoint(ck, 1, {"w": torch.zeros(1)}, None, MinMaxNormalizer({"action": (np.zeros(3), np.ones(3))}),
                    {"policy": "diffusion_mlp", "policy_type": "diffusion"}, "x: 1\n")
    with pytest.raises(DpftError, match="not the DreamerV2 conv encoder"):
        CmilTrainer(_cfg(pix_hdf5, str(tmp_path / "v"), "checkpoint=%s" % ck), env_fns=[PixelReach])


def test_cli_presets_compose():
    from dpft.cli import _with_preset
    from dpft.config import compose, to_object

    assert _with_preset(["agent=cmil", "dataset=d.hdf5", "out=r"])[0] == "preset=cmil_cpu"
    assert _with_preset(["agent=cmil", "device=cuda", "out=r"])[0] == "preset=cmil_paper"
    for preset, deter in (("cmil_cpu", 200), ("cmil_paper", 400)):
        cfg = to_object(compose("finetune", ["agent=cmil", "preset=" + preset, "dataset=d.hdf5", "out=r"]))
        cfg.validate()
        assert cfg.cmil.deter == deter and cfg.envs == 1


def test_proprio_option_update_and_policy(pix_hdf5, tmp_path):
    from dpft.agents.cmil import CmilTrainer

    tr = CmilTrainer(_cfg(pix_hdf5, str(tmp_path / "p"), "cmil.proprio=true", "cmil.proprio_keys=[robot0_eef_pos]",
                          "cmil.seed_action=random"),
                     env_fns=[PixelReach])
    try:
        assert tr.meta["obs_keys"] == ["agentview_image", "robot0_eef_pos"] and tr.model.wm_cfg.proprio_dim == 3
        # expert proprio enters both replays normalized as the online rows and the policy input are (min-max to
        # [-1, 1] from the demos), never raw
        n = len(tr.expert)
        for buf in (tr.expert, tr.replay):
            stored = buf.proprio[:n]
            assert float(stored.min()) == pytest.approx(-1.0, abs=1e-5)
            assert float(stored.max()) == pytest.approx(1.0, abs=1e-5)
        batch = tr._sample(tr.replay)
        assert batch["proprio"].shape == (2, 6, 3)
        info = tr.learner.update(batch, tr._sample(tr.expert))
        assert np.isfinite(info["proprio_loss"])
        tr.reset_envs()
        out = tr.collect_and_train(3)
        assert out["env_steps"] == 3 and len(tr._pending[0]["proprio"]) == 4
        acts = np.stack(tr._pending[0]["action"][1:])  # uniform random seed actions in the normalized box
        assert acts.shape == (3, 3) and np.all(np.abs(acts) <= 1.0) and out["infos"] == []
    finally:
        tr.close()
