"""The on-policy NaN/Inf gradient check reads one combined norm (agents/onpolicy.py grad_total_norm, or
clip_grad_norm_'s total norm with agent.max_grad_norm): hand-computed norms, non-finite detection, and the run
stopping with the same message on the clipping path too (the unclipped path: tests/test_finetune_faults.py)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from dpft.errors import DpftError
from tests.test_finetune import _ft, gaussian_run, hopper_data  # noqa: F401 (fixtures)


def _params(*grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(2 if g is None else len(g)))
        p.grad = None if g is None else torch.tensor(g, dtype=torch.float32)
        out.append(p)
    return out


def test_grad_total_norm_is_the_norm_of_all_gradients_together():
    from dpft.agents.onpolicy import grad_total_norm

    n = grad_total_norm(_params([3.0, 0.0], None, [4.0, 12.0]))  # sqrt(9 + 16 + 144) = 13
    assert n.dim() == 0 and float(n) == pytest.approx(13.0)
    ps = _params([1.0, 2.0], [2.0])
    assert float(grad_total_norm(ps)) == pytest.approx(float(torch.nn.utils.clip_grad_norm_(ps, 1e9)))
    assert math.isnan(float(grad_total_norm(_params([1.0], [float("nan"), 0.0]))))
    assert math.isinf(float(grad_total_norm(_params([float("inf")], [1.0]))))
    assert float(grad_total_norm(_params(None))) == 0.0


def test_nan_gradients_stop_the_run_with_clipping_on(tmp_path, monkeypatch, gaussian_run):
    from dpft.agents.finetune import finetune
    from dpft.agents.ppo import PPOAgent
    from dpft.checkpoint import find_latest

    loss_of = PPOAgent.policy_loss

    def diverging(self, ro, flat, idx):
        loss, info = loss_of(self, ro, flat, idx)
        return (loss * float("nan") if self.train_iterations >= 1 else loss), info

    monkeypatch.setattr(PPOAgent, "policy_loss", diverging)
    with pytest.raises(DpftError, match="NaN/Inf gradients at training iteration 1.*last good checkpoint is kept"):
        finetune(_ft(tmp_path / "ft", "agent=ppo", "checkpoint=%s" % gaussian_run, "iterations=3", "save_every=1",
                     "eval_every=0", "agent.max_grad_norm=0.5"))
    assert os.path.basename(find_latest(str(tmp_path / "ft"))) == "step_00000001"
