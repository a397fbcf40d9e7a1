"""World-model update time per batch for CMIL, split into encoder / RSSM observe / imagination / heads+backward.

Usage: ``python tools/bench_cmil.py [--preset reduced|paper] [--device cpu|cuda] [--windows small|full]``

Presets: ``reduced`` = batch 16 x seq 32, deter 200, stoch 32, hidden 200, depth 16, ensemble 5 (CPU);
``paper`` = batch 50 x seq 50 with the reference sizes (deter 400, stoch 360, hidden 400, depth 48,
ensemble 10; GPU). Imagination: horizon 15 from every posterior state with a 4x400 (reduced: 2x200) ELU
actor. ``--windows small`` times 1 warm-up + 2 measured updates, ``full`` 3 + 10. Prints a markdown table
(milliseconds per update, mean over the measured updates).
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch

from dpft.models.world_model import WorldModel, WorldModelConfig, detach_state, mlp_head

PRESETS = {
    "reduced": dict(batch=16, seq=32, cfg=WorldModelConfig.reduced(), actor_layers=2, actor_units=200),
    "paper": dict(batch=50, seq=50, cfg=WorldModelConfig.paper(), actor_layers=4, actor_units=400),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", choices=["small", "full"], default="small")
    ap.add_argument("--horizon", type=int, default=15)
    ap.add_argument("--action-dim", type=int, default=9)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    p = PRESETS[args.preset]
    b, t, a = p["batch"], p["seq"], args.action_dim
    torch.manual_seed(0)
    wm = WorldModel(p["cfg"], a).to(device)
    actor = mlp_head(wm.feat_dim, a, p["actor_layers"], p["actor_units"]).to(device)
    opt = torch.optim.Adam(wm.parameters(), lr=3e-4, eps=1e-5)
    g = torch.Generator(device=device).manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8, device=device),
        "action": torch.randn(b, t, a, device=device),
        "is_first": torch.zeros(b, t, dtype=torch.bool, device=device),
    }
    batch["is_first"][:, 0] = True
    warm, meas = (1, 2) if args.windows == "small" else (3, 10)
    times: Dict[str, List[float]] = {"encoder": [], "rssm_observe": [], "heads_backward": [], "imagine": []}
    cfg = wm.cfg
    for i in range(warm + meas):
        _sync(device)
        t0 = time.perf_counter()
        embed = wm.encode(batch)
        _sync(device)
        t1 = time.perf_counter()
        post, prior = wm.rssm.observe(embed, batch["action"], batch["is_first"], generator=g)
        _sync(device)
        t2 = time.perf_counter()
        kl, _ = wm.rssm.kl_loss(post, prior, cfg.kl_balance, cfg.kl_free, cfg.kl_free_avg)
        dec = wm.decoder(wm.rssm.get_feat(post))
        target = batch["image"].float().div(255.0).sub(0.5)
        loss = kl + 0.5 * (target - dec["image"]).pow(2).flatten(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        with wm.frozen():
            seq = wm.imagine(lambda f: torch.tanh(actor(f)), detach_state(post), args.horizon, generator=g)
            seq["feat"].mean().backward()
        _sync(device)
        t4 = time.perf_counter()
        if i >= warm:
            times["encoder"].append(t1 - t0)
            times["rssm_observe"].append(t2 - t1)
            times["heads_backward"].append(t3 - t2)
            times["imagine"].append(t4 - t3)
    ms = {k: 1000.0 * sum(v) / len(v) for k, v in times.items()}
    wm_total = ms["encoder"] + ms["rssm_observe"] + ms["heads_backward"]
    print("| preset | device | batch x seq | encoder ms | RSSM observe ms | heads+backward+step ms | "
          "world-model update ms | imagination H={} (+actor backward) ms |".format(args.horizon))
    print("|---|---|---|---|---|---|---|---|")
    print("| {} | {} | {} x {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |".format(
        args.preset, device, b, t, ms["encoder"], ms["rssm_observe"], ms["heads_backward"], wm_total, ms["imagine"]))
    print("({} measured updates after {} warm-up; torch {} threads {})".format(
        meas, warm, torch.__version__, torch.get_num_threads()))


if __name__ == "__main__":
    main()
