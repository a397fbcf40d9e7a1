"""rollout(): scheduling, seeds, results file, videos, worker failure, interruption (on the fake env)."""
from __future__ import annotations

import functools
import json
import os
import signal
import types

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.base import BatchedEnv
from dpft.envs.fake_env import FakeEnv, ScriptedReachPolicy
from dpft.envs.rollout import rollout, rollout_checkpoint
from dpft.envs.vector import VectorEnv

# success within the time limit for some seeds and not for others (step 0.05, radius 0.05, 12 steps)
ENV_KW = dict(max_episode_steps=12, terminate_on_success=True)


def fns(n, **kw):
    return [functools.partial(FakeEnv, **dict(ENV_KW, **kw))] * n


def reference_episode(seed, act_steps=4, **kw):
    """One episode of ScriptedReachPolicy on one FakeEnv, by hand (cond_steps 1)."""
    env = FakeEnv(**dict(ENV_KW, **kw))
    pol = ScriptedReachPolicy(act_steps=act_steps)
    obs = env.reset(seed=seed)
    ret, length, success = 0.0, 0, False
    while True:
        chunk = pol.act({k: v[None, None] for k, v in obs.items()})[0]
        for a in chunk:
            obs, r, te, tr, info = env.step(a)
            ret += r
            length += 1
            success = success or info["success"]
            if te or tr:
                return {"return": ret, "length": length, "success": success, "terminated": te, "truncated": tr}


def strip(episodes, keys=("episode", "seed", "success", "return", "length", "terminated", "truncated", "failed")):
    return [{k: e[k] for k in keys} for e in episodes]


