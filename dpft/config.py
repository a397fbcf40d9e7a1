"""Typed config schemas and Hydra composition.

Every command's config is a dataclass here (the schema) and YAML under ``cfg/`` (the defaults users read
and compose). :func:`compose` builds the config from ``cfg/<command>.yaml`` plus Hydra overrides, merges
it into the schema (unknown keys and wrong types are errors) and runs the schema's ``validate``.

Dataclasses use ``typing.Optional``/``List`` because OmegaConf evaluates annotations and dpft must run on
Python 3.8 beside Isaac Gym.
"""
from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from dpft.errors import DpftError
from dpft.ranges import _f, check_ranges as _check_field_ranges, range_text as _range_text  # noqa: F401

#: what an unset max_episode_steps means (every command that has the option: demos, rollout, finetune)
MAX_EPISODE_STEPS_MEANING = "leave it unset, or pass max_episode_steps=null, for the task's own limit"
ROBOMIMIC_LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
POLICY_NAMES = ("diffusion_mlp", "diffusion_unet", "gaussian_mlp")
# The one table of policy defaults is PolicyConfig below (dpft.models.build_policy_model reads it too); the only
# default that depends on the policy name is the MLP width:
DEFAULT_MLP_DIMS = {"diffusion_mlp": [512, 512, 512], "gaussian_mlp": [256, 256, 256]}


@dataclass
class PolicyConfig:
    """Policy network and (for diffusion) the noise schedule. Fields not used by ``name`` are ignored."""

    name: str = _f("diffusion_mlp", "diffusion_mlp | diffusion_unet | gaussian_mlp")
    # diffusion
    denoising_steps: int = _f(20, "diffusion steps K the denoiser is trained with", range=">=1")
    use_ddim: bool = _f(False, "sample with DDIM instead of DDPM")
    ddim_steps: Optional[int] = _f(None, "DDIM sampling steps (required when use_ddim)", range=">=1")
    ddim_eta: float = _f(1.0, "DDIM eta for stochastic sampling (1 = DDPM-like noise, as DPPO); deterministic uses 0",
                         range="[0,1]", meaning='0 = deterministic DDIM, 1 = DDPM-like noise')
    ft_denoising_steps: int = _f(0, "last K' sampling steps served by a trainable copy (RL fine-tuning; 0 = none)",
                                 range=">=0", meaning='0 = no fine-tuned copy')
    min_sampling_denoising_std: float = _f(0.1, "floor on the per-step std when sampling stochastically", range=">=0")
    min_logprob_denoising_std: float = _f(0.1, "floor on the per-step std in log-probabilities (RL; > 0)",
                                          range=">0", meaning='a std floor; log-probabilities need it > 0')
    randn_clip_value: float = _f(10.0, "clip on the Gaussian noise drawn while sampling", range=">0")
    eval_randn_clip_value: Optional[float] = _f(None, "clip on the noise of deterministic sampling (null = "
                                                "randn_clip_value; RL fine-tuning keeps its start checkpoint's)",
                                                range=">0", meaning="null = randn_clip_value")
    denoised_clip_value: Optional[float] = _f(1.0, "clip on the predicted x0 (null = no clip)", range=">0")
    # MLP denoiser / Gaussian MLP
    mlp_dims: Optional[List[int]] = _f(None, "hidden layer widths of the MLP (null = [512,512,512] for diffusion_mlp, "
                                             "[256,256,256] for gaussian_mlp)", range=">=1", meaning='layer widths')
    residual_style: bool = _f(True, "residual MLP blocks (DPPO style)")
    layer_norm: bool = _f(False, "LayerNorm in the MLP blocks")
    activation: str = _f("mish", "mish | relu | gelu | elu | silu")
    mlp_arch: str = _f("dpft", "diffusion_mlp layout: dpft | dppo (DPPO's DiffusionMLP exactly: no activation before "
                       "the output layer, Mish in the time MLP, LayerNorm eps 1e-6; policy=diffusion_mlp_dppo)")
    time_dim: int = _f(16, "sinusoidal diffusion-time embedding size (MLP denoiser)", range=">=1")
    cond_mlp_dims: Optional[List[int]] = _f(None, "optional MLP on the flattened observation before the denoiser",
                                            range=">=1", meaning='layer widths')
    # UNet denoiser
    down_dims: List[int] = _f(help="UNet channel widths per level", factory=lambda: [64, 128],
                              range=">=1", meaning='channel widths')
    kernel_size: int = _f(5, "UNet conv kernel size", range=">=1")
    n_groups: int = _f(8, "UNet GroupNorm groups", range=">=1")
    diffusion_step_embed_dim: int = _f(64, "UNet time embedding size", range=">=1")
    cond_predict_scale: bool = _f(True, "UNet FiLM predicts scale and bias (else bias only)")
    # pixels
    image_feature_dim: int = _f(64, "feature size of each camera's CNN encoder", range=">=1")
    random_shift_pad: int = _f(4, "random-shift augmentation padding in pixels (0 = off)",
                               range=">=0", meaning='0 = no augmentation')
    # Gaussian
    std_min: float = _f(0.01, "lower bound of the Gaussian policy std (normalized action units)", range=">0")
    std_max: float = _f(1.0, "upper bound of the Gaussian policy std", range=">0")
    init_std: float = _f(0.1, "initial Gaussian policy std", range=">0")
    tanh_mean: bool = _f(True, "tanh-bound the Gaussian mean to [-1, 1]")

    def validate(self) -> None:
        if self.name not in POLICY_NAMES:
            raise DpftError(f"policy.name={self.name!r} is not a known policy; expected one of {', '.join(POLICY_NAMES)}.")
        if self.denoising_steps < 1:
            raise DpftError(f"policy.denoising_steps={self.denoising_steps} must be >= 1.")
        if self.use_ddim and (self.ddim_steps is None or not 1 <= self.ddim_steps <= self.denoising_steps):
            raise DpftError(
                f"policy.use_ddim=true needs policy.ddim_steps between 1 and policy.denoising_steps "
                f"({self.denoising_steps}); got ddim_steps={self.ddim_steps}."
            )
        if not 0 < self.std_min <= self.init_std <= self.std_max:
            raise DpftError(
                f"Gaussian policy stds must satisfy 0 < std_min <= init_std <= std_max; got std_min={self.std_min}, "
                f"init_std={self.init_std}, std_max={self.std_max}."
            )


