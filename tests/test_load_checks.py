"""What loading and writing checkpoints refuse or report (issue 23, items 5, 9, 10, 11): NaN/Inf tensors with valid
checksums, verification switched off (warned and recorded), a full disk while checkpointing, damaged-file advice."""
from __future__ import annotations

import errno
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dpft import checkpoint as C
from dpft.cli import main
from dpft.errors import DpftError
from dpft.normalization import MinMaxNormalizer

pytest.importorskip("gymnasium")

from dpft.envs.gym_env import default_gym_env_args  # noqa: E402
from tests.synth import write_demos_hdf5  # noqa: E402

TINY_PRE = ["steps=4", "batch_size=8", "save_every=2", "val_every=0", "progress=false", "num_threads=1",
            "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[obs]", "policy.mlp_dims=[16,16,16]",
            "policy.denoising_steps=5", "horizon_steps=4", "act_steps=2"]
TINY_FT = ["agent=dppo", "envs=2", "n_steps=8", "iterations=2", "eval_episodes=2", "progress=false",
           "max_episode_steps=20", "agent.batch_size=16", "agent.update_epochs=1", "agent.critic_dims=[16,16,16]",
           "agent.n_critic_warmup_itr=0", "save_every=1", "eval_every=0", "agent.ft_denoising_steps=2"]


@pytest.fixture(scope="module")
def hopper_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("hop")
    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(20, 11))}, "actions": rng.uniform(-0.8, 0.8, (20, 3))}
             for i in range(3)}
    write_demos_hdf5(str(d / "synth.hdf5"), demos, env_args=default_gym_env_args("hopper"))
    assert main(["pretrain", "dataset=%s" % (d / "synth.hdf5"), "out=%s" % (d / "run")] + TINY_PRE) == 0
    return str(d / "run")


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, str(dst))
    return str(dst)


def _rewrite(ckpt_dir, rel, change):
    """Apply ``change`` to the tensors of ``ckpt_dir/rel`` and record the new file's sha256 in meta.json, so that
    the checksum is valid and only the values are wrong."""
    path = os.path.join(ckpt_dir, rel)
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    change(tensors)
    save_file(tensors, path)
    meta_path = os.path.join(ckpt_dir, "meta.json")
    meta = json.load(open(meta_path))
    meta[C.CHECKSUMS_KEY][rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    json.dump(meta, open(meta_path, "w"))


def _first_float(tensors):
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel())[0]


def _save_small(run_dir):
    w = {"w": torch.arange(4.0), "b": torch.ones(2)}
    norm = MinMaxNormalizer({"state": (np.zeros(2), np.ones(2)), "action": (np.zeros(1), np.ones(1))})
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    ts = {"optimizer": opt.state_dict(), "rng": [], "step": {"step": 1},
          "tensors": {"critic": {"layer.weight": torch.ones(2, 2)}}}
    return C.save_checkpoint(str(run_dir), 1, w, w, norm, {"obs_keys": ["a"]}, "steps: 1\n", ts)


@pytest.mark.parametrize("rel", ["model.safetensors", "ema.safetensors", "normalizer.safetensors",
                                 "training_state/optimizer.safetensors", "training_state/tensors_critic.safetensors"])
def test_nan_tensor_with_a_valid_checksum_is_refused_naming_file_and_tensor(tmp_path, rel):
    d = _save_small(tmp_path / "run")
    names = []

    def poison(t):
        names.append(_first_float(t))
        t[names[0]].view(-1)[0] = float("inf") if "optimizer" in rel else float("nan")

    _rewrite(d, rel, poison)
    with pytest.raises(DpftError) as e:
        C.load_checkpoint(d, training_state=True)
    msg = str(e.value)
    assert "Checkpoint file '%s' holds 1 non-finite value(s) (NaN or infinity) of" % os.path.join(d, rel) in msg
    assert "in tensor '%s'" % names[0] in msg and "Use an earlier checkpoint of the run" in msg


def test_nan_weights_fail_at_load_not_in_the_env(hopper_run, tmp_path, capsys):
    run = _copy_run(hopper_run, tmp_path / "run")
    step = C.find_latest(run)
    _rewrite(step, "ema.safetensors", lambda t: t[_first_float(t)].fill_(float("nan")))
    assert main(["rollout", "checkpoint=%s" % run, "episodes=1", "envs=1", "max_episode_steps=5",
                 "++progress=false"]) == 2
    err = capsys.readouterr().err
    assert "Checkpoint file '%s' holds" % os.path.join(step, "ema.safetensors") in err
    assert "VectorEnv" not in err and "Traceback" not in err
    import dpft

    with pytest.raises(DpftError, match="non-finite value"):
        dpft.load_policy(run)


