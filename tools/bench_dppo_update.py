"""DPPO update throughput (issue 7, figure 1): samples/s of the real minibatch step beside a bare loop.

At DPPO's robomimic Can size (obs 23, action 7, horizon 4 = act_steps, residual Mish MLP [512, 512, 512],
DDPM 20 steps with the last 10 fine-tuned, critic [256, 256, 256]) and DPPO's minibatch of 7,500 (env step,
denoising step) pairs:

* ``update``: :meth:`dpft.agents.dppo.DPPOAgent.policy_loss` (gather the pairs, encode, one denoising step's
  log-prob through the fine-tuned copy, clamp/mean, DPPO clip schedule and denoising discount) plus the
  critic's value loss, one backward, both AdamW steps -- exactly the body of the shared update loop;
* ``bare``: the same network work without dpft's bookkeeping: ``ft_network(x_k, t, obs)`` and the critic on
  fixed tensors of the same size, the Gaussian log-prob written inline, backward and the two AdamW steps.

Windows alternate (A/B/A/B...) and medians are reported; goal: update/bare >= 0.9 in samples/s.

    .venv/bin/python tools/bench_dppo_update.py --threads 2 --windows 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch


def build(batch: int):
    from dpft.agents.dppo import DPPOAgent
    from dpft.models import build_policy_model
    from dpft.normalization import MinMaxNormalizer
    from dpft.policy import Policy
    from dpft.rl.config import AgentConfig
    import numpy as np

    torch.manual_seed(0)
    spec = {"name": "diffusion_mlp", "mlp_dims": [512, 512, 512], "residual_style": True, "activation": "mish",
            "time_dim": 16, "denoising_steps": 20, "randn_clip_value": 3.0}
    model = build_policy_model(spec, {}, 23, [], 7, 4, 1)
    model.make_finetunable(10)
    meta = {"obs_keys": ["state"], "low_dim_keys": ["state"], "image_keys": [], "obs_shapes": {"state": [23]},
            "obs_dim": 23, "action_dim": 7, "horizon_steps": 4, "cond_steps": 1, "act_steps": 4}
    norm = MinMaxNormalizer({"state": (-np.ones(23), np.ones(23)), "action": (-np.ones(7), np.ones(7))})
    policy = Policy(model, norm, meta, weights="model")
    model.train()
    cfg = AgentConfig()
    agent = DPPOAgent(cfg, policy, 50, torch.device("cpu"), torch.Generator().manual_seed(0), 10)
    # one iteration's worth of fake rollout data: T x N env steps, K' = 10 pairs each
    t, n = 150, 50
    g = torch.Generator().manual_seed(1)
    obs = {"state": torch.rand(t * n, 1, 23, generator=g) * 2 - 1}
    with torch.no_grad():
        _, chain, logp = model.sample(obs, generator=g, return_chain=True, return_log_prob=True)
    flat = {"obs": obs, "act": {"chain": chain, "logprob": logp}, "adv": torch.randn(t * n, generator=g),
            "ret": torch.randn(t * n, generator=g), "v_old": torch.zeros(t * n)}
    ro = SimpleNamespace(shape=(t, n))
    return agent, flat, ro


def update_step(agent, flat, ro, idx):
    from dpft.rl.ppo_loss import value_loss

    pg, _ = agent.policy_loss(ro, flat, idx)
    rows = agent.sample_rows(ro, idx)
    v = agent.critic(agent.critic_input({k: x[rows] for k, x in flat["obs"].items()}))
    loss = pg + 0.5 * value_loss(v, flat["ret"][rows])
    agent.actor_opt.zero_grad(set_to_none=True)
    agent.critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    agent.critic_opt.step()
    agent.actor_opt.step()


def make_bare(agent, batch: int):
    model = agent.model
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 7, generator=g)
    x_next = torch.randn(batch, 4, 7, generator=g)
    cond = torch.randn(batch, 23, generator=g)
    t = torch.randint(0, 10, (batch,), generator=g)
    std = torch.full((batch, 4, 7), 0.1)

    def step():
        eps = model.ft_network(x, t, cond)
        mean = x - 0.1 * eps
        lp = (-0.5 * ((x_next - mean) / std) ** 2 - std.log()).clamp(-5, 2).mean((1, 2))
        pg = -(lp.exp()).mean()
        v = agent.critic(cond)
        loss = pg + 0.5 * (v ** 2).mean()
        agent.actor_opt.zero_grad(set_to_none=True)
        agent.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        agent.critic_opt.step()
        agent.actor_opt.step()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="minibatch steps per window")
    p.add_argument("--batch", type=int, default=7500)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    agent, flat, ro = build(a.batch)
    total = agent.num_samples(ro)
    gen = torch.Generator().manual_seed(3)
    bare = make_bare(agent, a.batch)
    times = {"update": [], "bare": []}
    for fn in (lambda: update_step(agent, flat, ro, torch.randperm(total, generator=gen)[: a.batch]), bare):
        fn()  # warm-up
    for _ in range(a.windows):
        for name in ("update", "bare"):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                if name == "update":
                    update_step(agent, flat, ro, torch.randperm(total, generator=gen)[: a.batch])
                else:
                    bare()
            times[name].append(a.batch * a.steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"threads": a.threads, "batch": a.batch, "windows": a.windows, "samples_per_s": med,
           "ratio_update_over_bare": med["update"] / med["bare"], "all": times}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
