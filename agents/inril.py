"""IN-RIL and CAIR as one plug-in for the fine-tuning agents: interleaved IL steps, gradient separation, adaptive
m(t), CAIR's weighted CAGrad update, the gradient-alignment monitor and the held-out IL loss.

The math and its state live in :mod:`dpft.rl.inril` / :mod:`dpft.rl.grad` (docs/inril.md); this module wires
them into the training loop. An agent takes part by having

- ``actor_parameters()``: the parameters RL trains (DPPO's and IDQL's fine-tuned copy, the Gaussian policy);
- ``il_loss(batch, generator) -> loss``: its own BC loss through those parameters, :func:`actor_il_loss` for
  every agent: DPPO and IDQL the epsilon loss through the fine-tuned copy on the timesteps
  ``model.ft_timestep_range()`` the fine-tuned sampling steps serve (DDPM ``[0, K')``; IDQL's default
  whole-chain copy: every timestep); Gaussian the NLL;
- optional ``il_parameters()`` (network separation: residual PPO's base);
- an ``inril`` attribute (None) and the two calls of the shared update: :meth:`InRIL.after_rl_backward` between
  the RL backward and the optimizer steps (``after_backward`` hook; IDQL: the actor step's backward in
  :func:`dpft.rl.idql.idql_update`) and :meth:`InRIL.after_rl_step` after each actor optimizer step;
  :meth:`InRIL.pop_metrics` merged into the iteration's metrics.

Per RL gradient step (PPO: one minibatch update whose actor step is applied; IDQL: one replay gradient step
V -> Q -> target -> actor whose actor step runs, ``replay_ratio / batch_size`` of them per new transition;
critic warm-up and target-KL stops are not RL steps):

1. ``after_rl_backward``: the RL actor gradient (raw, before clipping) feeds the reference EMA (GradientEMA).
   Every ``inril.monitor_every`` RL steps -- and every step with CAIR -- an IL gradient is computed on a demo
   batch with ``torch.autograd.grad`` (``.grad`` untouched, so the monitor never changes the RL step) and
   ``cos(g_IL, g_RL)`` and both norms are recorded. With CAIR the actor gradient is replaced by
   ``cair_gradient(g_IL, g_RL, lambda, cair.c)`` and lambda is updated from the cosine.
2. ``after_rl_step``: the schedule counts the step; when an IL step is due, one IL step runs right away: IL
   gradient, separation against the reference (none / pcgrad / upgrad), the agent's gradient clip, and the
   IL optimizer's step (its own AdamW over the same parameters, lr ``inril.il_lr`` or ``agent.actor_lr``, warmed
   up linearly over the first ``inril.il_lr_warmup`` IL steps: the RL optimizer's moments stay those of the RL
   algorithm, and m=inf leaves RL untouched). Adaptive m is
   recomputed after every IL gradient.

IL data (:func:`load_il_data`): the checkpoint's pretraining demos (meta ``dataset`` and ``data_split``; older
checkpoints: the pretraining config.yaml) or ``inril.dataset``, windowed with the checkpoint's horizons and
normalized with the checkpoint's normalizer. Held-out demos: the pretraining valid split, else a seeded 10%
of the demos (taken out of the IL stream). One seeded CPU generator (``seed``-derived) draws every IL batch and
its diffusion noise; its state is saved, so a resumed run draws the same batches.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dpft.errors import DpftError
from dpft.rl.grad import cosine, flatten_grads, set_flat_grad
from dpft.rl.inril import (ADAPTIVE_RULES, AdaptiveInterleave, CairLambda, GradientEMA, InterleaveSchedule, cair_gradient, parse_m,
                           separate_il_gradient, validate_separation)

#: offset of the IL stream's seed from the run seed (keeps it apart from the sampler's stream)
IL_SEED_OFFSET = 7_919
#: seed of the held-out IL loss's noise (the same draws at every evaluation, so the curve shows the model only)
HELDOUT_SEED = 12_345
TENSOR_GROUPS = ("inril_schedule", "inril_rl_ema", "inril_il_ema", "inril_adaptive", "inril_cair", "inril_rng")


# ---------------------------------------------------------------------------------------------- config
def validate_inril_config(cfg: Any) -> None:
    """Checks of ``inril.*`` and ``cair.*`` (called by ``FinetuneConfig.validate``), each naming its key."""
    i, c = cfg.inril, cfg.cair
    parse_m(i.m, "inril.m")
    if cfg.agent.name == "idql" and i.separation == "network":
        raise DpftError("inril.separation=network is not available for agent=idql: IDQL's RL step (the actor's "
                        "diffusion loss on the replayed chunks the critics chose) and the IL step train the same "
                        "network, the fine-tuned diffusion actor (the frozen base is never trained and the critics "
                        "are not a policy), so there is no second network to give the IL steps. Use "
                        "inril.separation=none, pcgrad or upgrad.")
    validate_separation(i.separation, cfg.agent.name, "inril.separation")
    if cfg.agent.name == "idql" and not bool(getattr(cfg.agent, "train_actor", True)) and inril_active(cfg):
        raise DpftError("inril.m=%s / cair=%s interleave with (CAIR: reweights) IDQL's actor gradient steps, but "
                        "agent.train_actor=false takes none; set agent.train_actor=true, or inril.m=inf cair=false."
                        % (i.m, "true" if c.enabled else "false"))
    if not int(i.m_min) <= int(i.m_init) <= int(i.m_max):
        raise DpftError("inril.m_min=%s, inril.m_init=%s, inril.m_max=%s: expected m_min <= m_init <= m_max."
                        % (i.m_min, i.m_init, i.m_max))
    if str(i.adaptive_rule) not in ADAPTIVE_RULES:
        raise DpftError("inril.adaptive_rule=%s is unknown; expected %s (docs/inril.md section 5.2)."
                        % (i.adaptive_rule, " or ".join(ADAPTIVE_RULES)))
    CairLambda(c.start, c.rate, c.monotone, c.mode, c.lam_min, c.lam_max)  # its own checks name cair.<key>
    if i.separation == "network" and (str(i.m).strip().lower() == "adaptive" or c.enabled):
        raise DpftError("inril.separation=network trains different networks by IL (the base) and RL (the residual), "
                        "so their gradients share no space: %s needs them in one (use inril.separation=none, pcgrad "
                        "or upgrad, or a fixed inril.m)." % ("cair=true" if c.enabled else "inril.m=adaptive"))
    if i.separation != "none" and parse_m(i.m, "inril.m") == math.inf:
        raise DpftError("inril.separation=%s shapes the gradient of the IL steps, but inril.m=%s (the default: RL "
                        "only) takes no IL step, so it would change nothing. Interleave IL steps with inril.m=N "
                        "(e.g. inril.m=10) or inril.m=adaptive, or leave inril.separation=none." % (i.separation, i.m))


def inril_active(cfg: Any) -> bool:
    """True when IN-RIL or CAIR changes training (finite or adaptive m, or CAIR)."""
    return parse_m(cfg.inril.m, "inril.m") != math.inf or bool(cfg.cair.enabled)


# ---------------------------------------------------------------------------------------------- data
def _pretrain_split(meta: Dict[str, Any]) -> Dict[str, Any]:
    """How pretraining split its demos: meta ``data_split``; else the pretraining run's config.yaml."""
    if isinstance(meta.get("data_split"), dict):
        return dict(meta["data_split"])
    src = meta.get("source_checkpoint")
    path = os.path.join(str(src), "config.yaml") if src else None
    if path and os.path.isfile(path):
        import yaml

        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        data = saved.get("data") or {}
        return {"train_filter_key": data.get("train_filter_key", "train"),
                "valid_filter_key": data.get("valid_filter_key", "valid"),
                "valid_ratio": float(data.get("valid_ratio", 0.1)), "seed": int(saved.get("seed", 0))}
    return {"train_filter_key": "train", "valid_filter_key": "valid", "valid_ratio": 0.1, "seed": 0}