def test_no_verify_warns_and_records_in_result_json(hopper_run, tmp_path, capsys):
    import dpft

    run = _copy_run(hopper_run, tmp_path / "run")
    step = C.find_latest(run)
    with open(os.path.join(step, "config.yaml"), "a") as f:
        f.write("# edited by hand\n")  # still loads; only its checksum tells
    with pytest.raises(DpftError, match="config.yaml' is damaged"):
        dpft.load_policy(run)
    capsys.readouterr()
    policy = dpft.load_policy(run, verify=False)  # was a TypeError
    assert policy.meta["horizon_steps"] == 4
    err = capsys.readouterr().err
    assert "warning: checkpoint file '%s' does not match the sha256" % os.path.join(step, "config.yaml") in err

    out = tmp_path / "eval"
    assert main(["rollout", "checkpoint=%s" % run, "episodes=1", "envs=1", "max_episode_steps=5", "out=%s" % out,
                 "--no-verify", "++progress=false"]) == 0
    cap = capsys.readouterr()
    assert "loading it anyway because checksum verification is off" in cap.err
    assert "checksums NOT verified (--no-verify; 1 file(s) did not match)" in cap.out
    res = json.load(open(out / "result.json"))
    assert res["policy"]["verified"] is False
    assert res["policy"]["checksum_mismatches"] == [os.path.join(step, "config.yaml")]

    out2 = tmp_path / "eval2"
    clean = _copy_run(hopper_run, tmp_path / "clean")
    assert main(["rollout", "checkpoint=%s" % clean, "episodes=1", "envs=1", "max_episode_steps=5",
                 "out=%s" % out2, "++progress=false"]) == 0
    res2 = json.load(open(out2 / "result.json"))
    assert res2["policy"]["verified"] is True and res2["policy"]["checksum_mismatches"] == []


def test_damaged_file_offers_the_previous_checkpoint(hopper_run, tmp_path):
    run = _copy_run(hopper_run, tmp_path / "run")
    first, last = C.list_checkpoints(run)
    raw = bytearray(open(os.path.join(last, "model.safetensors"), "rb").read())
    raw[-1] ^= 1
    open(os.path.join(last, "model.safetensors"), "wb").write(bytes(raw))
    with pytest.raises(DpftError) as e:
        C.load_checkpoint(run)
    msg = str(e.value)
    assert "use the run's previous checkpoint '%s' (pass it as checkpoint=)" % first in msg
    assert "delete the damaged step directory '%s' first and pass resume=true" % last in msg
    assert "verify=False (dpft rollout" not in msg  # the old advice, which fine-tuning and demos do not take


def _full_disk_on(step_name):
    """A safetensors writer that fails like a full disk inside the temporary directory of ``step_name``."""
    from safetensors import SafetensorError

    real = save_file

    def writer(tensors, path, metadata=None):
        if ".tmp-" + step_name in path:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, path, metadata=metadata)

    return writer


def test_full_disk_while_pretraining_is_one_paragraph(hopper_run, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    data = os.path.join(os.path.dirname(hopper_run), "synth.hdf5")
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_on("step_00000004"))
    out = tmp_path / "pre"
    assert main(["pretrain", "dataset=%s" % data, "out=%s" % out] + TINY_PRE) == 2
    err = capsys.readouterr().err
    assert "Could not write checkpoint step_00000004 in '%s': the disk is full (no space left on device)." % (
        out / "checkpoints") in err
    assert "'%s', is intact" % (out / "checkpoints" / "step_00000002") in err and "resume=true" in err
    assert "SafetensorError" not in err and "Traceback" not in err
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002"]


def test_full_disk_while_finetuning_and_resuming_is_one_paragraph(hopper_run, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "ft"
    args = ["finetune", "checkpoint=%s" % hopper_run, "out=%s" % out] + TINY_FT
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_on("step_00000002"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Could not write checkpoint step_00000002 in '%s': the disk is full" % (out / "checkpoints") in err
    assert "SafetensorError" not in err
    assert main(args + ["resume=true"]) == 2  # the disk is still full: the resumed run says the same
    assert "Could not write checkpoint step_00000002" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args + ["resume=true"]) == 0
    assert [os.path.basename(p) for p in C.list_checkpoints(str(out))][-1] == "step_00000002"


def test_enospc_oserror_while_writing_json_names_the_full_disk(tmp_path, monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(C, "_write_json", full)
    with pytest.raises(DpftError, match=r"Could not write checkpoint step_00000001 in '.*': the disk is full "
                                        r"\(no space left on device\)\. .*no earlier checkpoint exists yet"):
        _save_small(tmp_path / "run")
    assert os.listdir(tmp_path / "run" / "checkpoints") == []
