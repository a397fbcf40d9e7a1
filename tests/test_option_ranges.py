"""Every numeric option declares its range on its field (dpft.ranges), one validator reads them all, and settings
that would change nothing are refused (issue 23, items 6 and 11)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import List, Optional

import pytest

from dpft.config import SCHEMAS, compose
from dpft.errors import DpftError
from dpft.ranges import _f, check_ranges, parse_range

FT = ["checkpoint=x", "out=o"]


@pytest.mark.parametrize("args, message", [
    # max_episode_steps: 0 and -5 get the same rule and say what unset means (0 used to mean "the task's limit")
    (["max_episode_steps=0"], "max_episode_steps=0 must be >= 1 (leave it unset, or pass max_episode_steps=null, "
                              "for the task's own limit)."),
    (["max_episode_steps=-5"], "max_episode_steps=-5 must be >= 1 (leave it unset, or pass max_episode_steps=null, "
                               "for the task's own limit)."),
    (["agent=ppo", "agent.init_std=0"], "agent.init_std=0.0 must be > 0 (null = keep the checkpoint's std)."),
    (["agent.vf_coef=-1"], "agent.vf_coef=-1.0 must be >= 0 (a negative weight trains the critic away from the "
                           "returns)."),
    (["agent.reward_scale_const=0"], "agent.reward_scale_const=0.0 must be > 0 (0 would erase every reward)."),
    (["agent.weight_decay=-1"], "agent.weight_decay=-1.0 must be >= 0 (0 = no weight decay)."),
    (["eval_seed=-1"], "eval_seed=-1 must be in [0, 2147483647]."),
    (["agent.critic_dims=[]"], "agent.critic_dims=[] lists no hidden layer; give the critic's hidden widths"),
    (["agent.critic_dims=[64,0]"], "agent.critic_dims=[64,0] must be >= 1 in every entry (layer widths)."),
    (["inril.separation=pcgrad"], "inril.separation=pcgrad shapes the gradient of the IL steps, but inril.m=inf "
                                  "(the default: RL only) takes no IL step, so it would change nothing."),
    (["inril.separation=upgrad", "inril.m=inf"], "inril.separation=upgrad shapes the gradient of the IL steps"),
    (["cair.lam_max=1.5"], "cair.lam_max=1.5 must be in [0, 1]."),
])
def test_finetune_options_without_meaning_are_refused(args, message):
    with pytest.raises(DpftError) as e:
        compose("finetune", FT + args)
    assert message in str(e.value)
    assert "ValueNet" not in str(e.value) and "hidden_dims" not in str(e.value)


@pytest.mark.parametrize("command, base", [("demos", ["out=x.hdf5"]), ("rollout", ["checkpoint=c"])])
def test_max_episode_steps_has_one_rule_on_every_command(command, base):
    for bad in ("0", "-5"):
        with pytest.raises(DpftError, match=r"max_episode_steps=%s must be >= 1 \(leave it unset" % bad):
            compose(command, base + ["max_episode_steps=" + bad])
    assert compose(command, base + ["max_episode_steps=null"]).max_episode_steps is None


def test_pcgrad_with_interleaving_is_accepted():
    cfg = compose("finetune", FT + ["inril.separation=pcgrad", "inril.m=4"])
    assert cfg.inril.separation == "pcgrad" and cfg.inril.m == "4"


def test_pretrain_weight_decay_names_the_key():
    with pytest.raises(DpftError, match=r"^weight_decay=-1.0 must be >= 0 \(0 = no weight decay\)\.$"):
        compose("pretrain", ["dataset=d.hdf5", "out=r", "weight_decay=-1"])


def _numeric_fields(schema: type, prefix: str = ""):
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        t = hints[f.name]
        if is_dataclass(t):
            yield from _numeric_fields(t, prefix + f.name + ".")
        elif "bool" not in str(t) and ("int" in str(t) or "float" in str(t)):
            yield prefix + f.name, f


#: numeric options any finite value of which is meaningful
UNBOUNDED = {"demos.min_return", "finetune.agent.logprob_min", "finetune.agent.logprob_max",
             "finetune.agent.residual_init_logstd"}


def test_every_numeric_option_declares_its_range():
    missing = [command + "." + key for command, schema in SCHEMAS.items() for key, f in _numeric_fields(schema)
               if "range" not in f.metadata and command + "." + key not in UNBOUNDED]
    assert missing == []


def test_help_shows_the_declared_range(capsys):
    from dpft.cli import main

    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("agent.vf_coef"))
    assert line.rstrip().endswith("value-loss weight [>= 0]")


def test_range_spec_and_validator_on_a_new_schema():
    assert parse_range(">=1") == (1.0, float("inf"), True, True)
    assert parse_range("(0,1]") == (0.0, 1.0, False, True)
    assert parse_range("[0, 2)") == (0.0, 2.0, True, False)
    with pytest.raises(ValueError, match="bad range spec"):
        parse_range("0..1")

    @dataclass
    class Inner:
        rate: float = _f(0.5, "a rate", "(0,1)", "a fraction")

    @dataclass
    class Outer:
        n: int = _f(1, "count", ">=1")
        widths: List[int] = _f(help="widths", range=">=1", factory=lambda: [4, 4])
        cap: Optional[float] = _f(None, "optional cap", ">0")
        inner: Inner = _f(help="section", factory=Inner)

    check_ranges(Outer())  # defaults pass, None passes
    with pytest.raises(DpftError, match=r"^n=0 must be >= 1\.$"):
        check_ranges(Outer(n=0))
    with pytest.raises(DpftError, match=r"^widths=\[4,-1\] must be >= 1 in every entry\.$"):
        check_ranges(Outer(widths=[4, -1]))
    with pytest.raises(DpftError, match=r"^inner\.rate=1\.0 must be in \(0, 1\) \(a fraction\)\.$"):
        check_ranges(Outer(inner=Inner(rate=1.0)))
    with pytest.raises(DpftError, match=r"^cap=nan must be > 0\.$"):
        check_ranges(Outer(cap=float("nan")))