def test_rollout_matches_hand_computed_episodes_and_writes_result(tmp_path):
    policy = ScriptedReachPolicy(act_steps=4)
    result = rollout(policy, fns(3), episodes=7, seed=20, out_dir=tmp_path, mode="inline", progress=False,
                     policy_info={"checkpoint": "ckpt/step_1", "weights": "ema", "ft_denoising_steps": 5})
    eps = result["episodes"]
    assert [e["episode"] for e in eps] == list(range(7))
    assert [e["seed"] for e in eps] == [20 + i for i in range(7)]
    for e in eps:
        ref = reference_episode(e["seed"])
        assert e["length"] == ref["length"] and e["success"] == ref["success"]
        assert e["return"] == pytest.approx(ref["return"], rel=1e-9)
        assert e["terminated"] == ref["terminated"] and not e["failed"] and e["reason"] is None
    successes = [e["success"] for e in eps]
    assert 0 < sum(successes) < 7  # the fixture has both outcomes, so the rate is informative
    assert result["success_rate"] == pytest.approx(sum(successes) / 7)
    returns = np.array([e["return"] for e in eps])
    assert result["mean_return"] == pytest.approx(returns.mean())
    assert result["std_return"] == pytest.approx(returns.std())
    assert result["mean_length"] == pytest.approx(np.mean([e["length"] for e in eps]))
    assert result["env_steps"] == sum(e["length"] for e in eps) and result["num_failed"] == 0
    assert result["policy"] == {"checkpoint": "ckpt/step_1", "weights": "ema", "ft_denoising_steps": 5}
    assert 0.0 <= result["outside_sim_fraction"] <= 1.0
    assert result["startup_time_s"] + result["sim_time_s"] + result["policy_time_s"] <= result["wall_time_s"]
    run = result["wall_time_s"] - result["startup_time_s"]
    assert result["outside_sim_fraction"] == pytest.approx((run - result["sim_time_s"]) / run)
    assert result["env_steps_per_s"] == pytest.approx(result["env_steps"] / run)
    # idle envs are excluded: the batch shrinks once fewer than 3 episodes are left
    assert policy.batch_sizes[0] == 3 and policy.batch_sizes[-1] < 3
    # the file on disk is the returned dict, and no temporary file is left
    with open(tmp_path / "result.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_process_and_inline_and_generic_batched_env_give_the_same_episodes():
    kw = dict(episodes=5, seed=3, progress=False)
    inline = rollout(ScriptedReachPolicy(), fns(2), mode="inline", **kw)
    proc = rollout(ScriptedReachPolicy(), fns(2), mode="process", **kw)
    assert strip(inline["episodes"]) == strip(proc["episodes"])

    class Plain(BatchedEnv):
        """A BatchedEnv without VectorEnv's extras: the rollout runs it in waves."""

        def __init__(self, venv):
            self.venv = venv
            for name in ("num_envs", "obs_shapes", "action_dim", "max_episode_steps", "cond_steps", "act_steps"):
                setattr(self, name, getattr(venv, name))

        def reset(self, seeds=None):
            return self.venv.reset(seeds)

        def step(self, action_chunk):
            return self.venv.step(action_chunk)

    with VectorEnv(fns(2), cond_steps=1, act_steps=4, mode="inline") as venv:
        waves = rollout(ScriptedReachPolicy(), Plain(venv), **kw)
    assert strip(waves["episodes"]) == strip(inline["episodes"])


class KillingPolicy(ScriptedReachPolicy):
    """Kills the worker of env 1 (SIGKILL) on its 3rd call, i.e. in the middle of an episode."""

    def __init__(self, venv, **kw):
        super().__init__(**kw)
        self.venv = venv
        self.killed_pid = None

    def act(self, obs, deterministic=True):
        if self.calls == 2:
            self.killed_pid = self.venv.worker_pids[1]
            os.kill(self.killed_pid, signal.SIGKILL)
        return super().act(obs, deterministic)


def test_worker_killed_mid_rollout_records_failed_episode(tmp_path):
    ref = rollout(ScriptedReachPolicy(), fns(3), episodes=6, seed=0, mode="inline", progress=False)
    with VectorEnv(fns(3), act_steps=4, mode="process") as venv:
        policy = KillingPolicy(venv)
        result = rollout(policy, venv, episodes=6, seed=0, out_dir=tmp_path, progress=False)
        assert venv.worker_pids[1] != policy.killed_pid
    failed = [e for e in result["episodes"] if e["failed"]]
    assert len(failed) == 1 and result["num_failed"] == 1
    bad = failed[0]
    assert bad["episode"] == 1 and bad["seed"] == 1 and bad["env"] == 1 and bad["length"] == 8
    assert "worker 1" in bad["reason"] and "died (exit code -9)" in bad["reason"]
    assert not bad["success"]
    good = [e for e in result["episodes"] if not e["failed"]]
    assert len(good) == 5
    assert strip(good) == strip([e for e in ref["episodes"] if e["episode"] != 1])
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["num_failed"] == 1 and on_disk["episodes"][1]["reason"] == bad["reason"]


def decode_mp4(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return frames


def test_videos_of_first_episodes_decode_to_episode_frames(tmp_path):
    result = rollout(ScriptedReachPolicy(), fns(2), episodes=3, seed=5, video=2, out_dir=tmp_path,
                     mode="process", video_size=(48, 64), fps=10, progress=False)
    eps = result["episodes"]
    assert result["videos"] == ["videos/episode_000.mp4", "videos/episode_001.mp4"]
    assert eps[2]["video"] is None and eps[2]["frames"] is None
    assert sorted(os.listdir(tmp_path / "videos")) == ["episode_000.mp4", "episode_001.mp4"]
    for e in eps[:2]:
        frames = decode_mp4(tmp_path / e["video"])
        assert e["frames"] == e["length"] + 1
        assert len(frames) == e["length"] + 1 and frames[0].shape == (48, 64, 3)
        # the first frame shows the reset state of this episode's seed (H.264 is lossy: compare loosely)
        env = FakeEnv(**ENV_KW)
        env.reset(seed=e["seed"])
        want = env.render(48, 64).astype(np.float64)
        assert np.abs(frames[0].astype(np.float64) - want).mean() < 8.0
        other = FakeEnv(**ENV_KW)
        other.reset(seed=e["seed"] + 100)
        assert np.abs(frames[0] - other.render(48, 64).astype(np.float64)).mean() > \
            np.abs(frames[0] - want).mean()


class InterruptingPolicy(ScriptedReachPolicy):
    def __init__(self, exc, **kw):
        super().__init__(**kw)
        self.exc = exc

    def act(self, obs, deterministic=True):
        if self.calls == 3:
            raise self.exc
        return super().act(obs, deterministic)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("policy blew up")])
