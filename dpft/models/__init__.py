"""Denoisers, encoders and the Gaussian policy, plus :func:`build_policy_model` (config -> model).

:func:`build_policy_model` takes a policy config: a :class:`dpft.config.PolicyConfig`, or any mapping with
``name`` and some of its keys. The defaults are those of ``PolicyConfig`` (the one table; a key missing
from a mapping takes its default there) except ``mlp_dims``, whose default depends on the policy
(``dpft.config.DEFAULT_MLP_DIMS``: ``[512, 512, 512]`` for ``diffusion_mlp``, ``[256, 256, 256]`` for
``gaussian_mlp``). ``None`` means "the default" for every key except the ones where ``None`` is a setting:
``ddim_steps``, ``cond_mlp_dims`` (no MLP) and ``denoised_clip_value`` (no x0 clip).

Keys by policy (keys of another model type are ignored; unknown keys are errors):

- all: ``name``, ``cond_mlp_dims``, ``image_feature_dim``, ``random_shift_pad``;
- ``diffusion_*``: ``denoising_steps``, ``use_ddim``, ``ddim_steps``, ``ddim_eta``, ``ft_denoising_steps``,
  ``min_sampling_denoising_std``, ``min_logprob_denoising_std``, ``denoised_clip_value``, ``randn_clip_value``;
- ``diffusion_mlp``: ``mlp_dims``, ``activation``, ``layer_norm``, ``residual_style``, ``time_dim``;
- ``diffusion_unet``: ``diffusion_step_embed_dim``, ``down_dims``, ``kernel_size``, ``n_groups``,
  ``cond_predict_scale``;
- ``gaussian_mlp``: ``mlp_dims``, ``activation``, ``std_min``, ``std_max``, ``init_std``, ``tanh_mean``,
  ``randn_clip_value``.

:func:`policy_spec` returns the resolved keys of one policy (every default filled in): it is stored in a
checkpoint's ``meta.json`` as ``model_spec`` so :func:`dpft.load_policy` rebuilds the model from the
metadata alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Sequence

from torch import nn

from dpft.config import DEFAULT_MLP_DIMS, POLICY_NAMES, PolicyConfig
from dpft.errors import DpftError
from dpft.models.diffusion_mlp import DiffusionMLP
from dpft.models.embeddings import SinusoidalPosEmb
from dpft.models.gaussian import GaussianModel
from dpft.models.mlp import MLP, ResidualMLP
from dpft.models.obs_encoder import ObsEncoder
from dpft.models.unet1d import ConditionalUnet1D
from dpft.models.vision import ConvEncoder, RandomShiftsAug, images_to_float


def _field_default(f: "dataclasses.Field") -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


DEFAULTS: Dict[str, Any] = {f.name: _field_default(f) for f in dataclasses.fields(PolicyConfig)}
_ENCODER_KEYS = ("cond_mlp_dims", "image_feature_dim", "random_shift_pad")
_DIFFUSION_KEYS = ("denoising_steps", "use_ddim", "ddim_steps", "ddim_eta", "ft_denoising_steps",
                   "min_sampling_denoising_std", "min_logprob_denoising_std", "denoised_clip_value",
                   "randn_clip_value", "eval_randn_clip_value")
_KEYS_BY_NAME: Dict[str, Sequence[str]] = {
    "diffusion_mlp": _ENCODER_KEYS + _DIFFUSION_KEYS + ("mlp_dims", "activation", "layer_norm", "residual_style",
                                                        "time_dim", "mlp_arch"),
    "diffusion_unet": _ENCODER_KEYS + _DIFFUSION_KEYS + ("diffusion_step_embed_dim", "down_dims", "kernel_size",
                                                         "n_groups", "cond_predict_scale"),
    "gaussian_mlp": _ENCODER_KEYS + ("mlp_dims", "activation", "std_min", "std_max", "init_std", "tanh_mean",
                                     "randn_clip_value"),
}
_NULLABLE = frozenset(["ddim_steps", "cond_mlp_dims", "denoised_clip_value", "eval_randn_clip_value"])
ACCEPTED_KEYS = frozenset(DEFAULTS)


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


def policy_spec(policy_cfg: Any) -> Dict[str, Any]:
    """The resolved policy config: ``name`` plus every key its model uses, defaults filled in (plain Python
    values, JSON-ready). Building from the result gives the same model as building from ``policy_cfg``."""
    cfg = _as_dict(policy_cfg)
    unknown = sorted(set(cfg) - ACCEPTED_KEYS)
    if unknown:
        raise DpftError(
            "Unknown policy config key(s) {}; accepted keys are: {}.".format(unknown, ", ".join(sorted(ACCEPTED_KEYS)))
        )
    name = cfg.get("name")
    if name not in POLICY_NAMES:
        raise DpftError("Unknown policy name {!r}: expected one of {}.".format(name, ", ".join(POLICY_NAMES)))
    out = {"name": str(name)}  # type: Dict[str, Any]
    for key in _KEYS_BY_NAME[name]:
        if key in cfg and (cfg[key] is not None or key in _NULLABLE):
            out[key] = _plain(cfg[key])
        elif key == "mlp_dims":
            out[key] = list(DEFAULT_MLP_DIMS[name])
        else:
            out[key] = _plain(DEFAULTS[key])
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
    spec = policy_spec(policy_cfg)
    name = spec["name"]
    obs_encoder = ObsEncoder(
        obs_shapes,
        low_dim_dim,
        cond_steps,
        list(image_keys),
        image_feature_dim=int(spec["image_feature_dim"]),
        cond_mlp_dims=spec["cond_mlp_dims"],
        random_shift_pad=int(spec["random_shift_pad"]),
    )
    if name == "gaussian_mlp":
        return GaussianModel(
            obs_encoder,
            action_dim,
            horizon_steps=horizon_steps,
            mlp_dims=spec["mlp_dims"],
            std_min=float(spec["std_min"]),
            std_max=float(spec["std_max"]),
            init_std=float(spec["init_std"]),
            tanh_mean=bool(spec["tanh_mean"]),
            activation=str(spec["activation"]),
            randn_clip_value=float(spec["randn_clip_value"]),
        )
    if name == "diffusion_mlp":
        network: nn.Module = DiffusionMLP(
            action_dim,
            horizon_steps,
            obs_encoder.cond_dim,
            time_dim=int(spec["time_dim"]),
            mlp_dims=spec["mlp_dims"],
            residual_style=bool(spec["residual_style"]),
            layer_norm=bool(spec["layer_norm"]),
            activation=str(spec["activation"]),
            arch=str(spec["mlp_arch"]),
        )
    else:
        network = ConditionalUnet1D(
            action_dim,
            obs_encoder.cond_dim,
            diffusion_step_embed_dim=int(spec["diffusion_step_embed_dim"]),
            down_dims=spec["down_dims"],
            kernel_size=int(spec["kernel_size"]),
            n_groups=int(spec["n_groups"]),
            cond_predict_scale=bool(spec["cond_predict_scale"]),
            horizon_steps=horizon_steps,
        )
    from dpft.diffusion.model import DiffusionModel  # lazy: dpft.diffusion imports nothing from here

    clip = spec["denoised_clip_value"]
    return DiffusionModel(
        network,
        obs_encoder,
        horizon_steps,
        action_dim,
        denoising_steps=int(spec["denoising_steps"]),
        use_ddim=bool(spec["use_ddim"]),
        ddim_steps=None if spec["ddim_steps"] is None else int(spec["ddim_steps"]),
        ft_denoising_steps=int(spec["ft_denoising_steps"]),
        min_sampling_denoising_std=float(spec["min_sampling_denoising_std"]),
        min_logprob_denoising_std=float(spec["min_logprob_denoising_std"]),
        randn_clip_value=float(spec["randn_clip_value"]),
        eval_randn_clip_value=None if spec["eval_randn_clip_value"] is None else float(spec["eval_randn_clip_value"]),
        denoised_clip_value=None if clip is None else float(clip),
        ddim_eta=float(spec["ddim_eta"]),
    )


__all__ = [
    "ACCEPTED_KEYS",
    "DEFAULTS",
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
    "policy_spec",
    "images_to_float",
]
