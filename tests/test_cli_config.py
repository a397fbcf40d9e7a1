"""Config composition, validation messages and CLI help/exit codes (no simulators needed)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dpft.cli import main
from dpft.config import PretrainConfig, compose, describe_schema, to_object
from dpft.errors import DpftError


def test_compose_defaults_and_overrides():
    cfg = compose("pretrain", ["dataset=d.hdf5", "out=r", "policy=diffusion_unet", "steps=7",
                               "horizon_steps=8", "policy.down_dims=[32,64]", "obs_keys=[a,b]"])
    assert cfg.policy.name == "diffusion_unet"
    assert list(cfg.policy.down_dims) == [32, 64]
    assert cfg.steps == 7 and cfg.horizon_steps == 8
    assert list(cfg.obs_keys) == ["a", "b"]
    obj = to_object(cfg)
    assert isinstance(obj, PretrainConfig)
    # gaussian group sets its own defaults
    g = compose("pretrain", ["dataset=d.hdf5", "out=r", "policy=gaussian_mlp"])
    assert g.policy.name == "gaussian_mlp" and g.policy.mlp_dims is None  # null: dpft.config.DEFAULT_MLP_DIMS


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["foo=1"], "Could not override 'foo'"),
        (["+foo=1"], "Key 'foo' not in 'PretrainConfig'"),
        (["steps=abc"], "key: steps"),
        (["policy=nope"], "diffusion_unet"),
        (["dataset=d", "out=r", "act_steps=9"], "act_steps=9 cannot exceed horizon_steps=4"),
        (["out=r"], "dataset=FILE.hdf5 is required"),
        (["dataset=d"], "out=RUN_DIR is required"),
        (["dataset=d", "out=r", "policy.use_ddim=true"], "ddim_steps"),
        (["dataset=d", "out=r", "logger=tensorboard"], "logger='tensorboard'"),
        (["dataset=d", "out=r", "log_every=0"], "log_every=0 must be >= 1"),
        (["dataset=d", "out=r", "val_every=-1"], "val_every=-1 must be >= 0"),
    ],
)
def test_bad_overrides_raise_clear_errors(overrides, expected):
    with pytest.raises(DpftError) as e:
        compose("pretrain", overrides)
    assert expected in str(e.value)


def test_help_lists_every_option_with_help_text():
    lines = describe_schema(PretrainConfig)
    text = "\n".join(lines)
    for key in ("dataset", "out", "steps", "save_every", "seed", "device", "resume", "obs_keys", "horizon_steps",
                "cond_steps", "act_steps", "policy.denoising_steps", "batch_size", "lr", "data.valid_ratio"):
        assert f"  {key} " in text, key
    assert all(len(line.split()) >= 3 for line in lines)  # key, default and a help text on every line


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["demos", "--help"], ["rollout", "--help"],
                                  ["data", "--help"], ["quickstart", "--help"]])
def test_help_exits_zero(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dpft" in out or "Usage" in out


def test_cli_error_is_one_paragraph_and_exit_2(capsys):
    assert main(["pretrain", "out=r"]) == 2
    err = capsys.readouterr().err
    assert "dataset=FILE.hdf5 is required" in err
    assert "Traceback" not in err


def test_unknown_command_and_flag(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["pretrain", "--bogus"]) == 2
    assert "Unknown flag '--bogus'" in capsys.readouterr().err


def test_show_config_prints_resolved_yaml(capsys):
    assert main(["pretrain", "--show-config", "policy=gaussian_mlp", "steps=3"]) == 0
    out = capsys.readouterr().out
    assert "name: gaussian_mlp" in out and "steps: 3" in out


def test_console_entry_point_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "dpft", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "dpft pretrain" in r.stdout