def test_interrupt_leaves_no_result_and_closes_workers(tmp_path, exc):
    (tmp_path / "result.json").write_text("{\"stale\": true}")
    seen = []

    class Spy(InterruptingPolicy):
        def act(self, obs, deterministic=True):
            import multiprocessing

            seen.append([p.pid for p in multiprocessing.active_children() if p.name.startswith("dpft-env")])
            return super().act(obs, deterministic)

    with pytest.raises(type(exc)):
        rollout(Spy(exc), fns(2), episodes=4, video=1, out_dir=tmp_path, mode="process", progress=False,
                overwrite=True)  # the stale result is deleted first, and the interrupted run writes none
    assert not (tmp_path / "result.json").exists()
    leftovers = [p for p in os.listdir(tmp_path) if p != "videos"]
    assert leftovers == []
    if (tmp_path / "videos").exists():  # only complete videos of finished episodes, no temporary files
        for name in os.listdir(tmp_path / "videos"):
            assert name == "episode_000.mp4"
            assert len(decode_mp4(tmp_path / "videos" / name)) > 1
    import multiprocessing

    assert len(seen[0]) == 2
    alive = [p.pid for p in multiprocessing.active_children() if p.name.startswith("dpft-env")]
    assert not set(alive) & set(seen[0])


def test_bad_input_is_reported():
    with pytest.raises(DpftError, match=r"observation key\(s\) \['gripper'\] that the env does not produce"):
        pol = ScriptedReachPolicy()
        pol.meta.obs_keys = ["robot0_eef_pos", "gripper"]
        rollout(pol, fns(1), episodes=1, mode="inline", progress=False)
    with pytest.raises(DpftError, match="cond_steps=2 but the batched env uses cond_steps=1"):
        with VectorEnv(fns(1), act_steps=4, mode="inline") as venv:
            rollout(ScriptedReachPolicy(cond_steps=2), venv, episodes=1, progress=False)

    class Wrong(ScriptedReachPolicy):
        def act(self, obs, deterministic=True):
            return super().act(obs)[:, :2]

    with pytest.raises(DpftError, match=r"policy.act returned actions of shape \(1, 2, 3\); expected .* \(1, 4, 3\)"):
        rollout(Wrong(), fns(1), episodes=1, mode="inline", progress=False)
    with pytest.raises(DpftError, match="needs out_dir"):
        rollout(ScriptedReachPolicy(), fns(1), episodes=1, video=True, mode="inline", progress=False)
    with pytest.raises(DpftError, match="episodes must be an integer >= 1"):
        rollout(ScriptedReachPolicy(), fns(1), episodes=0, mode="inline", progress=False)
    with pytest.raises(DpftError, match="does not exist"):
        rollout_checkpoint("/nonexistent/run_dir", episodes=1)


class FakeFactory:
    """Stands in for dpft.envs.registry.EnvFactory (same signature): builds a FakeEnv, checking ``obs_keys``."""

    def __init__(self, env_args, obs_keys=None, kwargs=None):
        self.env_args, self.obs_keys, self.kwargs = env_args, obs_keys, dict(kwargs or {})

    def __call__(self):
        env = FakeEnv(**self.env_args["env_kwargs"])
        if self.obs_keys:
            missing = [k for k in self.obs_keys if k not in env.obs_shapes]
            if missing:
                raise DpftError("FakeEnv cannot produce obs keys %s" % missing)
        return env