@dataclass
class DataConfig:
    """How the HDF5 file is split into train and validation demos."""

    train_filter_key: Optional[str] = _f("train", "mask/<key> listing training demos (used when present)")
    valid_filter_key: Optional[str] = _f("valid", "mask/<key> listing validation demos (used when present)")
    valid_ratio: float = _f(0.1, "fraction of demos held out when the file has no filter keys (seeded split)",
                            range="[0,1)")


@dataclass
class PretrainConfig:
    """``dpft pretrain``: behaviour cloning of a diffusion or Gaussian policy on a robomimic HDF5 file."""

    dataset: Optional[str] = _f(None, "robomimic-format HDF5 file (required)")
    out: Optional[str] = _f(None, "run directory: config, metrics, checkpoints (required)")
    policy: PolicyConfig = _f(help="policy settings (choose with policy=diffusion_mlp|diffusion_unet|gaussian_mlp)",
                              factory=PolicyConfig)
    data: DataConfig = _f(help="train/valid split", factory=DataConfig)
    obs_keys: List[str] = _f(help="observation keys, low-dim ones concatenated in this order; *_image keys are cameras",
                             factory=lambda: list(ROBOMIMIC_LOW_DIM_KEYS))
    horizon_steps: int = _f(4, "actions predicted per chunk (1 = no chunking)", range=">=1")
    cond_steps: int = _f(1, "observations in the history window", range=">=1")
    act_steps: int = _f(4, "actions of a chunk executed before re-planning (<= horizon_steps)", range=">=1")
    steps: int = _f(20000, "total optimizer steps", range=">=1")
    batch_size: int = _f(256, "global batch size (split evenly across DDP ranks)", range=">=1")
    lr: float = _f(1e-4, "peak learning rate (AdamW)", range=">0")
    weight_decay: float = _f(1e-6, "AdamW weight decay", range=">=0", meaning='0 = no weight decay')
    warmup_steps: int = _f(500, "linear warm-up steps before the cosine decay", range=">=0", meaning='0 = no warm-up')
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr",
                             range="[0,1]", meaning='the final learning rate as a fraction of lr')
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)", range=">=0", meaning='0 turns clipping off')
    ema_decay: float = _f(0.999, "EMA decay (warm-up: min(ema_decay, (1+step)/(10+step))); 0 = no EMA",
                          range="[0,1)", meaning='0 = no EMA')
    save_every: int = _f(2000, "checkpoint period in steps (a final checkpoint is always written)", range=">=1")
    val_every: int = _f(1000, "validation-loss period in steps (0 = off)",
                        range=">=0", meaning='0 turns validation off')
    log_every: int = _f(50, "metrics period in steps", range=">=1")
    keep_checkpoints: int = _f(3, "newest checkpoints kept (0 = keep all)", range=">=0", meaning='0 = keep all')
    seed: int = _f(0, "random seed (data order, noise, initialization)", range="[0,2147483647]")
    device: str = _f("auto", "cpu | cuda | cuda:N | auto")
    num_threads: Optional[int] = _f(None, "torch CPU threads (default: torch's choice)",
                                    range=">=1", meaning="unset = torch's choice")
    resume: bool = _f(False, "continue from the newest checkpoint in `out`")
    overwrite: bool = _f(False, "delete the dpft run already in `out` and start over (never a non-dpft directory)")
    logger: str = _f("none", "none | wandb (metrics.jsonl and loss_curve.png are always written)")
    wandb_project: str = _f("dpft", "wandb project")
    wandb_mode: str = _f("online", "online | offline | disabled")
    progress: bool = _f(True, "show a progress bar")

    def validate(self) -> None:
        check_ranges(self)  # every numeric setting against the range its field declares
        if not self.dataset:
            raise DpftError("dataset=FILE.hdf5 is required: the robomimic-format HDF5 file to train on.")
        if not self.out:
            raise DpftError("out=RUN_DIR is required: the directory for checkpoints and metrics.")
        self.policy.validate()
        if self.policy.ft_denoising_steps != 0:  # (H-model) pretraining trains the base denoiser only
            raise DpftError(
                f"policy.ft_denoising_steps={self.policy.ft_denoising_steps}: pretraining trains the base denoiser, "
                "and a fine-tuned copy of the last K' steps would freeze it. Pretrain with "
                "policy.ft_denoising_steps=0 and set K' when fine-tuning (dpft finetune ... agent.ft_denoising_steps=K')."
            )
        for name in ("horizon_steps", "cond_steps", "act_steps", "steps", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise DpftError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.act_steps > self.horizon_steps:
            raise DpftError(f"act_steps={self.act_steps} cannot exceed horizon_steps={self.horizon_steps}.")
        if self.val_every < 0:
            raise DpftError(f"val_every={self.val_every} must be >= 0 (0 turns validation off).")
        if not self.obs_keys:
            raise DpftError("obs_keys is empty: name at least one observation key of the dataset.")
        if self.logger not in ("none", "wandb"):
            raise DpftError(f"logger={self.logger!r} is not known; expected none or wandb.")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise DpftError(f"wandb_mode={self.wandb_mode!r} is not known; expected online, offline or disabled.")
        if not 0.0 <= self.data.valid_ratio < 1.0:
            raise DpftError(f"data.valid_ratio={self.data.valid_ratio} must be in [0, 1).")
        if self.lr <= 0:
            raise DpftError(f"lr={self.lr} must be > 0.")


@dataclass
class DemosConfig:
    """``dpft demos``: scripted-expert demonstrations in robosuite, or (``policy=RUN_DIR``) recorded rollouts of a
    checkpoint in its robosuite or gym env, written as robomimic HDF5."""

    task: Optional[str] = _f(None, "scripted expert: lift (default) | can | square; with policy=: optional, must match "
                                   "the checkpoint's env (hopper, lift, ...)")
    num: int = _f(50, "successful demonstrations to write", range=">=1")
    out: Optional[str] = _f(None, "output HDF5 file (required)")
    overwrite: bool = _f(False, "replace an existing out= file (it stays until the new one is complete)")
    seed: int = _f(0, "episode i uses seed + i", range="[0,2147483647]")
    noise: float = _f(0.0, "imperfection level: 0 = clean expert, 0.3-1.0 = human-like noisy demos; with policy=: "
                           "std of Gaussian action noise in normalized action units", range=">=0", meaning='0 = clean')
    image_obs: bool = _f(False, "also record camera images (<camera>_image, uint8)")
    camera_size: int = _f(84, "camera image height and width", range="[8,4096]", meaning='pixels')
    keep_failures: bool = _f(False, "keep failed episodes too")
    valid_ratio: float = _f(0.1, "fraction of demos listed in mask/valid", range="[0,1)")
    progress: bool = _f(True, "show a progress bar")
    # recording a checkpoint (policy=RUN_DIR; dpft.envs.record.record_demos)
    policy: Optional[str] = _f(None, "record rollouts of this run/checkpoint directory instead of a scripted expert")
    envs: int = _f(1, "policy=: parallel environments", range=">=1")
    deterministic: bool = _f(True, "policy=: deterministic sampling (Gaussian mean, DDIM eta 0 / DDPM min std)")
    min_return: Optional[float] = _f(None, "policy=: drop episodes whose return is below this")
    max_episode_steps: Optional[int] = _f(None, "episode limit (null = the task's)", range=">=1",
                                          meaning=MAX_EPISODE_STEPS_MEANING)
    weights: str = _f("ema", "policy=: ema | model weights of the checkpoint")
    device: str = _f("cpu", "policy=: cpu | cuda | auto (policy inference device)")

    def validate(self) -> None:
        check_ranges(self)  # every numeric setting against the range its field declares
        if not self.out:
            raise DpftError("out=FILE.hdf5 is required: where to write the demonstrations.")
        if self.envs < 1:
            raise DpftError(f"envs={self.envs} must be >= 1.")
        if self.num < 1:
            raise DpftError(f"num={self.num} must be >= 1.")
        if self.noise < 0:
            raise DpftError(f"noise={self.noise} must be >= 0.")


@dataclass
class RolloutConfig:
    """``dpft rollout``: run a checkpoint in its environment, score it and render videos."""

    checkpoint: Optional[str] = _f(None, "run directory or checkpoint directory (required)")
    episodes: int = _f(10, "episodes to run (episode i uses seed + i)", range=">=1")
    envs: int = _f(0, "parallel environments (0 = min(episodes, CPU cores))", range=">=0", meaning='0 = automatic')
    seed: int = _f(100000, "seed of the first episode (default away from the demo seeds)", range="[0,2147483647]")
    video: bool = _f(False, "write MP4 videos")
    videos: int = _f(4, "how many episodes to record when video=true (0 = all)",
                     range=">=0", meaning='0 = all episodes')
    out: Optional[str] = _f(None, "output directory (default: RUN_DIR/rollout/step_XXXXXXXX of the evaluated checkpoint)")
    overwrite: bool = _f(False, "replace the result.json and videos of an earlier rollout in out=")
    weights: str = _f("ema", "ema | model: which weights of the checkpoint to run")
    deterministic: bool = _f(True, "deterministic sampling (DDIM eta 0 / DDPM min std / Gaussian mean)")
    device: str = _f("cpu", "cpu | cuda | auto (policy inference device)")
    max_episode_steps: Optional[int] = _f(None, "override the task's episode length",
                                          range=">=1", meaning=MAX_EPISODE_STEPS_MEANING)
    num_threads: Optional[int] = _f(None, "torch CPU threads of the policy (unset = torch's choice; a fine-tuning "
                                    "run's evaluation is reproduced with its num_threads)", range=">=1",
                                    meaning="unset = torch's choice")
    terminate_on_success: bool = _f(True, "end an episode when the task succeeds")
    video_size: int = _f(256, "video frame size (square)", range="[16,4096]", meaning='pixels')
    camera: Optional[str] = _f(None, "camera to render (default agentview)")
    verify: bool = _f(True, "check the checkpoint's sha256 checksums (false = --no-verify: load damaged files anyway)")
    progress: bool = _f(True, "show a progress bar")

    def validate(self) -> None:
        check_ranges(self)  # every numeric setting against the range its field declares
        if not self.checkpoint:
            raise DpftError("checkpoint=RUN_DIR is required: a run directory or checkpoint directory to roll out.")
        if self.episodes < 1:
            raise DpftError(f"episodes={self.episodes} must be >= 1.")
        if self.envs < 0:
            raise DpftError(f"envs={self.envs} must be >= 0 (0 = automatic).")
        if self.weights not in ("ema", "model"):
            raise DpftError(f"weights={self.weights!r} is not known; expected ema or model.")


SCHEMAS: Dict[str, type] = {"pretrain": PretrainConfig, "demos": DemosConfig, "rollout": RolloutConfig}


def config_dir() -> str:
    """Absolute path of the packaged ``cfg/`` directory."""
    import dpft.cfg as _cfg  # the cfg/ folder is installed as the package dpft.cfg

    paths = list(getattr(_cfg, "__path__", []))
    if not paths:
        raise DpftError("dpft's config directory (cfg/) is missing from the installation; reinstall dpft.")
    return os.path.abspath(paths[0])


def compose(command: str, overrides: Optional[List[str]] = None, schema: Optional[type] = None,
            validate: bool = True):
    """Compose ``cfg/<command>.yaml`` with Hydra ``overrides`` and validate it against its schema.

    Returns an OmegaConf ``DictConfig`` typed by the schema (attribute access, struct mode: unknown keys
    raise). Raises :class:`DpftError` naming the offending override on any problem.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = schema or SCHEMAS[command]
    overrides = list(overrides or [])
    if hasattr(schema, "rewrite_overrides"):  # (H-inril) a schema's own spellings, e.g. finetune's cair=true
        overrides = schema.rewrite_overrides(overrides)
    overrides = quote_string_overrides(overrides, schema)
    _register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            raw = hydra_compose(config_name=command, overrides=overrides)
    except Exception as e:  # hydra raises several exception types for bad overrides
        raise DpftError(f"Bad option for `dpft {command}`: {_hydra_message(e)} "
                        f"Run `dpft {command} --help` for the options.") from None
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(raw, resolve=True))
    except OmegaConfBaseException as e:
        raise DpftError(f"Bad option for `dpft {command}`: {_omegaconf_message(e)} "
                        f"Run `dpft {command} --help` for the options.") from None
    OmegaConf.set_struct(cfg, True)
    if validate:
        to_object(cfg).validate()
    return cfg


def _register_schemas() -> None:
    """Put every schema in Hydra's ConfigStore as ``<command>_schema`` so that ``cfg/<command>.yaml`` lists it
    first in its defaults: every schema key is then overridable and the YAML only states what it changes."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)


def to_object(cfg):
    """The config as a plain schema dataclass instance (for validation and typed access)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)


def to_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg)


def from_yaml_text(text: str, schema: type, source: str = "config"):
    """Parse a saved config (e.g. a checkpoint's config.yaml) into the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        loaded = OmegaConf.create(text)
        cfg = OmegaConf.merge(OmegaConf.structured(schema), loaded)
    except OmegaConfBaseException as e:
        raise DpftError(f"{source} does not match dpft's {schema.__name__} schema: {_omegaconf_message(e)}") from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def _omegaconf_message(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    if key and key not in msg:
        msg = f"{msg} (key: {key})"
    return msg


def _hydra_message(e: Exception) -> str:
    text = str(e).strip()
    lines = []
    for ln in text.splitlines():
        if ln.strip().startswith("Config search path"):
            break
        if ln.strip():
            lines.append(ln)
    avail = [k for k, ln in enumerate(lines) if "Available options" in ln]
    if avail:  # a config group's option list, one per line: keep all of it
        k = avail[0]
        msg = " ".join(ln.strip() for ln in lines[:k + 1]) + " " + ", ".join(ln.strip() for ln in lines[k + 1:]) + "."
    else:
        msg = " ".join(ln.strip() for ln in lines[:12]) if lines else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        detail = _omegaconf_message(cause)
        if detail not in msg:
            msg = f"{msg}: {detail}"
    if "token recognition error" in msg or "mismatched input" in msg or "no viable alternative" in msg:
        msg += (" (a value with spaces, commas, brackets, braces, '=', '~' or non-ASCII characters must be quoted: "
                "key='value', in a shell \"key='value'\"; string options such as dataset=, out= and checkpoint= are "
                "quoted automatically)")
    if "Could not override" in msg or "not in struct" in msg:
        msg += " (unknown config key; dotted keys such as policy.denoising_steps reach nested options)"
    return msg


def describe_schema(schema: type, prefix: str = "", defaults: Optional[Any] = None) -> List[str]:
    """Lines ``key = default  # help`` for every field of a schema dataclass (recursing into sections)."""
    lines: List[str] = []
    for f in fields(schema):
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            value = f.default
        if is_dataclass(value):
            lines.extend(describe_schema(type(value), prefix + f.name + ".", value))
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("range") is not None:
            help_text += " [%s]" % _range_text(*f.metadata["range"])
        lines.append(f"  {prefix + f.name:<36} {value!r:<24} {help_text}")
    return lines


# ---------------------------------------------------------------------------------------------- ranges
def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check every field of a schema instance (and its sub-sections) against the range it declares
    (:func:`dpft.ranges.check_ranges`, ``_f(..., range=...)``), then the policy settings that constrain each other;
    raises a DpftError naming the key (dotted), the value and the allowed range."""
    _check_field_ranges(obj, prefix)
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, PolicyConfig):
            _check_policy_relations(value, prefix + f.name + ".")
    if isinstance(obj, PolicyConfig):
        _check_policy_relations(obj, prefix)


def _check_policy_relations(p: Any, prefix: str) -> None:
    """Policy settings that constrain each other (only for the policy that uses them)."""
    try:
        from dpft.models.mlp import _ACTIVATIONS
    except ImportError:  # configs are composed and validated without torch too (tools/check_py38.sh)
        _ACTIVATIONS = None
    if _ACTIVATIONS is not None and str(p.activation).lower() not in _ACTIVATIONS:
        raise DpftError(f"{prefix}activation={p.activation!r} is not known; expected one of "
                        f"{', '.join(sorted(_ACTIVATIONS))}.")
    if p.name == "gaussian_mlp":
        return
    sampling = p.ddim_steps if (p.use_ddim and p.ddim_steps) else p.denoising_steps
    if isinstance(p.ft_denoising_steps, int) and isinstance(sampling, int) and p.ft_denoising_steps > sampling:
        raise DpftError(f"{prefix}ft_denoising_steps={p.ft_denoising_steps} must be <= the sampling "
                        f"steps ({'ddim_steps' if p.use_ddim else 'denoising_steps'}={sampling}).")
    if p.name == "diffusion_unet":
        if p.kernel_size % 2 == 0:
            raise DpftError(f"{prefix}kernel_size={p.kernel_size} must be odd (same-length convolutions).")
        bad = [d for d in p.down_dims if p.n_groups and d % p.n_groups]
        if bad:
            raise DpftError(f"{prefix}n_groups={p.n_groups} must divide every entry of {prefix}down_dims "
                            f"(GroupNorm); {bad} are not multiples of it.")


# ---------------------------------------------------------------------------------------------- quoting
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./@:+\-]*$")
_OVERRIDE = re.compile(r"^(\+{0,2}|~)([A-Za-z_][\w.]*)=(.*)$", re.S)


def _string_fields(schema: type, prefix: str = "") -> List[str]:
    import typing

    out: List[str] = []
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        t = hints.get(f.name)
        if is_dataclass(t):
            out.extend(_string_fields(t, prefix + f.name + "."))
        elif t is str or t == Optional[str]:
            out.append(prefix + f.name)
    return out


def _hydra_quote(value: str) -> str:
    """``value`` as a single-quoted Hydra string: quotes escaped, backslashes before a quote or at the end doubled."""
    out = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + out.replace("'", "\\'") + "'"


def quote_string_overrides(overrides: List[str], schema: type) -> List[str]:
    """Quote the value of ``key=value`` overrides of string options (``dataset=``, ``out=``, ``checkpoint=``, ...)
    when it holds characters Hydra's override grammar does not accept unquoted (non-ASCII letters, spaces, commas,
    brackets, braces, ``=``, ``~``, quotes), so such paths work as typed. Values already quoted, ``null`` and values
    with ``${`` (an interpolation) are passed through."""
    keys = set(_string_fields(schema))
    out = []
    for o in overrides:
        m = _OVERRIDE.match(o)
        if m and m.group(2) in keys:
            value = m.group(3)
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
            if value and not quoted and value != "null" and "${" not in value and not _SAFE_VALUE.match(value):
                o = "%s%s=%s" % (m.group(1), m.group(2), _hydra_quote(value))
        out.append(o)
    return out


# ``dpft finetune`` (RL) keeps its schema beside the RL code; registered here so compose("finetune") and
# `dpft finetune --help` find it like the other commands.
from dpft.rl.config import FinetuneConfig  # noqa: E402

SCHEMAS["finetune"] = FinetuneConfig
