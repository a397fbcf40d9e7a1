"""FurnitureBench recipe settings (issue 24): truncation as terminal against hand-computed GAE targets, the observation
clamps of DPPO (normalized +-5) and ResiP (raw and normalized +-3), n_steps / batch_size derived per task, and lamp /
round_table runs reaching their 1,000-step time limit on the CPU fake with the presets."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpft.config import compose
from dpft.envs.base import StepResult
from dpft.errors import DpftError


# ------------------------------------------------------------------------------------------ truncation_as_terminal
class _Env:
    """One env, act_steps 1, reward 1 per step, a time limit of 2 steps (truncated, never terminated)."""

    num_envs, act_steps, cond_steps = 1, 1, 1

    def __init__(self):
        self.t = 0

    def reset(self, seeds=None):
        self.t = 0
        return {"state": np.zeros((1, 1, 1), np.float32)}

    def step(self, action):
        self.t += 1
        end = self.t % 2 == 0
        obs = {"state": np.full((1, 1, 1), float(self.t), np.float32)}
        return StepResult(obs=obs, reward=np.ones(1), terminated=np.zeros(1, bool), truncated=np.array([end]),
                          success=np.zeros(1, bool), final_obs=obs, info={"steps": np.ones(1, np.int64)})


class _Agent:
    """Constant value 0.5, zero actions."""

    def obs_to_model(self, raw, update=False):
        return {"state": torch.as_tensor(raw["state"])}

    def act(self, obs, deterministic=False):
        return {"action": torch.zeros(obs["state"].shape[0], 1, 1)}

    def env_action(self, out):
        return out["action"].numpy()

    def value_batched(self, obs):
        return torch.full((obs["state"].shape[0],), 0.5)

    def on_episode_start(self, rows):
        pass


@pytest.mark.parametrize("as_terminal", [False, True])
def test_truncation_as_terminal_gives_the_hand_computed_gae_targets(as_terminal):
    from dpft.agents.collector import OnPolicyCollector
    from dpft.rl.returns import gae

    col = OnPolicyCollector(_Env(), _Agent(), truncation_as_terminal=as_terminal)
    col.reset([0])
    ro = col.collect(4)  # two episodes of 2 steps, both cut by the time limit
    assert ro.terminated[:, 0].tolist() == [False, as_terminal, False, as_terminal]
    assert ro.truncated[:, 0].tolist() == [False, not as_terminal, False, not as_terminal]
    g, lam, v = 0.9, 0.5, 0.5
    adv, ret = gae(ro.reward, ro.values, ro.next_values, ro.terminated, ro.truncated, g, lam)
    # by hand: the step at the time limit has delta = 1 + g * V(final obs) - V (bootstrap) or 1 - V (terminal);
    # the first step of each episode has delta = 1 + g * V - V and adds g * lam * (the next advantage)
    d_last = 1 - v if as_terminal else 1 + g * v - v
    d_first = 1 + g * v - v
    a_last, a_first = d_last, d_first + g * lam * d_last
    np.testing.assert_allclose(adv[:, 0].numpy(), [a_first, a_last, a_first, a_last], rtol=1e-6)
    np.testing.assert_allclose(ret[:, 0].numpy(), np.array([a_first, a_last, a_first, a_last]) + v, rtol=1e-6)
    if as_terminal:  # the returns are the plain discounted sums of the episode's rewards
        np.testing.assert_allclose(ret[:, 0].numpy()[1], 1.0, rtol=1e-6)


class _SuccessEnv(_Env):
    """Reward 1 at step 2 (the task succeeds and stays successful), time limit at step 4."""

    def step(self, action):
        self.t += 1
        obs = {"state": np.full((1, 1, 1), float(self.t), np.float32)}
        return StepResult(obs=obs, reward=np.array([1.0 if self.t == 2 else 0.0]), terminated=np.zeros(1, bool),
                          truncated=np.array([self.t == 4]), success=np.array([self.t >= 2]), final_obs=obs,
                          info={"steps": np.ones(1, np.int64)})


def test_success_as_terminal_makes_every_step_after_success_terminal_like_resip():
    from dpft.agents.collector import OnPolicyCollector
    from dpft.rl.returns import gae

    col = OnPolicyCollector(_SuccessEnv(), _Agent(), truncation_as_terminal=True, success_as_terminal=True)
    col.reset([0])
    ro = col.collect(4)
    assert ro.terminated[:, 0].tolist() == [False, True, True, True]
    assert not bool(ro.truncated.any())
    g, lam, v = 0.9, 0.5, 0.5
    adv, _ = gae(ro.reward, ro.values, ro.next_values, ro.terminated, ro.truncated, g, lam)
    # ResiP's GAE by hand: steps 2-4 are terminal (delta = r - V), step 1 bootstraps V and adds g lam A_2
    a2, a3 = 1 - v, 0 - v
    np.testing.assert_allclose(adv[:, 0].numpy(), [0 + g * v - v + g * lam * a2, a2, a3, a3], rtol=1e-6)


# ------------------------------------------------------------------------------------------ observation clamps
def _policy(**meta_extra):
    from dpft.normalization import MinMaxNormalizer
    from dpft.policy import Policy

    meta = {"obs_keys": ["state"], "low_dim_keys": ["state"], "image_keys": [], "obs_shapes": {"state": [2]},
            "obs_dim": 2, "action_dim": 1, "horizon_steps": 1, "cond_steps": 1, "act_steps": 1}
    meta.update(meta_extra)
    norm = MinMaxNormalizer({"state": (np.zeros(2), np.ones(2)), "action": (-np.ones(1), np.ones(1))})
    return Policy(torch.nn.Linear(2, 1), norm, meta, weights="model")


def test_observation_clamps_act_before_and_after_normalizing():
    raw = np.array([[10.0, 0.25]], np.float32)  # state range [0, 1]: x_n = 2 x - 1
    out = lambda p: p.normalize_obs({"state": raw})["state"].reshape(-1).tolist()  # noqa: E731
    assert out(_policy()) == pytest.approx([19.0, -0.5])  # no clamp (the default)
    assert out(_policy(obs_clip=5.0)) == pytest.approx([5.0, -0.5])  # DPPO: normalized +-5
    assert out(_policy(raw_obs_clip=3.0)) == pytest.approx([5.0, -0.5])  # ResiP: raw 10 -> 3 -> 5
    assert out(_policy(raw_obs_clip=3.0, obs_clip=3.0)) == pytest.approx([3.0, -0.5])  # ResiP: both
    with pytest.raises(DpftError, match="obs_clip=-1"):
        _policy(obs_clip=-1)


def test_clamp_and_derived_settings_are_validated():
    with pytest.raises(DpftError, match="obs_clip=0.0 must be > 0"):
        compose("finetune", ["env=hopper", "agent=ppo", "out=o", "obs_clip=0"]).validate()
    with pytest.raises(DpftError, match="obs_clip=5.0 with agent.obs_norm=true"):
        from dpft.config import to_object

        to_object(compose("finetune", ["env=hopper", "agent=ppo", "out=o", "obs_clip=5",
                                       "agent.obs_norm=true"])).validate()
    from dpft.envs.furniture import recipe_batch_size

    assert recipe_batch_size("dppo", "furniture", {"furniture": "one_leg", "randomness": "low"}, "diffusion_mlp",
                             88, 1000) == 17600
    assert recipe_batch_size("dppo", "furniture", {"furniture": "one_leg", "randomness": "med"}, "diffusion_mlp",
                             88, 1000) == 8800
    assert recipe_batch_size("dppo", "furniture", {"furniture": "lamp", "randomness": "low"}, "diffusion_unet",
                             125, 1000) == 40000
    assert recipe_batch_size("ppo", "furniture", {"furniture": "one_leg"}, "gaussian_mlp", 88, 1000) == 8800
    assert recipe_batch_size("residual_ppo", "furniture", {}, "diffusion_unet", 1000, 1024) == 1024000
    with pytest.raises(DpftError, match="agent.batch_size=null.*agent=dppo on robomimic"):
        recipe_batch_size("dppo", "robomimic", {}, "diffusion_mlp", 10, 10)


# ------------------------------------------------------------------------------------------ presets on the fake
def _lamp_checkpoint(d, task):
    from dpft.agents.pretrain import pretrain
    from dpft.envs.furniture import TASKS
    from tests.synth import write_demos_hdf5

    rng = np.random.default_rng(0)
    p = TASKS[task].parts_poses_dim
    demos = {"demo_%d" % i: {"obs": {"robot_state": rng.normal(0, 0.1, (12, 16)).astype(np.float32),
                                     "parts_poses": rng.normal(0, 0.1, (12, p)).astype(np.float32)},
                             "actions": rng.uniform(-0.5, 0.5, (12, 10)).astype(np.float32)} for i in range(2)}
    env_args = {"env_name": "FurnitureRLSim-%s" % task, "type": "furniture",
                "env_kwargs": {"furniture": task, "randomness": "low", "max_episode_steps": TASKS[task].max_episode_steps,
                               "simulator": "fake"}}
    data = str(d / ("%s.hdf5" % task))
    write_demos_hdf5(data, demos, env_args=env_args)
    pretrain(compose("pretrain", ["dataset=%s" % data, "out=%s" % (d / "pre"), "steps=2", "batch_size=4",
                                  "save_every=2", "val_every=0", "progress=false", "num_threads=1",
                                  "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[robot_state,parts_poses]",
                                  "policy.mlp_dims=[8]", "policy.denoising_steps=5", "horizon_steps=8",
                                  "act_steps=8"]))
    return str(d / "pre")


@pytest.mark.parametrize("agent,task", [("dppo", "lamp"),
                                        pytest.param("residual_ppo", "round_table", marks=pytest.mark.slow)])
def test_presets_run_lamp_and_round_table_to_their_time_limit(tmp_path, agent, task):
    from dpft.agents.finetune import finetune
    from dpft.cli import _with_preset

    ckpt = _lamp_checkpoint(tmp_path, task)
    extra = {"dppo": ["agent.critic_dims=[8]", "agent.update_epochs=1"],
             "residual_ppo": ["agent.critic_dims=[8]", "agent.mlp_dims=[8]", "agent.update_epochs=1"]}[agent]
    args = _with_preset(["checkpoint=%s" % ckpt, "out=%s" % (tmp_path / "ft"), "agent=%s" % agent, "envs=2",
                         "eval_episodes=2", "iterations=1", "progress=false", "num_threads=1",
                         "agent.n_critic_warmup_itr=0"] + extra)
    assert args[0] == "preset=%s_furniture" % agent
    cfg = compose("finetune", args)
    assert cfg.n_steps is None and cfg.agent.batch_size is None and cfg.truncation_as_terminal is True
    final = finetune(cfg)
    recs = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    meta = json.load(open(os.path.join(final, "meta.json")))
    kw = meta["env_args"]["env_kwargs"]
    if agent == "dppo":  # 125 chunks of 8 = 1000 steps; DPPO's 8,800 for lamp low
        assert meta["derived_settings"] == {"n_steps": 125, "agent.batch_size": 8800}
        assert meta["obs_clip"] == 5.0 and meta["raw_obs_clip"] is None
        assert kw["truncate_at_chunk_end"] is True and kw["max_env_steps"] is None
    else:  # one env step per RL step: 1000 steps, all in one minibatch; ResiP's clamps and lamp bulb hold
        assert meta["derived_settings"] == {"n_steps": 1000, "agent.batch_size": 2000}
        assert meta["obs_clip"] == 3.0 and meta["raw_obs_clip"] == 3.0 and cfg.success_as_terminal is True
        assert kw["max_env_steps"] == 100000000
    train = recs[-1]
    assert train["env_steps"] == 2 * 1000
    assert train["train/episodes"] == 2 and train["train/length"] == 1000  # the time limit, not one_leg's 700
    assert train["train/success_rate"] is not None
    assert recs[0]["eval/length"] == 1000