def test_rollout_checkpoint_uses_meta_env_args_and_reports_policy(tmp_path, monkeypatch, capsys):
    import dpft

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    policy = ScriptedReachPolicy()
    policy.meta.env_args = {"env_name": "Fake", "type": 2, "env_kwargs": dict(ENV_KW, max_episode_steps=30)}
    loaded = []

    def fake_load(path, weights="ema", device="cpu"):
        loaded.append((str(path), weights, device))
        return policy

    monkeypatch.setattr(dpft, "load_policy", fake_load)
    monkeypatch.setattr("dpft.envs.registry.EnvFactory", FakeFactory)
    out = tmp_path / "eval"
    result = rollout_checkpoint(ckpt, episodes=3, num_envs=2, seed=7, out_dir=out, weights="model",
                                env_overrides={"env_kwargs": {"max_episode_steps": 12}}, progress=False)
    assert loaded == [(str(ckpt), "model", "cpu")]
    assert result["policy"]["checkpoint"] == str(ckpt) and result["policy"]["weights"] == "model"
    assert result["policy"]["requested_weights"] == "model" and result["policy"]["device"] == "cpu"
    assert result["policy"]["act_steps"] == 4 and result["num_envs"] == 2
    # the override (12 steps) replaced the checkpoint's 30-step limit
    assert [e["length"] for e in result["episodes"]] == [reference_episode(7 + i)["length"] for i in range(3)]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("success %d/3" % result["num_success"]) and str(out / "result.json") in line
    assert json.loads((out / "result.json").read_text())["policy"]["weights"] == "model"

    policy.meta.obs_keys = ["robot0_eef_pos", "agentview_image"]
    with pytest.raises(DpftError, match=r"cannot produce obs keys \['agentview_image'\]"):
        rollout_checkpoint(ckpt, episodes=1, num_envs=1, progress=False)


class FurniturePolicy:
    """Holds the end effector where it is (gripper down, open): a valid FurnitureBench action chunk."""

    def __init__(self):
        self.meta = types.SimpleNamespace(
            obs_keys=["robot_state", "parts_poses"], cond_steps=1, act_steps=8, action_dim=10,
            env_args={"env_name": "FurnitureRLSim-one_leg", "type": "furniture",
                      "env_kwargs": {"furniture": "one_leg", "randomness": "low"}})

    def act(self, obs, deterministic=True):
        pos = np.asarray(obs["robot_state"])[:, -1, :3]
        chunk = np.zeros((len(pos), 8, 10), np.float32)
        chunk[..., :3] = pos[:, None]
        chunk[..., 3:9] = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        chunk[..., 9] = -1.0
        return chunk


def test_rollout_checkpoint_furniture_runs_in_waves_on_the_batched_env(tmp_path, monkeypatch):
    import dpft
    import dpft.envs.furniture
    from dpft.envs.furniture_fake import FakeFurnitureRLSimEnv

    real = dpft.envs.furniture.make_furniture_env
    built = []

    def fake_make(**kw):
        assert kw["device"] == "cuda" and kw["num_envs"] == 2 and kw["act_steps"] == 8
        built.append(real(**dict(kw, device="cpu", env_cls=FakeFurnitureRLSimEnv)))
        return built[-1]

    monkeypatch.setattr(dpft.envs.furniture, "make_furniture_env", fake_make)
    monkeypatch.setattr(dpft, "load_policy", lambda path, weights="ema", device="cpu": FurniturePolicy())
    result = rollout_checkpoint(tmp_path, episodes=3, num_envs=2, seed=4, env_options={"max_episode_steps": 20},
                                progress=False)
    assert [e["seed"] for e in result["episodes"]] == [4, 5, 6]
    assert [e["length"] for e in result["episodes"]] == [20, 20, 20]  # 8 + 8 + 4: the last chunk is cut
    assert result["num_failed"] == 0 and result["num_envs"] == 2
    assert built[0].sim_env is None  # rollout_checkpoint closed the env it built
    with pytest.raises(DpftError, match="videos need a VectorEnv"):
        rollout_checkpoint(tmp_path, episodes=1, num_envs=2, video=1, out_dir=tmp_path / "v", progress=False)


def tiny_policy(image=True):
    """A real dpft.policy.Policy around an untrained tiny diffusion MLP (DDIM, deterministic sampling)."""
    import torch

    from dpft.models import build_policy_model
    from dpft.normalization import MinMaxNormalizer
    from dpft.policy import Policy

    torch.manual_seed(0)
    shapes = {"robot0_eef_pos": (3,), "object": (3,)}
    image_keys = []
    if image:
        shapes["agentview_image"] = (16, 16, 3)
        image_keys = ["agentview_image"]
    model = build_policy_model(
        {"name": "diffusion_mlp", "mlp_dims": [32, 32, 32], "denoising_steps": 20, "use_ddim": True,
         "ddim_steps": 3, "image_feature_dim": 8},
        obs_shapes=shapes, low_dim_dim=6, image_keys=image_keys, action_dim=3, horizon_steps=4, cond_steps=2)
    normalizer = MinMaxNormalizer({"state": (-np.ones(6), np.ones(6)), "action": (-np.ones(3), np.ones(3))})
    meta = {"obs_keys": list(shapes), "low_dim_keys": ["robot0_eef_pos", "object"], "image_keys": image_keys,
            "obs_shapes": {k: list(v) for k, v in shapes.items()}, "obs_dim": 6, "action_dim": 3,
            "horizon_steps": 4, "cond_steps": 2, "act_steps": 3}
    return Policy(model, normalizer, meta, weights="model")


