"""Typed settings of the CMIL trainer (``dpft finetune agent=cmil dataset=DEMOS.hdf5 out=RUN``): ``cmil.<key>=``.

The defaults are the reduced CPU sizes (``cfg/preset/cmil_cpu.yaml`` restates them with the loop settings);
``cfg/preset/cmil_paper.yaml`` has the reference sizes (``victorkolev/cmil`` ``configs.yaml``, read in
``reference/inril_resip_furniture_cmil.md`` section 5) for a GPU. No torch import here (the Python 3.8 check
loads this schema without torch). Annotations use ``typing`` (OmegaConf evaluates them on Python 3.8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from dpft.errors import DpftError

_INF = float("inf")


def _f(default: Any = None, help: str = "", factory: Any = None) -> Any:
    """:func:`dpft.config._f` (a field with its help text). Not imported: dpft.config imports this module's
    importer (dpft.rl.config) at its end, so importing it here first would be circular."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class CmilConfig:
    """CMIL (agent=cmil): world model, discriminator, actor-critic in imagination, BC, schedule."""

    # observations
    camera: str = _f("agentview_image", "dataset/env camera key (uint8 images; resized to 64x64 if the dataset differs)")
    proprio: bool = _f(False, "also feed proprioception (cmil.proprio_keys) to the encoder and decoder")
    proprio_keys: List[str] = _f(factory=lambda: ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"],
                                 help="low-dim keys used when cmil.proprio=true")
    # world model (dpft/models/world_model.py)
    deter: int = _f(200, "RSSM deterministic state size (paper 400)")
    stoch: int = _f(32, "RSSM stochastic state size, Gaussian (paper 360)")
    hidden: int = _f(200, "RSSM hidden size (paper 400)")
    depth: int = _f(16, "CNN depth of encoder and decoder (paper 48)")
    ensemble: int = _f(5, "prior heads K of the RSSM ensemble (paper 10)")
    mlp_units: int = _f(200, "width of the world model's proprio MLPs (encoder and decoder, cmil.proprio=true; paper 400)")
    kl_balance: float = _f(0.8, "KL balance: weight of KL(sg(post) || prior)")
    kl_free: float = _f(1.0, "free nats (clip of the mean KL)")
    # imagination and returns
    imag_horizon: int = _f(15, "imagination horizon H")
    discount: float = _f(0.99, "discount per env step")
    lam: float = _f(0.95, "lambda of the lambda-returns")
    # reward
    disc_noise: float = _f(2.5, "std of the Gaussian instance noise on both discriminator inputs")
    disc_layers: int = _f(2, "discriminator hidden layers")
    disc_units: int = _f(200, "discriminator width")
    alpha: float = _f(10.0, "ensemble-disagreement penalty (reference unc_penalty = -10)")
    reward_form: str = _f("code", "code: D - alpha * u (reference code) | paper: log D - log(1 - D) - alpha * u")
    # actor-critic
    actor_layers: int = _f(4, "actor hidden layers")
    actor_units: int = _f(200, "actor width (paper 400)")
    actor_min_std: float = _f(0.1, "actor std floor")
    actor_ent: float = _f(1e-4, "actor entropy bonus")
    critic_layers: int = _f(4, "critic hidden layers (2 critics, min for the targets)")
    critic_units: int = _f(200, "critic width (paper 400)")
    target_every: int = _f(100, "copy the critics into the slow targets every this many updates")
    real_critic: bool = _f(False, "also fit the V critics to lambda-returns of D on real replay sequences "
                           "(off-policy returns, biased for V: off by default; docs/cmil.md)")
    bc_scale: float = _f(10.0, "BC regularization weight: bc_scale * -log pi(a_expert | expert latent)")
    # schedule
    pretrain_steps: int = _f(50, "updates on the expert data before any env step (reference 1000)")
    bc_init_steps: int = _f(20, "BC-only actor steps (SGD, bc_lr) after pretraining (reference 100)")
    bc_lr: float = _f(2e-4, "learning rate of the BC initialization (SGD, reference)")
    seed_steps: int = _f(500, "env steps acting before online updates start (reference 5000)")
    seed_action: str = _f("policy", "action during the seed steps: policy (the BC-initialized actor, reference) | random")
    train_every: int = _f(5, "env steps (summed over envs) between training rounds")
    train_steps: int = _f(2, "updates per training round")
    batch_size: int = _f(8, "sequences per batch (reference 32)")
    seq_len: int = _f(16, "sequence length (reference 50)")
    replay_size: int = _f(20000, "online+expert replay capacity in steps (uint8 64x64x3 images: 12 KiB each)")
    # optimizers (Adam; the reference builds critic and discriminator optimizers from actor_opt, lr 3e-4)
    model_lr: float = _f(3e-4, "world-model learning rate")
    actor_lr: float = _f(3e-4, "actor learning rate")
    critic_lr: float = _f(3e-4, "critic learning rate")
    disc_lr: float = _f(3e-4, "discriminator learning rate")
    opt_eps: float = _f(1e-5, "Adam epsilon")
    grad_clip: float = _f(100.0, "gradient-norm clip of every optimizer")
    model_wd: float = _f(1e-6, "world-model weight decay")


