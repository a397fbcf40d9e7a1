"""Typed config of ``dpft finetune`` (RL fine-tuning), composed from ``cfg/finetune.yaml``.

``cfg/finetune.yaml`` selects ``agent: dppo`` (group ``cfg/agent/*.yaml``: one file per agent with DPPO's
robomimic defaults) and ``cfg/preset/<agent>_<family>.yaml`` adds the published settings of the env family
(``robomimic``, ``gym``, ``furniture``, ``scratch``). The CLI picks the preset from the checkpoint's
``env_args`` (or ``env=`` for from-scratch runs) unless ``preset=`` is given; command-line overrides always win.

One flat :class:`AgentConfig` holds every agent's hyperparameters (fields an agent does not use are ignored,
as :class:`dpft.config.PolicyConfig` does for policies) so that every key is overridable as ``agent.<key>=``.
Dataclasses use ``typing.Optional``/``List`` (Python 3.8, OmegaConf evaluates annotations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from dpft.config import MAX_EPISODE_STEPS_MEANING, _f, check_ranges
from dpft.errors import DpftError
from dpft.rl.cmil_config import CmilConfig  # (H-cmil) agent=cmil settings, cmil.<key>=

AGENT_NAMES = ("dppo", "ppo", "idql", "residual_ppo", "cmil")
LOGGERS = ("none", "wandb")


@dataclass
class AgentConfig:
    """Hyperparameters of the RL agents (DPPO defaults; see ``cfg/agent/*.yaml`` and ``cfg/preset/``)."""

    name: str = _f("dppo", "dppo | ppo | idql | residual_ppo | cmil")
    # optimisation
    actor_lr: float = _f(1e-4, "actor learning rate (AdamW)", range=">0")
    critic_lr: float = _f(1e-3, "critic learning rate (AdamW)", range=">0")
    weight_decay: float = _f(0.0, "AdamW weight decay of actor and critic", range=">=0", meaning="0 = no weight decay")
    lr_schedule: str = _f("constant", "constant | linear (anneal both learning rates to 0 over the run, CleanRL)")
    update_epochs: int = _f(10, "passes over the iteration's samples", range=">=1")
    batch_size: Optional[int] = _f(7500, "minibatch size (DPPO: (env step, denoising step) pairs; PPO: env steps); null = "
                                   "the published recipe's: residual_ppo the whole iteration in one minibatch (ResiP), "
                                   "dppo/ppo on FurnitureBench DPPO's value for the task and randomness", range=">=1",
                                   meaning="null = the published recipe's")
    max_grad_norm: Optional[float] = _f(None, "clip actor and critic gradient norms (None = off, DPPO)",
                                        range=">0", meaning="null = no clipping")
    target_kl: Optional[float] = _f(1.0, "stop the iteration's updates before a minibatch whose approx KL exceeds this (None = off)",
                                    range=">0", meaning="null = no early stop")
    n_critic_warmup_itr: int = _f(2, "first training iterations that update only the critic", range=">=0")
    # returns
    gamma: float = _f(0.999, "discount per action chunk", range="[0,1]")
    gae_lambda: float = _f(0.95, "GAE lambda", range="[0,1]")
    reward_scale_running: bool = _f(True, "divide rewards by a running std of the discounted return (DPPO, CleanRL)")
    reward_scale_const: float = _f(1.0, "constant reward multiplier applied after the running scaling",
                                   range=">0", meaning="0 would erase every reward")
    reward_clip: float = _f(10.0, "clip of the running-scaled rewards", range=">0")
    norm_adv: bool = _f(True, "normalize advantages per minibatch")
    # PPO loss
    clip_coef: float = _f(0.01, "PPO ratio clip (DPPO: at the last denoising step)", range=">0")
    clip_coef_base: float = _f(0.001, "DPPO: ratio clip at the first fine-tuned denoising step", range=">0")
    clip_rate: float = _f(3.0, "DPPO: exponential rate of the clip schedule over denoising steps (0 = linear)",
                          range=">=0", meaning="0 = linear")
    clip_vloss: Optional[float] = _f(None, "value-loss clipping around the old values (None = off, DPPO; CleanRL 0.2)",
                                     range=">0", meaning="null = no value clipping")
    vf_coef: float = _f(0.5, "value-loss weight",
                        range=">=0", meaning="a negative weight trains the critic away from the returns")
    ent_coef: float = _f(0.0, "entropy bonus weight (Gaussian only)", range=">=0")
    logprob_min: float = _f(-5.0, "DPPO clamp of per-step mean log-probs (lower)")
    logprob_max: float = _f(2.0, "DPPO clamp of per-step mean log-probs (upper)")
    # critic
    critic_dims: List[int] = _f(factory=lambda: [256, 256, 256], help="critic hidden widths (residual Mish MLP, DPPO CriticObs)",
                                range=">=1", meaning="layer widths")
    # diffusion (DPPO)
    ft_denoising_steps: int = _f(10, "DPPO: last K' sampling steps fine-tuned (a trainable copy of the denoiser; 0 = all)",
                                 range=">=0", meaning="0 = every sampling step")
    gamma_denoising: float = _f(0.99, "DPPO: advantage discount per denoising step before the last", range="[0,1]")
    min_sampling_denoising_std: float = _f(0.1, "DPPO: std floor of every stochastic sampling step", range=">=0")
    min_logprob_denoising_std: float = _f(0.1, "DPPO: std floor inside log-probs (> 0)",
                                          range=">0", meaning="a std floor; log-probabilities need it > 0")
    randn_clip_value: float = _f(3.0, "DPPO: clip of the per-step Gaussian noise", range=">0")
    use_ddim: Optional[bool] = _f(None, "sample with DDIM (None = as pretrained)")
    ddim_steps: Optional[int] = _f(None, "DDIM steps when use_ddim (None = as pretrained)",
                                   range=">=1", meaning="null = as pretrained")
    ddim_eta: float = _f(1.0, "DDIM: eta of the stochastic sampler while training, whatever the checkpoint was "
                         "pretrained with (DPPO: 1); evaluation is deterministic (eta 0)",
                         range="(0,1]", meaning="PPO needs a stochastic DDIM sampler (DPPO: 1)")
    # Gaussian (PPO)
    logprob_reduction: str = _f("mean", "PPO: mean (DPPO) | sum (CleanRL) of the chunk's per-element log-probs")
    init_std: Optional[float] = _f(None, "PPO: reset the policy std to this at the start (None = keep the checkpoint's)",
                                   range=">0", meaning="null = keep the checkpoint's std")
    std_min: Optional[float] = _f(None, "PPO: lower std bound (None = the checkpoint's)",
                                  range=">0", meaning="null = the checkpoint's")
    std_max: Optional[float] = _f(None, "PPO: upper std bound (None = the checkpoint's)",
                                  range=">0", meaning="null = the checkpoint's")
    obs_norm: bool = _f(False, "PPO from scratch: running mean/std observation normalization (CleanRL)")
    mlp_dims: List[int] = _f(factory=lambda: [64, 64], help="PPO from scratch: actor hidden widths",
                             range=">=1", meaning="layer widths")
    activation: str = _f("tanh", "PPO from scratch: actor activation")
    horizon_steps: int = _f(1, "PPO from scratch: actions per chunk", range=">=1")
    act_steps: int = _f(1, "PPO from scratch: actions executed per chunk", range=">=1")
    # IDQL (off-policy, dpft/rl/idql.py; DPPO's ft_idql_diffusion_mlp.yaml). Also used: actor_lr, critic_lr,
    # batch_size, gamma, critic_dims, n_critic_warmup_itr (actor warm-up), reward_scale_const, max_grad_norm,
    # ft_denoising_steps (0 = every sampling step, DPPO's whole-chain actor), min_sampling_denoising_std.
    replay_size: int = _f(250000, "IDQL: replay capacity in chunk transitions (DPPO: buffer_size 5000 x 50 envs)",
                          range=">=1")
    replay_ratio: float = _f(128.0, "IDQL: gradient steps per iteration = new transitions x replay_ratio / batch_size",
                             range=">0")
    expectile: float = _f(0.8, "IDQL: expectile of the V loss (DPPO 0.8; IDQL paper 0.7)",
                          range="(0,1)", meaning="DPPO 0.8")
    selection: str = _f("expectile", "IDQL: training choice among candidates: argmax | expectile (DPPO) | softmax "
                        "(evaluation and dpft rollout: argmax)")
    selection_expectile: float = _f(0.7, "IDQL: weight of candidates with Q > V in the expectile rule (DPPO 0.7)",
                                    range="(0,1)", meaning="DPPO 0.7")
    temperature: float = _f(1.0, "IDQL: temperature of the softmax rule", range=">0")
    num_candidates: int = _f(10, "IDQL: action chunks sampled per observation (DPPO robomimic 10, gym 20)", range=">=1")
    critic_tau: float = _f(0.001, "IDQL: Polyak rate of the target Q per gradient step", range="[0,1]")
    v_lr: Optional[float] = _f(None, "IDQL: V learning rate (None = critic_lr)", range=">0", meaning="null = critic_lr")
    q_lr: Optional[float] = _f(None, "IDQL: Q learning rate (None = critic_lr)", range=">0", meaning="null = critic_lr")
    train_actor: bool = _f(True, "IDQL: train the actor on replay (DPPO); false = critics only (IDQL paper)")
    # residual PPO (ResiP; agents/residual_ppo.py, dpft/rl/residual.py). Also used: mlp_dims/activation (residual
    # MLP), std_min/std_max (bounds of a learnable std), use_ddim/ddim_steps (the base's sampler), critic_dims.
    residual_scale: float = _f(0.1, "residual PPO: env action = base + residual_scale * residual (normalized units)",
                               range=">0")
    residual_init_logstd: float = _f(-1.0, "residual PPO: initial log-std of the residual (ResiP -1)")
    residual_learn_std: bool = _f(False, "residual PPO: learn the log-std within log(std_min)..log(std_max) (ResiP: fixed)")
    residual_obs_clip: float = _f(3.0, "residual PPO: clamp of the normalized obs the residual and critic read",
                                  range=">0")
    residual_base_act_steps: Optional[int] = _f(None, "residual PPO: env steps between base re-plans (None = the checkpoint's act_steps)",
                                                range=">=1", meaning="null = the checkpoint's act_steps")


# ---------------------------------------------------------------------------------------------- IN-RIL / CAIR (H-inril)
@dataclass
class InrilConfig:
    """IN-RIL (interleaved IL/RL) and the gradient-alignment monitor; agents/inril.py, docs/inril.md."""

    m: str = _f("inf", "RL gradient steps per IL step (IDQL: actor gradient steps): an integer >= 1, inf (RL only, "
                "the baseline) or adaptive")
    separation: str = _f("none", "IL-step gradient rule: none | pcgrad | upgrad | network (agent=residual_ppo only)")
    m_min: int = _f(1, "adaptive m: lower clip of m(t)", range=">=1")
    m_max: int = _f(100, "adaptive m: upper clip of m(t)", range=">=1")
    m_init: int = _f(10, "adaptive m: m until both gradient estimators have 2 gradients", range=">=1")
    adaptive_c: float = _f(0.5, "adaptive m: c = alpha_RL * L_RL of the progress model, in [0, 2)",
                           range="[0,2)", meaning="alpha_RL * L_RL of the progress model")
    adaptive_rule: str = _f("paper", "adaptive m: paper (IN-RIL Appendix D: m (1-c/2)|g_RL|^2 = q rho |g_IL||g_RL| "
                            "+ (c/2) q^2 v_IL) | noise (dpft's earlier rule with the RL noise term; docs/inril.md 5.2)")
    ema_beta: float = _f(0.9, "EMA factor of the reference RL direction and the IL/RL gradient statistics",
                         range="[0,1)")
    dataset: Optional[str] = _f(None, "IL demos (robomimic HDF5; None = the checkpoint's pretraining dataset)")
    batch_size: int = _f(256, "IL batch size (demo windows)", range=">=1")
    il_lr: Optional[float] = _f(None, "learning rate of the IL steps' own AdamW (None = agent.actor_lr)",
                                range=">0", meaning="null = agent.actor_lr")
    il_lr_warmup: int = _f(10, "IL steps of linear learning-rate warm-up: IL step k (from 1) uses il_lr * min(1, "
                           "k / il_lr_warmup); 0 = none. A fresh AdamW's first steps are ~lr x sign(g) on every "
                           "parameter (BENCHMARKS.md: without it the first IL steps raise the held-out IL loss)",
                           range=">=0", meaning="IL steps of linear lr warm-up; 0 = none")
    monitor_every: int = _f(10, "alignment monitor: IL gradient (not applied) vs the RL gradient every this many RL "
                            "updates (0 = off)", range=">=0", meaning="0 = monitor off")
    heldout_max_windows: int = _f(2048, "held-out IL loss at each evaluation: at most this many held-out windows",
                                  range=">=1")


@dataclass
class CairConfig:
    """CAIR: each RL update uses (1 - lambda) L_IL + lambda L_RL, the two gradients combined by CAGrad."""

    enabled: bool = _f(False, "CAIR on (also `cair=true` on the command line)")
    start: float = _f(0.5, "initial lambda (RL weight)", range="[0,1]")
    rate: float = _f(0.01, "lambda change per update per unit cosine", range=">=0")
    monotone: bool = _f(False, "lambda only rises (the variant with CAIR's monotonic-improvement guarantee)")
    c: float = _f(0.4, "CAGrad ball radius c (0 = the plain convex combination)",
                  range=">=0", meaning="CAGrad's ball radius; 0 = the plain convex combination")
    mode: str = _f("linear", "lambda rule: linear (rate * cos) | sign (rate * sign(cos))")
    lam_min: float = _f(0.0, "lower bound of lambda", range="[0,1]")
    lam_max: float = _f(1.0, "upper bound of lambda", range="[0,1]")


@dataclass
class FurnitureOptions:
    """FurnitureBench settings of ``dpft finetune`` (``furniture.<key>=``), written into the run's ``env_args``."""

    max_env_steps: Optional[int] = _f(None, "the fork's max_env_steps: lamp holds its bulbs at rest until an env "
                                      "passes half of it (None = the episode length, DPPO; ResiP 100000000)",
                                      range=">=1", meaning="null = the episode length")
    truncate_at_chunk_end: bool = _f(False, "check the time limit after the action chunk, as DPPO's wrapper does "
                                     "(one_leg: 88 chunks of 8 = 704 steps); false = at the exact step")


@dataclass
class FinetuneConfig:
    """``dpft finetune``: fine-tune a checkpoint with RL (or train a Gaussian policy from scratch)."""

    checkpoint: Optional[str] = _f(None, "pretrained run or checkpoint directory (omit with env= to train from scratch)")
    env: Optional[str] = _f(None, "task for from-scratch training (hopper, walker2d, halfcheetah, lift, ...)")
    out: Optional[str] = _f(None, "run directory (required)")
    agent: AgentConfig = _f(factory=AgentConfig, help="agent hyperparameters (agent=dppo|ppo selects the defaults)")
    iterations: int = _f(50, "training iterations (budget)", range=">=1")
    envs: int = _f(10, "parallel environments", range=">=1")
    n_steps: Optional[int] = _f(75, "action chunks per env per iteration (DPPO's n_steps); null = one episode: "
                                "ceil(max_episode_steps / act_steps) of the env", range=">=1",
                                meaning="null = one episode")
    max_episode_steps: Optional[int] = _f(None, "episode length limit in env steps (None = the task's)",
                                          range=">=1", meaning=MAX_EPISODE_STEPS_MEANING)
    terminate_on_success: bool = _f(True, "robosuite: end an episode when the task succeeds (reward 1 at that step)")
    truncation_as_terminal: bool = _f(False, "treat a time-limit end as terminal: no bootstrap from V(final obs) "
                                      "(DPPO's furniture wrapper, ResiP truncation_as_done; default: bootstrap)")
    success_as_terminal: bool = _f(False, "with terminate_on_success=false: every step from the task's success on "
                                   "is terminal while the episode runs on (ResiP's sticky done; default: off)")
    obs_clip: Optional[float] = _f(None, "clamp the normalized low-dim observation to +-obs_clip before the policy and "
                                   "critic (DPPO furniture 5, ResiP 3; None = off); stored in the checkpoint's meta",
                                   range=">0", meaning="null = off")
    raw_obs_clip: Optional[float] = _f(None, "clamp the raw low-dim observation to +-raw_obs_clip before normalizing "
                                       "(ResiP furniture 3; None = off); stored in the checkpoint's meta",
                                       range=">0", meaning="null = off")
    furniture: FurnitureOptions = _f(factory=lambda: FurnitureOptions(), help="FurnitureBench env options (recorded in "
                                     "the run's env_args)")
    simulator: Optional[str] = _f(None, "FurnitureBench: isaacgym | fake (the CPU fake) instead of the checkpoint's "
                                  "env_args.env_kwargs.simulator (None = as recorded; the run records its choice)")
    backend: Optional[str] = _f(None, "robosuite tasks: mujoco (the fast batched backend) | robosuite (None = as "
                                "recorded in env_args.env_kwargs.backend, else the default; the run records its choice)")
    reset_at_iteration: bool = _f(True, "reset every env at the start of each iteration (exact resume; the cut is bootstrapped)")
    seed: int = _f(0, "random seed (initialization, sampling, env seeds)", range="[0,2147483647]")
    device: str = _f("cpu", "cpu | cuda | auto")
    num_threads: int = _f(0, "torch CPU threads (0 = leave torch's default)",
                          range=">=0", meaning="0 = torch's default")
    weights: str = _f("ema", "ema | model: which weights of the pretrained checkpoint to start from")
    eval_every: int = _f(10, "evaluate every this many iterations (0 = only at the end)",
                         range=">=0", meaning="0 = only at the end")
    eval_episodes: int = _f(20, "evaluation episodes (deterministic sampling)", range=">=1")
    eval_seed: int = _f(100000, "seed of the first evaluation episode (the same episodes every evaluation)",
                        range="[0,2147483647]")
    save_every: int = _f(10, "checkpoint every this many iterations (the final one is always written)", range=">=0")
    keep_checkpoints: int = _f(3, "newest checkpoints kept (0 = all)", range=">=0", meaning="0 = keep all")
    resume: bool = _f(False, "continue the run in out= from its newest checkpoint (exact on CPU)")
    overwrite: bool = _f(False, "delete an existing run in out= and start over")
    logger: str = _f("none", "none | wandb (metrics.jsonl and the PNG are always written)")
    wandb_project: str = _f("dpft", "wandb project")
    wandb_mode: str = _f("online", "wandb mode: online | offline | disabled")
    progress: bool = _f(True, "show a progress bar")
    inril: InrilConfig = _f(factory=InrilConfig, help="IN-RIL interleaving, separation and monitor (H-inril)")
    cair: CairConfig = _f(factory=CairConfig, help="CAIR adaptive IL/RL weighting (H-inril)")
    dataset: Optional[str] = _f(None, "agent=cmil only: robomimic HDF5 of pixel demos (the env comes from its env_args)")
    cmil: CmilConfig = _f(factory=CmilConfig, help="CMIL settings (agent=cmil; presets cmil_cpu, cmil_paper)")

    @staticmethod
    def rewrite_overrides(overrides: List[str]) -> List[str]:
        """(H-inril) ``cair=true`` / ``cair=false`` select cfg/cair/true.yaml / false.yaml: Hydra reads an unquoted
        true/false as a bool, which cannot name a config group option, so it is quoted here."""
        out = []
        for o in overrides:
            name, sep, value = o.partition("=")
            if sep and name.lstrip("+") == "cair" and value.strip().lower() in ("true", "false"):
                o = "%s='%s'" % (name, value.strip().lower())
            out.append(o)
        return out

    def validate(self) -> None:
        check_ranges(self)
        a = self.agent
        if not self.out:
            raise DpftError("out=FT_DIR is required: the run directory of the fine-tuning run.")
        if a.name == "cmil" or self.dataset:  # (H-cmil) its own checks (dataset=, no env=, cmil.*)
            from dpft.rl.cmil_config import validate_cmil

            validate_cmil(self)
            if self.logger not in LOGGERS:
                raise DpftError("logger=%r is not known; expected none or wandb." % (self.logger,))
            return
        if a.name not in AGENT_NAMES:
            raise DpftError("agent=%r is not known; expected one of %s." % (a.name, ", ".join(AGENT_NAMES)))
        if not self.checkpoint and not self.env:
            raise DpftError("Pass checkpoint=RUN_DIR (a pretrained run to fine-tune) or env=TASK (train a Gaussian "
                            "policy from scratch, agent=ppo).")
        if self.checkpoint and self.env:
            raise DpftError("Pass either checkpoint= or env=, not both: a fine-tuning run's env is rebuilt from "
                            "the checkpoint's env_args.")
        if self.env and a.name != "ppo":
            raise DpftError("env=%s trains from scratch, which only agent=ppo (a Gaussian policy) can do; "
                            "agent=%s needs checkpoint=RUN_DIR." % (self.env, a.name))
        if not list(a.critic_dims):
            raise DpftError("agent.critic_dims=[] lists no hidden layer; give the critic's hidden widths, e.g. "
                            "agent.critic_dims=[256,256,256] (the default).")
        if self.obs_clip is not None and a.obs_norm:
            raise DpftError("obs_clip=%s with agent.obs_norm=true: the clamp would act before the running "
                            "observation normalization, which the saved policy folds into its normalizer; use one "
                            "of them." % (self.obs_clip,))
        if a.batch_size is None and a.name == "idql":
            raise DpftError("agent.batch_size=null is derived for the on-policy agents only; agent=idql needs a "
                            "replay minibatch size (DPPO: 1000).")
        if a.name == "idql":
            from dpft.rl.idql import settings_from_agent_config

            settings_from_agent_config(a)  # IDQL's own range checks, naming agent.<key>
        if a.act_steps > a.horizon_steps:
            raise DpftError("agent.act_steps=%d must be <= agent.horizon_steps=%d." % (a.act_steps, a.horizon_steps))
        if a.logprob_reduction not in ("mean", "sum"):
            raise DpftError("agent.logprob_reduction=%r must be mean or sum." % (a.logprob_reduction,))
        if a.lr_schedule not in ("constant", "linear"):
            raise DpftError("agent.lr_schedule=%r must be constant or linear." % (a.lr_schedule,))
        if self.logger not in LOGGERS:
            raise DpftError("logger=%r is not known; expected none or wandb." % (self.logger,))
        if self.simulator is not None and self.simulator not in ("isaacgym", "fake"):
            raise DpftError("simulator=%r is not known; expected isaacgym or fake (FurnitureBench only)."
                            % (self.simulator,))
        if self.backend is not None and self.backend not in ("mujoco", "robosuite"):
            raise DpftError("backend=%r is not known; expected mujoco or robosuite (robosuite tasks only)."
                            % (self.backend,))
        if self.weights not in ("ema", "model"):
            raise DpftError("weights=%r is not known; expected ema or model." % (self.weights,))
        from dpft.agents.inril import validate_inril_config

        validate_inril_config(self)  # (H-inril)


#: settings that may differ when a run is resumed (budget and bookkeeping; everything else must match)
RESUME_MAY_CHANGE = ("iterations", "save_every", "eval_every", "keep_checkpoints", "device", "num_threads",
                     "logger", "wandb_project", "wandb_mode", "progress", "resume", "overwrite", "out", "checkpoint")

__all__ = ["AgentConfig", "FurnitureOptions", "InrilConfig", "CairConfig", "CmilConfig", "FinetuneConfig", "AGENT_NAMES", "RESUME_MAY_CHANGE"]
