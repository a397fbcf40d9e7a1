"""Messages that must be true and name what the user typed (issue 23, items 8, 10 and 11): Gym tasks show returns,
not a success figure; a worker killed while building its env; the "messages that mislead" list, one case each."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from dpft import checkpoint as C
from dpft.cli import main
from dpft.config import compose, config_dir
from dpft.errors import DpftError

pytest.importorskip("gymnasium")

from dpft.envs.gym_env import default_gym_env_args  # noqa: E402
from tests.synth import write_demos_hdf5  # noqa: E402

HOPPER = default_gym_env_args("hopper")
TINY_PRE = ["steps=2", "batch_size=8", "save_every=2", "val_every=0", "progress=false", "num_threads=1",
            "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[obs]", "policy.mlp_dims=[16,16,16]",
            "policy.denoising_steps=5", "horizon_steps=4", "act_steps=2"]


def _hopper_demos(path, n=3, filter_keys=None):
    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(20, 11))}, "actions": rng.uniform(-0.8, 0.8, (20, 3))}
             for i in range(n)}
    write_demos_hdf5(str(path), demos, filter_keys=filter_keys, env_args=HOPPER)
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("msg")
    data = _hopper_demos(d / "synth.hdf5")
    assert main(["pretrain", "dataset=%s" % data, "out=%s" % (d / "run")] + TINY_PRE) == 0
    return str(d / "run")


# ---------------------------------------------------------------------------------------------- item 8
def test_gym_rollout_shows_returns_and_no_success_figure(run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["rollout", "checkpoint=%s" % run, "episodes=2", "envs=1", "max_episode_steps=5", "out=%s" % out,
                 "++progress=false"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("2 episodes, mean return ") and "success" not in line
    res = json.load(open(out / "result.json"))
    assert res["has_success"] is False and res["success_rate"] is None and res["num_success"] is None
    assert res["mean_return"] is not None


def test_gym_finetune_logs_no_success_figure(run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "checkpoint=%s" % run, "out=%s" % out, "agent=dppo", "envs=2", "n_steps=4",
                 "iterations=1", "eval_episodes=2", "progress=false", "max_episode_steps=10", "agent.batch_size=16",
                 "agent.update_epochs=1", "agent.critic_dims=[8,8,8]", "agent.n_critic_warmup_itr=0",
                 "agent.ft_denoising_steps=2"]) == 0
    done = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("dpft finetune: done")][0]
    assert "eval return " in done and "success" not in done
    rec = [json.loads(ln) for ln in open(out / "metrics.jsonl")][-1]
    assert rec["train/success_rate"] is None and "eval/success_rate" not in rec and rec["eval/return"] is not None


def test_gym_policy_demos_print_no_success_and_one_demo(run, tmp_path, capsys):
    out = tmp_path / "d.hdf5"
    assert main(["demos", "policy=%s" % run, "num=1", "out=%s" % out, "max_episode_steps=5", "progress=false"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("wrote 1 demo (") and "success" not in line


# ---------------------------------------------------------------------------------------------- item 10
class _DiesWhileBuilding:
    """An env factory whose worker is SIGKILLed while it builds the env (as the OOM killer would)."""

    def __call__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def test_worker_killed_while_building_its_env_is_one_paragraph():
    from dpft.envs.vector import VectorEnv

    with pytest.raises(DpftError) as e:
        VectorEnv([_DiesWhileBuilding()], cond_steps=1, act_steps=1, mode="process", worker_timeout_s=60.0)
    msg = str(e.value)
    assert msg.startswith("Env worker 0 died while building its environment (")
    assert "[killed by signal 9, SIGKILL]" in msg and "fewer parallel environments (envs=)" in msg
    assert "Traceback" not in msg


# ---------------------------------------------------------------------------------------------- item 11
def test_demos_failure_does_not_advise_max_attempts(run, tmp_path, capsys):
    assert main(["demos", "policy=%s" % run, "num=1", "out=%s" % (tmp_path / "d.hdf5"), "max_episode_steps=5",
                 "min_return=1e9", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "max_attempts" not in err and "record_demos" not in err
    assert "fewer than the num=1 asked for, and at most 3 episodes (3 x num) are tried" in err


def test_pretrain_run_without_checkpoint_is_named_as_such(tmp_path, capsys):
    d = tmp_path / "killed"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"kind": "pretrain", "dpft_version": "0", "created": "x"}))
    with pytest.raises(DpftError) as e:
        C.resolve_checkpoint(str(d))
    assert "is a dpft pretrain run without any checkpoint yet" in str(e.value)
    assert "dpft pretrain ... out=%s resume=true" % d in str(e.value)
    assert "neither" not in str(e.value)


def test_cmil_checkpoint_is_not_told_to_pass_its_pretrained_checkpoint(tmp_path, capsys):
    import torch

    from dpft.normalization import MinMaxNormalizer

    norm = MinMaxNormalizer({"state": (np.zeros(2), np.ones(2)), "action": (np.zeros(1), np.ones(1))})
    w = {"w": torch.zeros(2)}
    C.save_checkpoint(str(tmp_path / "cmil"), 1, w, None, norm,
                      {"policy": "cmil", "policy_type": "cmil", "policy_kind": "cmil", "env_args": HOPPER}, "x: 1\n")
    assert main(["finetune", "checkpoint=%s" % (tmp_path / "cmil"), "out=%s" % (tmp_path / "ft"), "agent=dppo",
                 "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "holds a cmil policy" in err and "it was not started from a pretrained one" in err
    assert "pass the pretrained checkpoint it started from" not in err


def test_bogus_preset_lists_every_preset():
    with pytest.raises(DpftError) as e:
        compose("finetune", ["checkpoint=x", "out=o", "preset=bogus"])
    presets = sorted(n[:-5] for n in os.listdir(os.path.join(config_dir(), "preset")) if n.endswith(".yaml"))
    assert len(presets) >= 14
    assert "Available options in 'preset': %s." % ", ".join(presets) in str(e.value)


def test_edited_meta_json_is_blamed_not_the_weights(run, tmp_path):
    import shutil

    step = os.path.join(str(tmp_path / "r"), "checkpoints", "step_00000002")
    shutil.copytree(run, str(tmp_path / "r"))
    meta_path = os.path.join(step, "meta.json")
    meta = json.load(open(meta_path))
    del meta[C.CHECKSUMS_KEY]["ema.safetensors"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(DpftError) as e:
        C.load_checkpoint(step)
    assert "'%s' records no checksum for '%s'" % (meta_path, os.path.join(step, "ema.safetensors")) in str(e.value)
    assert "meta.json was edited or damaged" in str(e.value) and "Remove it" not in str(e.value)

    meta[C.CHECKSUMS_KEY]["ema.safetensors"] = "0" * 64  # a changed recorded value, meta.json newer than the file
    json.dump(meta, open(meta_path, "w"))
    ema = os.path.join(step, "ema.safetensors")
    os.utime(ema, (os.path.getmtime(meta_path) - 60, os.path.getmtime(meta_path) - 60))
    with pytest.raises(DpftError, match="meta.json was most likely edited"):
        C.load_checkpoint(step)


def test_string_observation_is_named_as_such(run):
    import dpft

    policy = dpft.load_policy(run)
    with pytest.raises(DpftError) as e:
        policy.act({"obs": "hello"})
    assert "Observation 'obs' must hold numbers" in str(e.value) and "'hello'" in str(e.value)
    assert "has shape" not in str(e.value)


def test_model_messages_name_options_not_classes(tmp_path):
    import torch

    from dpft.models.diffusion_mlp import DiffusionMLP
    from dpft.models.gaussian import GaussianModel

    with pytest.raises(DpftError) as e:
        DiffusionMLP(action_dim=2, horizon_steps=2, cond_dim=3, mlp_dims=[16, 16])
    assert str(e.value).startswith("policy.mlp_dims=[16,16] does not fit policy.residual_style=true")
    with pytest.raises(DpftError) as e:
        GaussianModel(torch.nn.Identity(), action_dim=2, horizon_steps=1, std_min=0.5, init_std=0.1, std_max=1.0)
    assert "GaussianModel" not in str(e.value) and "init_std=0.1" in str(e.value)


def test_non_finite_actions_message_names_no_internal_class():
    from dpft.envs.registry import EnvFactory
    from dpft.envs.vector import VectorEnv

    env = VectorEnv([EnvFactory(HOPPER, kwargs={"max_episode_steps": 5})], cond_steps=1, act_steps=1, mode="inline")
    try:
        env.reset(seeds=[0])
        with pytest.raises(DpftError) as e:
            env.step(np.full((1, 1, 3), np.nan))
    finally:
        env.close()
    assert "VectorEnv" not in str(e.value) and "non-finite (NaN/inf) actions for env(s) [0]" in str(e.value)


def test_data_info_refuses_a_file_pretraining_cannot_split(tmp_path, capsys):
    path = _hopper_demos(tmp_path / "one.hdf5", n=1, filter_keys={"valid": ["demo_0"]})
    assert main(["data", "info", path]) == 2
    err = capsys.readouterr().err
    assert "The train split is empty: filter key 'valid' (mask/valid) lists all 1 demo of the file" in err
    assert "data.valid_filter_key=null" in err
    assert main(["pretrain", "dataset=%s" % path, "out=%s" % (tmp_path / "r")] + TINY_PRE) == 2
    assert "The train split is empty" in capsys.readouterr().err


def test_which_tasks_have_a_success_signal():
    from dpft.envs.registry import has_success_signal

    assert has_success_signal({"env_name": "Lift", "type": 1, "env_kwargs": {}})
    assert has_success_signal({"env_name": "FurnitureRLSim-one_leg", "type": "furniture", "env_kwargs": {}})
    assert not has_success_signal(HOPPER) and not has_success_signal(default_gym_env_args("halfcheetah"))
    assert has_success_signal({"env_name": "FetchReach-v4", "type": 2, "env_kwargs": {}})  # reports is_success
    assert has_success_signal(None)