def load_il_data(meta: Dict[str, Any], normalizer: Any, dataset: Optional[str], seed: int,
                 device: torch.device) -> Tuple[Any, Optional[Any], Dict[str, Any]]:
    """``(il_ds, heldout_ds or None, info)``: demo windows exactly as pretraining built them.

    Demos: ``dataset`` (``inril.dataset``) or the checkpoint's meta ``dataset``. Split: the pretraining split
    (its filter keys, or its seeded ``valid_ratio`` split); with ``inril.dataset`` the file's ``train``/``valid``
    filter keys when present. When that leaves no held-out demo (``valid_ratio=0`` in pretraining, a file
    with a ``train`` key only), a seeded 10% of the IL demos is held out of the IL stream.
    """
    from dpft.data.dataset import WindowDataset, split_demos
    from dpft.data.hdf5 import filter_key_names, list_demos, load_demos, read_filter_keys

    key = "inril.dataset" if dataset else "the checkpoint's meta.json 'dataset'"
    path = dataset or meta.get("dataset")
    if not path:
        raise DpftError("IN-RIL needs the pretraining demonstrations, but the checkpoint's meta.json records no "
                        "'dataset'; pass inril.dataset=FILE.hdf5 (the demos the policy was pretrained on).")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise DpftError("IN-RIL demonstrations '%s' (%s) do not exist; pass inril.dataset=FILE.hdf5 with the "
                        "pretraining demos (or inril.m=inf inril.monitor_every=0 cair=false to run RL only "
                        "without them)." % (path, key))
    if dataset:
        split_cfg = {"train_filter_key": "train", "valid_filter_key": "valid", "valid_ratio": 0.1, "seed": int(seed)}
    else:
        split_cfg = _pretrain_split(meta)
    tk, vk = split_cfg.get("train_filter_key"), split_cfg.get("valid_filter_key")
    present = filter_key_names(path)
    for name, default in ((tk, "train"), (vk, "valid")):
        if name is not None and name != default and name not in present:
            raise DpftError("IN-RIL demonstrations '%s': the pretraining filter key '%s' is not in the file (filter "
                            "keys present: %s); pass inril.dataset= with the pretraining file." % (path, name, present))
    names = list_demos(path)
    fks = read_filter_keys(path, names=[k for k in (tk, vk) if k is not None])
    ratio = float(split_cfg.get("valid_ratio", 0.1))
    split = split_demos(names, fks, tk, vk, ratio if ratio > 0 else 0.1, int(split_cfg.get("seed", 0)))
    train, valid, source = list(split.train), list(split.valid), split.source
    if not valid and len(train) > 1:
        extra = split_demos(train, None, None, None, 0.1, int(split_cfg.get("seed", 0)))
        train, valid, source = list(extra.train), list(extra.valid), source + "+ratio"
    obs_keys = list(meta.get("obs_keys") or [])
    horizon, cond = int(meta["horizon_steps"]), int(meta["cond_steps"])

    def build(demo_names: List[str]):
        demos = load_demos(path, obs_keys, demo_names=demo_names)
        try:
            return WindowDataset(demos, horizon, cond, normalizer, device)
        except DpftError as e:
            raise DpftError("IN-RIL demonstrations '%s' do not fit the checkpoint: %s" % (path, e)) from None

    il_ds = build(train)
    held = None
    if valid:
        try:
            held = build(valid)
        except DpftError:
            held = None  # every held-out demo shorter than horizon_steps: no held-out loss
    info = {"path": path, "split": source, "il_demos": len(train), "heldout_demos": len(valid) if held else 0,
            "il_windows": len(il_ds), "heldout_windows": len(held) if held is not None else 0}
    return il_ds, held, info


