"""Denoisers, encoders and the Gaussian policy, plus :func:`build_policy_model` (config -> model).

Policy config keys accepted by :func:`build_policy_model` (a missing key or ``None`` means the default):

=============================  ================  ===========================================================
key                            default           used by
=============================  ================  ===========================================================
name                           (required)        ``diffusion_mlp`` | ``diffusion_unet`` | ``gaussian_mlp``
cond_mlp_dims                  None              all: MLP on the flattened state history
image_feature_dim              64                all: features per camera per frame
random_shift_pad               4                 all: DrQ pad (0 disables image augmentation)
mlp_dims                       [512, 512, 512]   diffusion_mlp; gaussian_mlp default [256, 256, 256]
activation                     "mish"            diffusion_mlp, gaussian_mlp
layer_norm                     False             diffusion_mlp
residual_style                 True              diffusion_mlp
time_dim                       16                diffusion_mlp
diffusion_step_embed_dim       64                diffusion_unet
down_dims                      [64, 128]         diffusion_unet
kernel_size                    5                 diffusion_unet
n_groups                       8                 diffusion_unet
cond_predict_scale             True              diffusion_unet
denoising_steps                20                diffusion_*
use_ddim                       False             diffusion_*
ddim_steps                     None              diffusion_* (required with use_ddim)
ddim_eta                       1.0               diffusion_*
ft_denoising_steps             0                 diffusion_*
min_sampling_denoising_std     0.1               diffusion_*
min_logprob_denoising_std      0.1               diffusion_*
denoised_clip_value            1.0               diffusion_*
randn_clip_value               10.0              diffusion_*, gaussian_mlp
std_min                        0.01              gaussian_mlp
std_max                        1.0               gaussian_mlp
init_std                       0.1               gaussian_mlp
tanh_mean                      True              gaussian_mlp
=============================  ================  ===========================================================

Keys of another model type are ignored (a config schema may carry them all); unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Sequence

from torch import nn

from dpft.errors import DpftError
from dpft.models.diffusion_mlp import DiffusionMLP
from dpft.models.embeddings import SinusoidalPosEmb
from dpft.models.gaussian import GaussianModel
from dpft.models.mlp import MLP, ResidualMLP
from dpft.models.obs_encoder import ObsEncoder
from dpft.models.unet1d import ConditionalUnet1D
from dpft.models.vision import ConvEncoder, RandomShiftsAug, images_to_float

POLICY_NAMES = ("diffusion_mlp", "diffusion_unet", "gaussian_mlp")

_ENCODER_DEFAULTS: Dict[str, Any] = {"cond_mlp_dims": None, "image_feature_dim": 64, "random_shift_pad": 4}
_DIFFUSION_DEFAULTS: Dict[str, Any] = {
    "denoising_steps": 20,
    "use_ddim": False,
    "ddim_steps": None,
    "ddim_eta": 1.0,
    "ft_denoising_steps": 0,
    "min_sampling_denoising_std": 0.1,
    "min_logprob_denoising_std": 0.1,
    "denoised_clip_value": 1.0,
    "randn_clip_value": 10.0,
}
_MLP_DENOISER_DEFAULTS: Dict[str, Any] = {
    "mlp_dims": [512, 512, 512],
    "activation": "mish",
    "layer_norm": False,
    "residual_style": True,
    "time_dim": 16,
}
_UNET_DEFAULTS: Dict[str, Any] = {
    "diffusion_step_embed_dim": 64,
    "down_dims": [64, 128],
    "kernel_size": 5,
    "n_groups": 8,
    "cond_predict_scale": True,
}
_GAUSSIAN_DEFAULTS: Dict[str, Any] = {
    "mlp_dims": [256, 256, 256],
    "activation": "mish",
    "std_min": 0.01,
    "std_max": 1.0,
    "init_std": 0.1,
    "tanh_mean": True,
    "randn_clip_value": 10.0,
}
ACCEPTED_KEYS = frozenset(
    ["name"]
    + list(_ENCODER_DEFAULTS)
    + list(_DIFFUSION_DEFAULTS)
    + list(_MLP_DENOISER_DEFAULTS)
    + list(_UNET_DEFAULTS)
    + list(_GAUSSIAN_DEFAULTS)
)


def _plain(value: Any) -> Any:
    """OmegaConf ListConfig/tuples -> list, leave scalars alone."""
    if isinstance(value, (str, bytes)) or value is None:
        return value
    if isinstance(value, Sequence) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def _as_dict(policy_cfg: Any) -> Dict[str, Any]:
    if dataclasses.is_dataclass(policy_cfg) and not isinstance(policy_cfg, type):
        return {f.name: getattr(policy_cfg, f.name) for f in dataclasses.fields(policy_cfg)}
    if isinstance(policy_cfg, Mapping) or hasattr(policy_cfg, "items"):
        return {str(k): v for k, v in policy_cfg.items()}
    raise DpftError(
        "The policy config must be a mapping (or dataclass) with a 'name' key, got {}.".format(
            type(policy_cfg).__name__
        )
    )


def _pick(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, default in defaults.items():
        value = cfg.get(key)
        out[key] = default if value is None else _plain(value)
    return out


def build_policy_model(
    policy_cfg: Any,
    obs_shapes: Mapping[str, Sequence[int]],
    low_dim_dim: int,
    image_keys: Sequence[str],
    action_dim: int,
    horizon_steps: int,
    cond_steps: int,
) -> nn.Module:
    """Build a :class:`~dpft.diffusion.model.DiffusionModel` or :class:`GaussianModel` from a config mapping.

    Args:
        policy_cfg: mapping (dict, OmegaConf DictConfig, or dataclass) with ``name`` and the keys in this
            module's docstring.
        obs_shapes: shape of one observation per key; image keys map to ``(H, W, C)``.
        low_dim_dim: ``Do`` of ``obs["state"]``.
        image_keys: camera keys, in order.
        action_dim, horizon_steps, cond_steps: ``Da``, ``Ta``, ``To``.
    """
    cfg = _as_dict(policy_cfg)
    unknown = sorted(set(cfg) - ACCEPTED_KEYS)
    if unknown:
        raise DpftError(
            "Unknown policy config key(s) {}; accepted keys are: {}.".format(unknown, ", ".join(sorted(ACCEPTED_KEYS)))
        )
    name = cfg.get("name")
    if name not in POLICY_NAMES:
        raise DpftError(
            "Unknown policy name {!r}: expected one of {}.".format(name, ", ".join(POLICY_NAMES))
        )
    enc = _pick(cfg, _ENCODER_DEFAULTS)
    obs_encoder = ObsEncoder(
        obs_shapes,
        low_dim_dim,
        cond_steps,
        list(image_keys),
        image_feature_dim=int(enc["image_feature_dim"]),
        cond_mlp_dims=enc["cond_mlp_dims"],
        random_shift_pad=int(enc["random_shift_pad"]),
    )
    if name == "gaussian_mlp":
        g = _pick(cfg, _GAUSSIAN_DEFAULTS)
        return GaussianModel(
            obs_encoder,
            action_dim,
            horizon_steps=horizon_steps,
            mlp_dims=g["mlp_dims"],
            std_min=float(g["std_min"]),
            std_max=float(g["std_max"]),
            init_std=float(g["init_std"]),
            tanh_mean=bool(g["tanh_mean"]),
            activation=str(g["activation"]),
            randn_clip_value=float(g["randn_clip_value"]),
        )
    if name == "diffusion_mlp":
        m = _pick(cfg, _MLP_DENOISER_DEFAULTS)
        network: nn.Module = DiffusionMLP(
            action_dim,
            horizon_steps,
            obs_encoder.cond_dim,
            time_dim=int(m["time_dim"]),
            mlp_dims=m["mlp_dims"],
            residual_style=bool(m["residual_style"]),
            layer_norm=bool(m["layer_norm"]),
            activation=str(m["activation"]),
        )
    else:
        u = _pick(cfg, _UNET_DEFAULTS)
        network = ConditionalUnet1D(
            action_dim,
            obs_encoder.cond_dim,
            diffusion_step_embed_dim=int(u["diffusion_step_embed_dim"]),
            down_dims=u["down_dims"],
            kernel_size=int(u["kernel_size"]),
            n_groups=int(u["n_groups"]),
            cond_predict_scale=bool(u["cond_predict_scale"]),
            horizon_steps=horizon_steps,
        )
    from dpft.diffusion.model import DiffusionModel  # lazy: dpft.diffusion imports nothing from here

    d = _pick(cfg, _DIFFUSION_DEFAULTS)
    return DiffusionModel(
        network,
        obs_encoder,
        horizon_steps,
        action_dim,
        denoising_steps=int(d["denoising_steps"]),
        use_ddim=bool(d["use_ddim"]),
        ddim_steps=None if d["ddim_steps"] is None else int(d["ddim_steps"]),
        ft_denoising_steps=int(d["ft_denoising_steps"]),
        min_sampling_denoising_std=float(d["min_sampling_denoising_std"]),
        min_logprob_denoising_std=float(d["min_logprob_denoising_std"]),
        randn_clip_value=float(d["randn_clip_value"]),
        denoised_clip_value=float(d["denoised_clip_value"]),
        ddim_eta=float(d["ddim_eta"]),
    )


__all__ = [
    "ACCEPTED_KEYS",
    "POLICY_NAMES",
    "ConditionalUnet1D",
    "ConvEncoder",
    "DiffusionMLP",
    "GaussianModel",
    "MLP",
    "ObsEncoder",
    "RandomShiftsAug",
    "ResidualMLP",
    "SinusoidalPosEmb",
    "build_policy_model",
    "images_to_float",
]
