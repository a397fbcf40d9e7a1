"""`--help` and `--show-config` mean the same on every command and never start work (issue 23, item 7)."""
from __future__ import annotations

import pytest
import yaml

from dpft.cli import COMMANDS, main


@pytest.fixture
def no_work(monkeypatch):
    """Make every command's work function fail loudly, so a flag that starts work is caught."""
    import dpft.agents.finetune as ft
    import dpft.agents.pretrain as pre
    import dpft.agents.quickstart as qs
    import dpft.data.hdf5 as h5
    import dpft.dppo_import as dppo
    import dpft.envs.demos as demos
    import dpft.envs.rollout as ro
    import dpft.sysinfo as si

    def boom(*a, **k):
        raise AssertionError("work started")

    for mod, name in ((qs, "quickstart"), (si, "system_report"), (h5, "describe"), (pre, "pretrain"),
                      (ft, "finetune"), (demos, "make_demos"), (ro, "rollout_checkpoint"),
                      (dppo, "import_dppo_checkpoint")):
        monkeypatch.setattr(mod, name, boom)


ARGS = {"data": ["info"], "demos": [], "pretrain": [], "finetune": [], "rollout": [], "quickstart": [], "info": [],
        "import-dppo": ["checkpoint=state_1.pt", "normalization=norm.npz", "out=run"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "--show-config"])
def test_flags_never_start_work(command, flag, no_work, capsys):
    assert main([command] + ARGS[command] + [flag]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    if flag == "--help":
        assert "Usage: dpft %s" % command in out


def test_quickstart_show_config_prints_its_settings_and_runs_nothing(no_work, capsys):
    assert main(["quickstart", "--show-config", "demos=5", "finetune=0"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["demos"] == 5 and shown["finetune"] == 0 and shown["out"] == "runs/quickstart"
    assert "horizon_steps=8" in shown["pretrain_overrides"] and "agent=dppo" in shown["finetune_overrides"]


def test_quickstart_show_config_still_checks_options(no_work, capsys):
    assert main(["quickstart", "--show-config", "demoz=5"]) == 2
    assert "quickstart option 'demoz' is unknown" in capsys.readouterr().err


def test_info_refuses_arguments(no_work, capsys):
    assert main(["info", "verbose=true"]) == 2
    assert "dpft info takes no options; got 'verbose=true'" in capsys.readouterr().err


def test_data_info_show_config_is_not_a_file_name(no_work, capsys):
    assert main(["data", "info", "--show-config"]) == 0
    assert "no config to show" in capsys.readouterr().out
    assert main(["data", "info", "--verbose"]) == 2
    assert "Unknown flag '--verbose' for `dpft data`" in capsys.readouterr().err
