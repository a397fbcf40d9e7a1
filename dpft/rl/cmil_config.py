"""Typed settings of the CMIL trainer (``dpft finetune agent=cmil dataset=DEMOS.hdf5 out=RUN``): ``cmil.<key>=``.

The defaults are the reduced CPU sizes (``cfg/preset/cmil_cpu.yaml`` restates them with the loop settings);
``cfg/preset/cmil_paper.yaml`` has the reference sizes (``victorkolev/cmil`` ``configs.yaml``, read in
``reference/inril_resip_furniture_cmil.md`` section 5) for a GPU. No torch import here (the Python 3.8 check
loads this schema without torch). Annotations use ``typing`` (OmegaConf evaluates them on Python 3.8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from dpft.errors import DpftError
from dpft.ranges import _f, check_ranges


@dataclass
class CmilConfig:
    """CMIL (agent=cmil): world model, discriminator, actor-critic in imagination, BC, schedule."""

    # observations
    camera: str = _f("agentview_image", "dataset/env camera key (uint8 images; resized to 64x64 if the dataset differs)")
    proprio: bool = _f(False, "also feed proprioception (cmil.proprio_keys) to the encoder and decoder")
    proprio_keys: List[str] = _f(factory=lambda: ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"],
                                 help="low-dim keys used when cmil.proprio=true")
    # world model (dpft/models/world_model.py)
    deter: int = _f(200, "RSSM deterministic state size (paper 400)", range=">=1")
    stoch: int = _f(32, "RSSM stochastic state size, Gaussian (paper 360)", range=">=1")
    hidden: int = _f(200, "RSSM hidden size (paper 400)", range=">=1")
    depth: int = _f(16, "CNN depth of encoder and decoder (paper 48)", range=">=1")
    ensemble: int = _f(5, "prior heads K of the RSSM ensemble (paper 10)", range=">=1")
    mlp_units: int = _f(200, "width of the world model's proprio MLPs (encoder and decoder, cmil.proprio=true; paper 400)",
                        range=">=1")
    kl_balance: float = _f(0.8, "KL balance: weight of KL(sg(post) || prior)", range="[0,1]")
    kl_free: float = _f(1.0, "free nats (clip of the mean KL)", range=">=0")
    # imagination and returns
    imag_horizon: int = _f(15, "imagination horizon H", range=">=1")
    discount: float = _f(0.99, "discount per env step", range="[0,1]")
    lam: float = _f(0.95, "lambda of the lambda-returns", range="[0,1]")
    # reward
    disc_noise: float = _f(2.5, "std of the Gaussian instance noise on both discriminator inputs", range=">=0")
    disc_layers: int = _f(2, "discriminator hidden layers", range=">=0")
    disc_units: int = _f(200, "discriminator width", range=">=1")
    alpha: float = _f(10.0, "ensemble-disagreement penalty (reference unc_penalty = -10)", range=">=0")
    reward_form: str = _f("code", "code: D - alpha * u (reference code) | paper: log D - log(1 - D) - alpha * u")
    # actor-critic
    actor_layers: int = _f(4, "actor hidden layers", range=">=0")
    actor_units: int = _f(200, "actor width (paper 400)", range=">=1")
    actor_min_std: float = _f(0.1, "actor std floor", range=">0")
    actor_ent: float = _f(1e-4, "actor entropy bonus", range=">=0")
    critic_layers: int = _f(4, "critic hidden layers (2 critics, min for the targets)", range=">=0")
    critic_units: int = _f(200, "critic width (paper 400)", range=">=1")
    target_every: int = _f(100, "copy the critics into the slow targets every this many updates", range=">=1")
    real_critic: bool = _f(False, "also fit the V critics to lambda-returns of D on real replay sequences "
                           "(off-policy returns, biased for V: off by default; docs/cmil.md)")
    bc_scale: float = _f(10.0, "BC regularization weight: bc_scale * -log pi(a_expert | expert latent)", range=">=0")
    # schedule
    pretrain_steps: int = _f(50, "updates on the expert data before any env step (reference 1000)", range=">=0")
    bc_init_steps: int = _f(20, "BC-only actor steps (SGD, bc_lr) after pretraining (reference 100)", range=">=0")
    bc_lr: float = _f(2e-4, "learning rate of the BC initialization (SGD, reference)", range=">0")
    seed_steps: int = _f(500, "env steps acting before online updates start (reference 5000)", range=">=0")
    seed_action: str = _f("policy", "action during the seed steps: policy (the BC-initialized actor, reference) | random")
    train_every: int = _f(5, "env steps (summed over envs) between training rounds", range=">=1")
    train_steps: int = _f(2, "updates per training round", range=">=0")
    batch_size: int = _f(8, "sequences per batch (reference 32)", range=">=1")
    seq_len: int = _f(16, "sequence length (reference 50)",
                      range=">=2", meaning='the discriminator pairs step t with the action of t + 1')
    replay_size: int = _f(20000, "online+expert replay capacity in steps (uint8 64x64x3 images: 12 KiB each)",
                          range=">=2")
    # optimizers (Adam; the reference builds critic and discriminator optimizers from actor_opt, lr 3e-4)
    model_lr: float = _f(3e-4, "world-model learning rate", range=">0")
    actor_lr: float = _f(3e-4, "actor learning rate", range=">0")
    critic_lr: float = _f(3e-4, "critic learning rate", range=">0")
    disc_lr: float = _f(3e-4, "discriminator learning rate", range=">0")
    opt_eps: float = _f(1e-5, "Adam epsilon", range=">0")
    grad_clip: float = _f(100.0, "gradient-norm clip of every optimizer", range=">0")
    model_wd: float = _f(1e-6, "world-model weight decay", range=">=0")


def validate_cmil(cfg: Any) -> None:
    """Cross-field checks of ``dpft finetune`` with ``agent=cmil`` (or with ``dataset=``), each naming its key."""
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
    # iterations, envs, eval_*, save_every, ... are range-checked on their fields by FinetuneConfig.validate
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