#: ranges of the numeric cmil.* keys, in dpft.config.RANGES form (registered by :func:`validate_cmil`)
CMIL_RANGES = [
    ("deter", 1, _INF, True, True, False, ""), ("stoch", 1, _INF, True, True, False, ""),
    ("hidden", 1, _INF, True, True, False, ""), ("depth", 1, _INF, True, True, False, ""),
    ("ensemble", 1, _INF, True, True, False, ""), ("mlp_units", 1, _INF, True, True, False, ""),
    ("kl_balance", 0.0, 1.0, True, True, False, ""), ("kl_free", 0.0, _INF, True, True, False, ""),
    ("imag_horizon", 1, _INF, True, True, False, ""), ("discount", 0.0, 1.0, True, True, False, ""),
    ("lam", 0.0, 1.0, True, True, False, ""), ("disc_noise", 0.0, _INF, True, True, False, ""),
    ("disc_layers", 0, _INF, True, True, False, ""), ("disc_units", 1, _INF, True, True, False, ""),
    ("alpha", 0.0, _INF, True, True, False, ""), ("actor_layers", 0, _INF, True, True, False, ""),
    ("actor_units", 1, _INF, True, True, False, ""), ("actor_min_std", 0.0, _INF, False, True, False, ""),
    ("actor_ent", 0.0, _INF, True, True, False, ""), ("critic_layers", 0, _INF, True, True, False, ""),
    ("critic_units", 1, _INF, True, True, False, ""), ("target_every", 1, _INF, True, True, False, ""),
    ("bc_scale", 0.0, _INF, True, True, False, ""), ("pretrain_steps", 0, _INF, True, True, False, ""),
    ("bc_init_steps", 0, _INF, True, True, False, ""), ("bc_lr", 0.0, _INF, False, True, False, ""),
    ("seed_steps", 0, _INF, True, True, False, ""), ("train_every", 1, _INF, True, True, False, ""),
    ("train_steps", 0, _INF, True, True, False, ""), ("batch_size", 1, _INF, True, True, False, ""),
    ("seq_len", 2, _INF, True, True, False, "the discriminator pairs step t with the action of t + 1"),
    ("replay_size", 2, _INF, True, True, False, ""), ("model_lr", 0.0, _INF, False, True, False, ""),
    ("actor_lr", 0.0, _INF, False, True, False, ""), ("critic_lr", 0.0, _INF, False, True, False, ""),
    ("disc_lr", 0.0, _INF, False, True, False, ""), ("opt_eps", 0.0, _INF, False, True, False, ""),
    ("grad_clip", 0.0, _INF, False, True, False, ""), ("model_wd", 0.0, _INF, True, True, False, ""),
]


def validate_cmil(cfg: Any) -> None:
    """Cross-field checks of ``dpft finetune`` with ``agent=cmil`` (or with ``dataset=``), each naming its key."""
    from dpft.config import RANGES, check_ranges

    RANGES.setdefault("CmilConfig", CMIL_RANGES)
    check_ranges(cfg.cmil, "cmil.")
    name = cfg.agent.name
    if name != "cmil":
        raise DpftError("dataset=%s is only read by agent=cmil (the other agents fine-tune checkpoint=RUN_DIR; "
                        "IN-RIL demos go in inril.dataset=); drop dataset= or use agent=cmil." % cfg.dataset)
    if not cfg.dataset:
        raise DpftError("agent=cmil needs dataset=DEMOS.hdf5: the robomimic HDF5 file of pixel demonstrations "
                        "(e.g. from `dpft demos task=lift image_obs=true camera_size=64 num=20 out=DEMOS.hdf5`).")
    if cfg.env:
        raise DpftError("agent=cmil rebuilds its env from the dataset's env_args; drop env=%s." % cfg.env)
    for key, value in (("iterations", cfg.iterations), ("envs", cfg.envs), ("n_steps", cfg.n_steps),
                       ("eval_episodes", cfg.eval_episodes)):
        if int(value) < 1:
            raise DpftError("%s=%s must be >= 1." % (key, value))
    for key, value in (("eval_every", cfg.eval_every), ("save_every", cfg.save_every),
                       ("keep_checkpoints", cfg.keep_checkpoints), ("num_threads", cfg.num_threads)):
        if int(value) < 0:
            raise DpftError("%s=%s must be >= 0." % (key, value))
    c = cfg.cmil
    if c.reward_form not in ("code", "paper"):
        raise DpftError("cmil.reward_form=%r must be code or paper." % (c.reward_form,))
    if c.seed_action not in ("policy", "random"):
        raise DpftError("cmil.seed_action=%r must be policy or random." % (c.seed_action,))
    if c.proprio and not list(c.proprio_keys):
        raise DpftError("cmil.proprio=true needs at least one key in cmil.proprio_keys.")
    if c.batch_size * c.seq_len > c.replay_size:
        raise DpftError("cmil.replay_size=%d is smaller than one batch (cmil.batch_size %d x cmil.seq_len %d)."
                        % (c.replay_size, c.batch_size, c.seq_len))
    if getattr(cfg, "inril", None) is not None and str(cfg.inril.m) != "inf":
        raise DpftError("inril.m=%s: IN-RIL interleaving is not available with agent=cmil (CMIL has its own BC "
                        "term, cmil.bc_scale); use inril.m=inf." % cfg.inril.m)
    if getattr(cfg, "cair", None) is not None and bool(cfg.cair.enabled):
        raise DpftError("cair=true is not available with agent=cmil; use cair=false.")


__all__ = ["CmilConfig", "validate_cmil"]