# ---------------------------------------------------------------------------------------------- the IL loss
def actor_il_loss(model: Any, batch: Dict[str, Any], generator: torch.Generator, obs_rms: Any = None) -> torch.Tensor:
    """The imitation loss of a demo batch through the parameters RL trains, the one every agent's ``il_loss``
    returns: a diffusion actor with a fine-tuned copy (DPPO, IDQL) its epsilon loss through the copy on the
    timesteps the copy serves (``model.ft_timestep_range()``; DDPM ``[0, K')``, IDQL's whole chain ``[0, K)``),
    any other model its own ``loss`` (a Gaussian policy's NLL). ``obs_rms`` (a running state normalizer,
    ``normalize(x)``) is applied to ``obs["state"]`` first, as the agent's own acting transform."""
    obs = dict(batch["obs"])
    if obs_rms is not None and "state" in obs:
        obs["state"] = obs_rms.normalize(obs["state"]).to(obs["state"].dtype)
    batch = {"obs": obs, "actions": batch["actions"]}
    if getattr(model, "ft_network", None) is not None:
        return model.loss(batch, generator, network="ft", t_range=model.ft_timestep_range())[0]
    return model.loss(batch, generator)[0]


# ---------------------------------------------------------------------------------------------- the plug-in
def _flat(grads: List[Optional[torch.Tensor]], params: List[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


class InRIL:
    """The IN-RIL / CAIR / monitor plug-in of one fine-tuning run (module docstring)."""

    def __init__(self, cfg: Any, agent: Any, meta: Dict[str, Any], normalizer: Any, device: torch.device):
        i, c = cfg.inril, cfg.cair
        self.agent = agent
        self.cfg = cfg
        self.device = device
        self.m_value = parse_m(i.m, "inril.m")
        self.adaptive = self.m_value == "adaptive"
        self.separation = validate_separation(i.separation, cfg.agent.name, "inril.separation")
        self.monitor_every = int(i.monitor_every)
        self.batch_size = int(i.batch_size)
        self.heldout_max = int(i.heldout_max_windows)
        self.seed = int(cfg.seed)
        self.params = list(agent.actor_parameters())
        il_params = getattr(agent, "il_parameters", None)
        self.il_params = list(il_params()) if (self.separation == "network" and il_params) else self.params
        self.same_space = self.il_params is self.params
        self.il_ds, self.heldout_ds, self.data_info = load_il_data(meta, normalizer, i.dataset, self.seed, device)
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(self.seed + IL_SEED_OFFSET)
        self.schedule = InterleaveSchedule(int(i.m_init) if self.adaptive else self.m_value)
        self.rl_ema = GradientEMA(float(i.ema_beta))
        self.il_ema = GradientEMA(float(i.ema_beta))
        actor_lr = float(cfg.agent.actor_lr)
        self.il_lr = float(i.il_lr) if i.il_lr is not None else actor_lr
        self.il_lr_warmup = int(i.il_lr_warmup)
        self.ctl = AdaptiveInterleave(int(i.m_init), int(i.m_min), int(i.m_max), lr_ratio=self.il_lr / actor_lr,
                                      c=float(i.adaptive_c), rule=str(i.adaptive_rule)) if self.adaptive else None
        self.cair = CairLambda(c.start, c.rate, c.monotone, c.mode, c.lam_min, c.lam_max) if c.enabled else None
        self.cair_c = float(c.c)
        self.interleave = self.adaptive or self.m_value != math.inf
        self.il_opt = torch.optim.AdamW(self.il_params, lr=self.il_lr, weight_decay=float(cfg.agent.weight_decay)) \
            if self.interleave else None
        self.max_grad_norm = cfg.agent.max_grad_norm
        self._reset_stats()

    # ------------------------------------------------------------------ IL gradients
    def il_gradient(self, params: List[torch.nn.Parameter]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(flat IL gradient, loss)`` on the next demo batch of the IL stream; ``.grad`` is not touched."""
        batch = self.il_ds.sample(self.batch_size, self.gen)
        loss = self.agent.il_loss(batch, self.gen)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return _flat(list(grads), params), loss.detach()

    def after_rl_backward(self) -> None:
        """Between the RL backward and the optimizer steps: reference EMA, monitor, CAIR's combination."""
        g_rl = flatten_grads(self.params)
        self.rl_ema.update(g_rl)
        monitor = self.monitor_every > 0 and self.schedule.rl_steps % self.monitor_every == 0
        if not (monitor or self.cair is not None):
            return
        g_il, loss = self.il_gradient(self.il_params)
        self.il_ema.update(g_il)
        self._s["il_loss_monitor"].append(loss)
        self._s["g_il_norm"].append(torch.linalg.vector_norm(g_il))
        self._s["g_rl_norm"].append(torch.linalg.vector_norm(g_rl))
        if self.same_space:
            cos = cosine(g_il, g_rl)
            self._s["cos"].append(cos)
        if self.cair is not None and self.same_space:
            combined = cair_gradient(g_il, g_rl, self.cair.value, self.cair_c)
            set_flat_grad(self.params, combined)
            self.cair.update(float(cos))
        if self.ctl is not None:
            self._adapt()

    def after_rl_step(self) -> None:
        """After an RL actor optimizer step: count it; run the IL step that falls due."""
        if self.schedule.record_rl_step():  # never with m = inf (the count is still the monitor's clock)
            self.il_step()

    def il_step(self) -> None:
        """One IL gradient step on the actor (separation against the reference RL direction)."""
        g_il, loss = self.il_gradient(self.il_params)
        self.il_ema.update(g_il)
        ref = self.rl_ema.mean if (self.same_space and self.rl_ema.count > 0) else None
        mode = "none" if self.separation == "network" else self.separation
        g = separate_il_gradient(g_il, ref, mode)
        if ref is not None:
            self._s["il_ref_cos_raw"].append(cosine(g_il, ref))
            self._s["il_ref_cos_applied"].append(cosine(g, ref))
        if not bool(torch.isfinite(g).all()):
            raise DpftError("The IN-RIL imitation step produced NaN/Inf gradients (IL loss %s); training stopped, the "
                            "last good checkpoint is kept. Lower inril.il_lr." % float(loss))
        self.il_opt.zero_grad(set_to_none=True)
        set_flat_grad(self.il_params, g.clone())
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.il_params, self.max_grad_norm)
        lr = self.il_step_lr(self.schedule.il_steps + 1)
        for group in self.il_opt.param_groups:
            group["lr"] = lr
        self.il_opt.step()
        self.il_opt.zero_grad(set_to_none=True)
        self.schedule.record_il_step()
        self._s["il_loss"].append(loss)
        if self.ctl is not None:
            self._adapt()

    def il_step_lr(self, k: int) -> float:
        """Learning rate of the k-th IL step (k >= 1): ``il_lr * min(1, k / il_lr_warmup)``. It is computed from
        the saved IL-step count, so a resumed run continues the warm-up where it stopped."""
        if self.il_lr_warmup <= 0:
            return self.il_lr
        return self.il_lr * min(1.0, float(k) / self.il_lr_warmup)

    def _adapt(self) -> None:
        self.schedule.set_m(self.ctl.update(self.il_ema, self.rl_ema))
        if self.ctl.stats:
            self._s["m_raw"].append(self.ctl.stats["m_raw"])
            self._s["rho"].append(self.ctl.stats["rho"])

    # ------------------------------------------------------------------ evaluation and logs
    @torch.no_grad()
    def heldout_loss(self) -> Optional[float]:
        """Mean IL loss over the first ``inril.heldout_max_windows`` held-out windows, with fixed noise draws."""
        ds = self.heldout_ds
        if ds is None:
            return None
        gen = torch.Generator(device="cpu")
        gen.manual_seed(HELDOUT_SEED)
        n = min(len(ds), self.heldout_max)
        total = 0.0
        for lo in range(0, n, self.batch_size):
            idx = torch.arange(lo, min(lo + self.batch_size, n), dtype=torch.long)
            total += float(self.agent.il_loss(ds.get(idx), gen)) * int(idx.numel())
        return total / n

    def _reset_stats(self) -> None:
        self._s = {k: [] for k in ("cos", "g_il_norm", "g_rl_norm", "il_loss", "il_loss_monitor", "il_ref_cos_raw",
                                    "il_ref_cos_applied", "m_raw", "rho")}

    def pop_metrics(self) -> Dict[str, Any]:
        """This iteration's IN-RIL metrics (means over the iteration; ``*_min`` minima), then reset."""
        out = {}  # type: Dict[str, Any]
        for k, v in self._s.items():
            if not v:
                continue
            vals = [float(x) for x in v]
            out["inril/" + k] = float(np.mean(vals))
            if k.startswith("il_ref_cos") or k == "cos":
                out["inril/%s_min" % k] = float(np.min(vals))
        if self._s["cos"]:
            out["inril/monitor_n"] = len(self._s["cos"])
        m = self.schedule.m
        out["inril/m"] = None if m == math.inf else float(m)
        out["inril/rl_steps"] = int(self.schedule.rl_steps)
        out["inril/il_steps"] = int(self.schedule.il_steps)
        if self.cair is not None:
            out["cair/lambda"] = float(self.cair.value)
        self._reset_stats()
        return out

    # ------------------------------------------------------------------ state
    def save_into(self, ts: Dict[str, Any]) -> None:
        """Add the plug-in's state to the trainer's training_state (``tensors`` groups, the IL optimizer)."""
        t = ts.setdefault("tensors", {})
        t["inril_schedule"] = self.schedule.state_dict()
        t["inril_rl_ema"] = self.rl_ema.state_dict()
        t["inril_il_ema"] = self.il_ema.state_dict()
        t["inril_rng"] = {"state": self.gen.get_state()}
        if self.ctl is not None:
            t["inril_adaptive"] = self.ctl.state_dict()
        if self.cair is not None:
            t["inril_cair"] = self.cair.state_dict()
        if self.il_opt is not None:
            ts.setdefault("optimizers", {})["inril_il"] = self.il_opt.state_dict()

    def load_from(self, ts: Dict[str, Any], where: str = "") -> None:
        """Restore exactly what :meth:`save_into` wrote."""
        t = ts.get("tensors") or {}
        need = ["inril_schedule", "inril_rl_ema", "inril_il_ema", "inril_rng"] + \
            (["inril_adaptive"] if self.ctl is not None else []) + (["inril_cair"] if self.cair is not None else [])
        missing = [k for k in need if k not in t]
        if self.il_opt is not None and "inril_il" not in (ts.get("optimizers") or {}):
            missing.append("optimizer inril_il")
        if missing and not (self.interleave or self.cair is not None):
            print("dpft finetune: %s has no alignment-monitor state (written before IN-RIL); the monitor starts "
                  "afresh" % (where or "the checkpoint"))
            return
        if missing:
            raise DpftError("resume=true: checkpoint %s has no IN-RIL state %s (was it written without these inril / "
                            "cair settings?)." % (where or "", missing))
        self.schedule.load_state_dict(t["inril_schedule"])
        self.rl_ema.load_state_dict(t["inril_rl_ema"], device=self.device)
        self.il_ema.load_state_dict(t["inril_il_ema"], device=self.device)
        self.gen.set_state(t["inril_rng"]["state"])
        if self.ctl is not None:
            self.ctl.load_state_dict(t["inril_adaptive"])
        if self.cair is not None:
            self.cair.load_state_dict(t["inril_cair"])
        if self.il_opt is not None:
            self.il_opt.load_state_dict(ts["optimizers"]["inril_il"])


def build_inril(cfg: Any, agent: Any, meta: Dict[str, Any], normalizer: Any, device: torch.device) -> Optional[InRIL]:
    """The plug-in for this run, attached as ``agent.inril``; None when neither IN-RIL, CAIR nor the monitor is
    on, or for a from-scratch run / an agent without the hooks with only the monitor asked for."""
    active = inril_active(cfg)
    supported = hasattr(agent, "inril") and hasattr(agent, "il_loss") and hasattr(agent, "actor_parameters")
    if not active and (int(cfg.inril.monitor_every) == 0 or not cfg.checkpoint or not supported):
        return None  # RL only, nothing to monitor (no demos from scratch; the agent has no IL loss yet)
    if not supported:
        raise DpftError("agent=%s does not take IN-RIL / CAIR yet (inril.m=%s, cair=%s); use agent=dppo, ppo, "
                        "residual_ppo or idql, or inril.m=inf cair=false." % (cfg.agent.name, cfg.inril.m,
                                                                             cfg.cair.enabled))
    if not cfg.checkpoint:
        raise DpftError("IN-RIL / CAIR (inril.m=%s, cair=%s) imitate the demonstrations of a pretrained checkpoint; a "
                        "from-scratch run (env=) has none. Pass checkpoint=RUN_DIR." % (cfg.inril.m, cfg.cair.enabled))
    try:
        plug = InRIL(cfg, agent, meta, normalizer, device)
    except DpftError as e:
        if active:
            raise
        # RL only: the monitor is a diagnostic, a missing or unreadable demo file must not stop the run
        print("dpft finetune: alignment monitor off (%s)" % e)
        return None
    agent.inril = plug
    return plug


# ---------------------------------------------------------------------------------------------- plot
def plot_alignment(run_dir: str, path: Optional[str] = None) -> Optional[str]:
    """``RUN_DIR/alignment.png``: cos(g_IL, g_RL), the two gradient norms (log scale), the held-out IL loss and
    m / lambda against env steps (from metrics.jsonl, :func:`dpft.plotting.plot_run`); None when the run logged
    none of them."""
    from dpft.plotting import Panel, plot_run

    panels = [Panel("cos(g_IL, g_RL)", [("inril/cos", "monitor"),
                                        ("inril/il_ref_cos_applied", "IL step vs reference")]),
              Panel("gradient norm", [("inril/g_il_norm", "|g_IL|"), ("inril/g_rl_norm", "|g_RL|")], logy=True),
              Panel("held-out IL loss", [("eval/il_loss_heldout", "held-out demos")]),
              Panel("m / lambda", [("inril/m", "m"), ("cair/lambda", "lambda")])]
    return plot_run(run_dir, panels, "alignment.png", path=path)


__all__ = ["InRIL", "build_inril", "load_il_data", "plot_alignment", "validate_inril_config", "inril_active",
           "actor_il_loss"]