def test_real_policy_with_image_history_gives_identical_episodes_inline_and_in_workers(tmp_path):
    policy = tiny_policy()
    kw = dict(episodes=3, seed=11, progress=False)
    env_fns = fns(2, image=True, max_episode_steps=7)
    inline = rollout(policy, env_fns, mode="inline", out_dir=tmp_path, **kw)
    proc = rollout(policy, env_fns, mode="process", **kw)
    assert strip(inline["episodes"]) == strip(proc["episodes"])
    assert [e["length"] for e in inline["episodes"]] == [7, 7, 7]  # chunks of 3: 3 + 3 + 1
    assert inline["policy"]["weights"] == "model" and inline["policy"]["act_steps"] == 3  # Policy.describe()
    assert json.loads((tmp_path / "result.json").read_text())["policy"]["cond_steps"] == 2


class _NanRewardEnv(FakeEnv):
    """FakeEnv whose episode with seed ``nan_reward_on_seed`` returns a NaN reward at ``fault_step``."""

    def __init__(self, nan_reward_on_seed=None, **kw):
        super().__init__(**kw)
        self.nan_reward_on_seed = nan_reward_on_seed

    def step(self, action):
        obs, r, te, tr, info = super().step(action)
        if self._seed == self.nan_reward_on_seed and self._t == self.fault_step:
            r = float("nan")
        return obs, r, te, tr, info


def test_nan_reward_cuts_the_episode_and_the_result_file_is_still_written(tmp_path):
    fns_ = [functools.partial(_NanRewardEnv, nan_reward_on_seed=31, fault_step=2, **ENV_KW)] * 2
    result = rollout(ScriptedReachPolicy(), fns_, episodes=3, seed=30, out_dir=tmp_path, mode="inline",
                     progress=False)
    by_seed = {ep["seed"]: ep for ep in result["episodes"]}
    assert by_seed[31]["failed"] and "non-finite reward" in by_seed[31]["reason"]
    assert not by_seed[31]["success"]
    assert not by_seed[30]["failed"] and not by_seed[32]["failed"]
    on_disk = json.load(open(os.path.join(tmp_path, "result.json")))  # NaN never reaches the JSON file
    assert on_disk["num_failed"] == 1 and on_disk["mean_return"] == pytest.approx(result["mean_return"])


def test_an_episode_cut_after_reaching_success_counts_as_a_failure(tmp_path):
    # without terminate_on_success the point reaches the goal (success, sticky) and is then cut by a NaN obs
    kw = dict(max_episode_steps=30, terminate_on_success=False)
    assert reference_episode(41, max_episode_steps=30, terminate_on_success=True)["length"] == 6  # goal at step 6
    ref = reference_episode(41, **kw)
    assert ref["success"] and ref["length"] == 30  # without the fault: success, then on to the time limit
    fns_ = [functools.partial(FakeEnv, nan_on_seed=41, fault_step=20, **kw)]
    result = rollout(ScriptedReachPolicy(), fns_, episodes=1, seed=41, out_dir=tmp_path, mode="inline",
                     progress=False)
    ep = result["episodes"][0]
    assert ep["failed"] and not ep["success"]
    assert result["success_rate"] == 0.0 and result["num_success"] == 0
    # the batched env itself reports it so, for every consumer (RL agents too)
    with VectorEnv(fns_, cond_steps=1, act_steps=4, mode="inline") as venv:
        obs = venv.reset([41])
        policy = ScriptedReachPolicy()
        while True:
            res = venv.step(policy.act(obs))
            obs = res.obs
            if res.done[0]:
                break
        assert res.info["failed"][0] and not res.success[0]
