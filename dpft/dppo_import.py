"""``dpft import-dppo``: a DPPO-pretrained diffusion MLP checkpoint (+ its normalization .npz) as a dpft checkpoint.

DPPO (irom-princeton/dppo) saves ``torch.save({"epoch", "model", "ema"}, "state_<epoch>.pt")``; ``model`` and
``ema`` are state dicts of its ``DiffusionModel``, whose only weights are the ``DiffusionMLP`` ``network.*``:

* ``network.time_embedding.{1,3}.{weight,bias}``: SinusoidalPosEmb -> Linear(td, 2td) -> Mish -> Linear(2td, td);
* ``network.mlp_mean.layers.0`` (input Linear), ``network.mlp_mean.layers.<i>.{l1,l2}`` (pre-activation residual
  blocks, ``norm1``/``norm2`` with LayerNorm), ``network.mlp_mean.layers.<last>`` (output Linear) for
  ``residual_style=True``; ``network.mlp_mean.moduleList.<i>.linear_1`` (and ``norm_1``) for the plain MLP.

The file is read with ``torch.load(weights_only=True)`` only (never unpickling arbitrary objects). Its
normalization file holds ``obs_min``, ``obs_max``, ``action_min``, ``action_max``; DPPO's env wrappers map
``obs -> 2 ((obs - min) / (max - min + 1e-6) - 0.5)`` and ``action -> (a + 1) / 2 (max - min) + min``, which dpft's
min-max normalizer reproduces with the state maximum ``obs_max + 1e-6`` (to float rounding) and the action range as
is. The network is rebuilt as ``policy.mlp_arch=dppo`` (DPPO's layout), so epsilon predictions equal DPPO's.

Not supported (refused with a message): ``cond_mlp_dims`` (``network.cond_mlp``), image (``VisionDiffusionMLP``) and
UNet checkpoints.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dpft.errors import DpftError

#: DPPO's normalization-file keys
NORMALIZATION_KEYS = ("obs_min", "obs_max", "action_min", "action_max")
#: DPPO's obs-normalization epsilon (``(max - min + 1e-6)`` in its env wrappers)
DPPO_OBS_EPS = 1e-6


def load_dppo_state(path: str, weights: str = "ema") -> Dict[str, torch.Tensor]:
    """The ``network.*`` weights of a DPPO checkpoint's ``weights`` (``"ema"`` or ``"model"``) state dict."""
    if weights not in ("ema", "model"):
        raise DpftError("weights=%r must be ema or model." % (weights,))
    if not os.path.isfile(str(path)):
        raise DpftError("checkpoint='%s' does not exist; pass DPPO's state_<epoch>.pt file." % path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DpftError("'%s' cannot be read as a DPPO checkpoint with torch.load(weights_only=True) "
                        "(%s: %s). dpft never unpickles arbitrary objects; re-save the file with plain tensors."
                        % (path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")) from None
    if not isinstance(data, dict) or weights not in data or not isinstance(data[weights], dict):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DpftError("'%s' has no %r state dict (DPPO saves {'epoch', 'model', 'ema'}; it has %s)."
                        % (path, weights, have))
    state = {k: v for k, v in data[weights].items() if k.startswith("network.")}
    if not state:
        raise DpftError("the %r state dict of '%s' has no network.* weights." % (weights, path))
    return state


def load_dppo_normalization(path: str) -> Dict[str, np.ndarray]:
    """``obs_min``, ``obs_max``, ``action_min``, ``action_max`` (float64 1-D) from DPPO's normalization .npz."""
    if not os.path.isfile(str(path)):
        raise DpftError("normalization='%s' does not exist; pass DPPO's normalization.npz." % path)
    with np.load(str(path), allow_pickle=False) as f:
        missing = [k for k in NORMALIZATION_KEYS if k not in f.files]
        if missing:
            raise DpftError("'%s' lacks %s (it has %s)." % (path, ", ".join(missing), ", ".join(f.files)))
        return {k: np.asarray(f[k], dtype=np.float64).reshape(-1) for k in NORMALIZATION_KEYS}


def _shape(state: Dict[str, torch.Tensor], key: str, path: str) -> Tuple[int, ...]:
    if key not in state:
        raise DpftError("'%s' has no weight %s; is it a DPPO DiffusionMLP checkpoint?" % (path, key))
    return tuple(state[key].shape)


def dppo_to_dpft_state(state: Dict[str, torch.Tensor], path: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor],
                                                                                         Dict[str, Any]]:
    """DPPO ``network.*`` weights -> (dpft ``DiffusionModel`` state dict, architecture facts).

    Facts: ``time_dim``, ``in_dim``, ``out_dim``, ``mlp_dims``, ``residual_style``, ``layer_norm``."""
    if any(k.startswith("network.cond_mlp.") for k in state):
        raise DpftError("'%s' has a cond_mlp (DPPO's cond_mlp_dims, e.g. its furniture configs); dpft's "
                        "observation MLP is another network, so this checkpoint cannot be imported." % path)
    if any(k.startswith(("network.backbone.", "network.compress")) for k in state) or not any(
            k.startswith("network.mlp_mean.") for k in state):
        raise DpftError("'%s' is not a low-dim DiffusionMLP checkpoint (image and UNet networks are "
                        "not supported)." % path)
    out = {}  # type: Dict[str, torch.Tensor]
    t_out, t_in = _shape(state, "network.time_embedding.1.weight", path)
    time_dim = int(t_in)
    for i in (1, 3):
        for p in ("weight", "bias"):
            out["network.time_mlp.%d.%s" % (i, p)] = state["network.time_embedding.%d.%s" % (i, p)]
    residual = "network.mlp_mean.layers.0.weight" in state
    layer_norm = False
    if residual:
        idx = sorted({int(m.group(1)) for m in (re.match(r"network\.mlp_mean\.layers\.(\d+)\.", k) for k in state) if m})
        last = idx[-1]
        if state["network.mlp_mean.layers.%d.weight" % last].dim() != 2:  # use_layernorm_final: an extra LayerNorm
            raise DpftError("'%s' ends its ResidualMLP with a LayerNorm (use_layernorm_final), which "
                            "dpft's layout does not have." % path)
        hidden, in_dim = _shape(state, "network.mlp_mean.layers.0.weight", path)
        out_dim = _shape(state, "network.mlp_mean.layers.%d.weight" % last, path)[0]
        for p in ("weight", "bias"):
            out["network.mlp.input_layer.%s" % p] = state["network.mlp_mean.layers.0.%s" % p]
            out["network.mlp.output_layer.%s" % p] = state["network.mlp_mean.layers.%d.%s" % (last, p)]
        blocks = [i for i in idx if 0 < i < last]
        for b, i in enumerate(blocks):
            for src, dst in (("l1", "linear1"), ("l2", "linear2"), ("norm1", "norm1"), ("norm2", "norm2")):
                for p in ("weight", "bias"):
                    key = "network.mlp_mean.layers.%d.%s.%s" % (i, src, p)
                    if key in state:
                        out["network.mlp.blocks.%d.%s.%s" % (b, dst, p)] = state[key]
                        layer_norm = layer_norm or src.startswith("norm")
        mlp_dims = [int(hidden)] * (1 + 2 * len(blocks))
    else:
        idx = sorted({int(m.group(1)) for m in (re.match(r"network\.mlp_mean\.moduleList\.(\d+)\.", k) for k in state)
                      if m})
        dims = []  # type: List[int]
        j = 0
        for i in idx:
            w = state["network.mlp_mean.moduleList.%d.linear_1.weight" % i]
            dims.append(int(w.shape[0]))
            for p in ("weight", "bias"):
                out["network.mlp.layers.%d.%s" % (j, p)] = state["network.mlp_mean.moduleList.%d.linear_1.%s" % (i, p)]
            j += 1
            if "network.mlp_mean.moduleList.%d.norm_1.weight" % i in state:
                layer_norm = True
                for p in ("weight", "bias"):
                    out["network.mlp.layers.%d.%s" % (j, p)] = state["network.mlp_mean.moduleList.%d.norm_1.%s" % (i, p)]
                j += 1
            if i != idx[-1]:
                j += 1  # the activation module
        in_dim = int(state["network.mlp_mean.moduleList.%d.linear_1.weight" % idx[0]].shape[1])
        out_dim = dims[-1]
        mlp_dims = dims[:-1]
    facts = {"time_dim": time_dim, "in_dim": int(in_dim), "out_dim": int(out_dim), "mlp_dims": mlp_dims,
             "residual_style": residual, "layer_norm": layer_norm}
    return out, facts


def import_dppo_checkpoint(checkpoint: str, normalization: str, out: str, denoising_steps: int = 20,
                           activation: str = "relu", act_steps: Optional[int] = None, env_args: Any = None,
                           obs_key: str = "obs", weights: str = "ema", overwrite: bool = False) -> str:
    """Write the dpft run ``out`` (one checkpoint, EMA and model weights both the DPPO ``weights`` state dict) from a
    DPPO checkpoint and its normalization file; returns the checkpoint directory.

    Args:
        checkpoint: DPPO's ``state_<epoch>.pt``.
        normalization: DPPO's ``normalization.npz`` of the same task.
        out: new dpft run directory (refused when it holds a run, unless ``overwrite``).
        denoising_steps: DPPO's ``denoising_steps`` of the run (20 in its gym and robomimic configs; not stored in
            the checkpoint).
        activation: DPPO's ``activation_type`` (``relu`` in its gym configs, ``mish`` = its class default used by
            its robomimic configs).
        act_steps: executed actions per chunk (default: the whole horizon).
        env_args: the env to roll out in: a dict, or a gym task name (``hopper``...) or robosuite one (``lift``).
        obs_key: the name of the flat low-dim observation (DPPO's ``state``; gym files here call it ``obs``).
        weights: ``ema`` (DPPO evaluates its EMA) or ``model``.
    """
    from dpft.checkpoint import save_checkpoint
    from dpft.models import build_policy_model, policy_spec
    from dpft.normalization import MinMaxNormalizer
    from dpft.rundir import open_run_dir

    state = load_dppo_state(checkpoint, weights)
    norm = load_dppo_normalization(normalization)
    mapped, facts = dppo_to_dpft_state(state, str(checkpoint))
    obs_dim, action_dim = int(norm["obs_min"].size), int(norm["action_min"].size)
    if facts["out_dim"] % action_dim:
        raise DpftError("the network outputs %d numbers, not a multiple of the normalization file's %d "
                        "action dims; are the two files from the same task?" % (facts["out_dim"], action_dim))
    horizon = facts["out_dim"] // action_dim
    cond_dim = facts["in_dim"] - facts["out_dim"] - facts["time_dim"]
    if cond_dim <= 0 or cond_dim % obs_dim:
        raise DpftError("the network's condition has %d inputs, not a multiple of the normalization "
                        "file's %d observation dims; are the two files from the same task?" % (cond_dim, obs_dim))
    cond_steps = cond_dim // obs_dim
    act = int(act_steps) if act_steps else horizon
    if not 1 <= act <= horizon:
        raise DpftError("act_steps=%s must be between 1 and the checkpoint's horizon %d." % (act_steps,
                                                                                                       horizon))
    if isinstance(env_args, str):
        from dpft.envs.registry import env_args_for_task

        env_args = env_args_for_task(env_args)
    spec = policy_spec({"name": "diffusion_mlp", "mlp_arch": "dppo", "activation": str(activation).lower(),
                        "mlp_dims": facts["mlp_dims"], "residual_style": facts["residual_style"],
                        "layer_norm": facts["layer_norm"], "time_dim": facts["time_dim"],
                        "denoising_steps": int(denoising_steps)})
    obs_shapes = {obs_key: [obs_dim]}
    model = build_policy_model(spec, obs_shapes, obs_dim, [], action_dim, horizon, cond_steps)
    want = model.state_dict()
    missing = sorted(set(want) - set(mapped))
    unexpected = sorted(set(mapped) - set(want))
    if missing or unexpected:
        raise DpftError("the weights of '%s' do not fit DPPO's DiffusionMLP layout as dpft rebuilds it "
                        "(missing %s; unexpected %s)." % (checkpoint, missing[:5], unexpected[:5]))
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise DpftError("weight %s has shape %s in '%s', dpft expects %s." % (
                k, tuple(v.shape), checkpoint, tuple(want[k].shape)))
    model.load_state_dict(mapped)
    normalizer = MinMaxNormalizer({"state": (norm["obs_min"], norm["obs_max"] + DPPO_OBS_EPS),
                                   "action": (norm["action_min"], norm["action_max"])})
    meta = {"policy": "diffusion_mlp", "policy_type": "diffusion", "policy_kind": "diffusion", "policy_spec": spec,
            "obs_keys": [obs_key], "low_dim_keys": [obs_key], "image_keys": [], "obs_shapes": obs_shapes,
            "obs_dim": obs_dim, "state_slices": {obs_key: [0, obs_dim]}, "action_dim": action_dim,
            "horizon_steps": horizon, "cond_steps": cond_steps, "act_steps": act,
            "denoising_steps": int(denoising_steps), "env_args": env_args,
            "imported_from": {"dppo_checkpoint": os.path.abspath(str(checkpoint)), "weights": weights,
                              "normalization": os.path.abspath(str(normalization)), "activation": activation}}
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with open_run_dir(out, "pretrain", resume=False, overwrite=bool(overwrite)) as run:
        return save_checkpoint(run.path, 0, sd, sd, normalizer, meta, "# imported from DPPO: %s\n" % checkpoint)


__all__ = ["import_dppo_checkpoint", "load_dppo_state", "load_dppo_normalization", "dppo_to_dpft_state"]
