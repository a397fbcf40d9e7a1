"""Policy: a trained model with its normalizer and metadata, acting on raw observations.

    policy = dpft.load_policy("runs/can")                 # EMA weights of the newest checkpoint
    actions = policy.act(obs)                             # np.ndarray (B, act_steps, Da), unnormalized

``obs`` is a dict of raw arrays keyed by the checkpoint's observation keys (``policy.meta["obs_keys"]``),
each ``(B, To, *shape)`` (``To = cond_steps``, the current observation last), or ``(B, *shape)`` when
``cond_steps == 1``; low-dim shapes are ``(d,)``, images uint8 ``(H, W, C)`` as robomimic stores them.
Extra keys are ignored. A policy without cameras also takes the concatenated low-dim vector directly:
``(B, To, Do)`` (or ``(B, Do)`` when ``cond_steps == 1``).

Processing: low-dim keys are concatenated in ``meta["low_dim_keys"]`` order and min-max normalized with
the checkpoint's statistics (``"state"``; clamped to ``+-meta["raw_obs_clip"]`` before and ``+-meta["obs_clip"]``
after normalizing when the meta sets them, as ``dpft finetune obs_clip=/raw_obs_clip=`` does), images stay uint8, the model samples a normalized chunk
``(B, Ta, Da)`` under ``torch.no_grad`` (the model's train/eval mode is left as it is; :func:`load_policy`
builds it in eval mode), and ``"action"`` is unnormalized. :meth:`Policy.act` returns the first
``act_steps`` actions, :meth:`Policy.predict_chunk` all ``horizon_steps``. Non-finite low-dim observations
and an empty batch are refused with a :class:`~dpft.errors.DpftError` naming the key.

``deterministic=True`` (the default, what evaluation and ``dpft rollout`` use): a Gaussian policy returns
its mean; DDIM runs with eta = 0 (no noise after the initial ``x_K``); DDPM floors every step's std at 1e-3
and adds no noise at the last step (DPPO's evaluation mode). A diffusion policy still draws its initial
noise ``x_K``, so pass ``generator=`` or ``seed=`` for repeatable actions. A fine-tuned DPPO checkpoint
acts as DPPO evaluates it: the frozen base for the early steps, the fine-tuned copy for the last ``K'``.

Loading (:func:`load_policy`) builds the model from the checkpoint's metadata alone: ``meta["policy_kind"]``
(``"diffusion"``/``"gaussian"``, or a kind registered with :func:`register_policy_kind`, such as
``"residual"``) and ``meta["policy_spec"]`` (:func:`dpft.models.policy_spec`, including
``ft_denoising_steps`` and the DDIM settings). Checkpoints written before ``policy_spec`` existed are rebuilt
from their ``config.yaml``. Every policy object has ``meta``, ``act(obs, deterministic=True, generator=None)``
and ``reset(rows=None)``: the rollout calls ``reset(rows)`` for the env rows whose episode starts. A policy
with ``stateful = True`` (per-episode state, e.g. residual PPO's base-chunk cache) is always given all env
rows by the rollout, so row ``i`` is env ``i``; :class:`Policy` is stateless and ``reset`` does nothing.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.normalization import MinMaxNormalizer
from dpft.train_utils import resolve_device as _resolve_device

WEIGHTS = ("ema", "model")
_REQUIRED_META = ("obs_keys", "low_dim_keys", "image_keys", "obs_shapes", "obs_dim", "action_dim",
                  "horizon_steps", "cond_steps", "act_steps")

ObsLike = Union[Mapping[str, Any], np.ndarray, torch.Tensor]


def _as_array(x: Any, key: str) -> Union[np.ndarray, torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        arr = np.ascontiguousarray(x)
    except Exception:  # ragged lists and odd objects
        raise DpftError("Observation '%s' cannot be turned into an array (got %s)." % (key, type(x).__name__)) from None
    if arr.dtype.kind not in "biuf":  # strings, objects, complex: not an observation whatever their shape
        raise DpftError("Observation '%s' must hold numbers (an array of floats, ints or bools); got %s %r."
                        % (key, type(x).__name__, x if arr.size <= 4 else arr.dtype))
    return arr


class Policy:
    """Normalizer + model + metadata. Build with :func:`load_policy`.

    Attributes:
        model: the ``DiffusionModel`` / ``GaussianModel`` (eval mode, on ``device``).
        normalizer: the checkpoint's :class:`~dpft.normalization.MinMaxNormalizer`.
        meta: the checkpoint's meta.json (obs keys/shapes, ``action_dim``, horizons, ``env_args``, ...).
        weights: ``"ema"`` or ``"model"`` (the weights actually loaded).
        checkpoint_dir: the checkpoint it came from (None when built in memory).
        config: the run's config (DictConfig) when loaded from a checkpoint.
    """

    def __init__(self, model: nn.Module, normalizer: MinMaxNormalizer, meta: Mapping[str, Any],
                 weights: str = "ema", checkpoint_dir: Optional[str] = None, config: Any = None,
                 device: Union[str, torch.device] = "cpu"):
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise DpftError("Policy metadata%s lacks %s; the checkpoint's meta.json was not written by dpft "
                            "pretrain." % ((" of " + checkpoint_dir) if checkpoint_dir else "", missing))
        self.meta = dict(meta)
        self.normalizer = normalizer
        self.weights = weights
        self.checkpoint_dir = checkpoint_dir
        self.config = config
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.obs_keys = [str(k) for k in self.meta["obs_keys"]]
        self.low_dim_keys = [str(k) for k in self.meta["low_dim_keys"]]
        self.image_keys = [str(k) for k in self.meta["image_keys"]]
        self.obs_shapes = {str(k): tuple(int(s) for s in v) for k, v in self.meta["obs_shapes"].items()}
        self.obs_dim = int(self.meta["obs_dim"])
        self.action_dim = int(self.meta["action_dim"])
        self.horizon_steps = int(self.meta["horizon_steps"])
        self.cond_steps = int(self.meta["cond_steps"])
        self.act_steps = int(self.meta["act_steps"])
        clips = {k: self.meta.get(k) for k in ("obs_clip", "raw_obs_clip")}
        for key, value in clips.items():
            if value is not None and not float(value) > 0:
                raise DpftError("Policy metadata%s has %s=%r; expected a positive number or null (no clamp)."
                                % ((" of " + checkpoint_dir) if checkpoint_dir else "", key, value))
        #: clamp of the normalized low-dim state (meta ``obs_clip``) and of the raw one (``raw_obs_clip``); None = off
        self.obs_clip = None if clips["obs_clip"] is None else float(clips["obs_clip"])
        self.raw_obs_clip = None if clips["raw_obs_clip"] is None else float(clips["raw_obs_clip"])

    # ------------------------------------------------------------------ observations
    def _check_batch(self, b: Optional[int], key: str, arr_b: int) -> int:
        if arr_b == 0:
            raise DpftError("The observation batch is empty (B = 0, key '%s'); pass at least one observation." % key)
        if b is not None and arr_b != b:
            raise DpftError("Observation '%s' has batch size %d but earlier keys have %d; all keys need the same "
                            "batch size B." % (key, arr_b, b))
        return arr_b

    def _history(self, x: Union[np.ndarray, torch.Tensor], key: str,
                 shape: Tuple[int, ...]) -> Union[np.ndarray, torch.Tensor]:
        """``(B, To, *shape)`` from ``(B, To, *shape)`` or (cond_steps == 1) ``(B, *shape)``."""
        to = self.cond_steps
        got = tuple(x.shape)
        alts = [shape]
        if shape == (1,):
            alts.append(())  # a 1-D dataset per step may come without its trailing axis
        for s in alts:
            if len(got) == 2 + len(s) and got[1] == to and got[2:] == s:
                return x.reshape(got[:2] + shape)
            if to == 1 and len(got) == 1 + len(s) and got[1:] == s:
                return x.reshape((got[0], 1) + shape)
        allowed = "(B, %d, %s)" % (to, ", ".join(str(s) for s in shape))
        if to == 1:
            allowed += " or (B, %s)" % ", ".join(str(s) for s in shape)
        raise DpftError("Observation '%s' has shape %s; expected %s (B = batch, cond_steps = %d observations, "
                        "current one last)." % (key, got, allowed, to))

    def normalize_obs(self, obs: ObsLike) -> Dict[str, torch.Tensor]:
        """Raw observations -> the model's input dict on the policy's device.

        Returns ``{"state": float32 (B, To, Do) normalized, <image key>: uint8 (B, To, H, W, C)}``
        (``"state"`` absent when the policy has no low-dim keys).
        """
        to = self.cond_steps
        out = {}  # type: Dict[str, torch.Tensor]
        if not isinstance(obs, Mapping):
            if self.image_keys:
                raise DpftError("This policy observes cameras %s, so obs must be a dict keyed by %s, not a bare "
                                "array." % (self.image_keys, self.obs_keys))
            state = self._history(_as_array(obs, "state"), "state", (self.obs_dim,))
            out["state"] = self._state_tensor(state)
            return out
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise DpftError("Observation key(s) %s missing: the policy needs %s and got %s."
                            % (missing, self.obs_keys, sorted(str(k) for k in obs)))
        b = None  # type: Optional[int]
        parts = []
        for key in self.low_dim_keys:
            shape = self.obs_shapes[key]
            x = self._history(_as_array(obs[key], key), key, shape)
            b = self._check_batch(b, key, int(x.shape[0]))
            x = x.reshape(x.shape[0], to, -1)
            parts.append(torch.as_tensor(x) if isinstance(x, np.ndarray) else x)
        if parts:  # keys may arrive as a mix of numpy arrays and (CUDA) tensors: one device, one dtype
            state = torch.cat([p.to(self.device, torch.float32) for p in parts], dim=-1)
            out["state"] = self._state_tensor(state, self.low_dim_keys, [int(p.shape[-1]) for p in parts])
        for key in self.image_keys:
            shape = self.obs_shapes[key]
            x = self._history(_as_array(obs[key], key), key, shape)
            b = self._check_batch(b, key, int(x.shape[0]))
            t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
            if t.dtype != torch.uint8:
                raise DpftError("Image observation '%s' has dtype %s; expected uint8 (H, W, C) = %s as robomimic "
                                "stores them." % (key, str(t.dtype).replace("torch.", ""), shape))
            out[key] = t.to(self.device)
        return out

    def _state_tensor(self, state: Union[np.ndarray, torch.Tensor], keys: Optional[Sequence[str]] = None,
                      widths: Optional[Sequence[int]] = None) -> torch.Tensor:
        t = torch.as_tensor(state) if isinstance(state, np.ndarray) else state
        t = t.to(device=self.device, dtype=torch.float32)
        if t.shape[0] == 0:
            raise DpftError("The observation batch is empty (B = 0); pass at least one observation.")
        if not bool(torch.isfinite(t).all()):
            keys = list(keys) if keys is not None else ["state"]
            widths = list(widths) if widths is not None else [t.shape[-1]]
            bad, start = [], 0
            for key, w in zip(keys, widths):
                part = t[..., start:start + w]
                start += w
                if not bool(torch.isfinite(part).all()):
                    rows = torch.nonzero(~torch.isfinite(part).reshape(part.shape[0], -1).all(dim=1)).reshape(-1)
                    bad.append("'%s' (batch rows %s)" % (key, rows[:5].tolist()))
            raise DpftError("Observation %s contains NaN or Inf; the policy needs finite observations (an env that "
                            "returns them should cut the episode)." % ", ".join(bad))
        if self.obs_dim > 0:
            if self.raw_obs_clip is not None:  # ResiP's furniture wrapper: raw obs clamped to +-3
                t = t.clamp(-self.raw_obs_clip, self.raw_obs_clip)
            t = self.normalizer.normalize("state", t)
            if self.obs_clip is not None:  # DPPO's furniture wrapper: normalized obs clamped to +-5 (ResiP 3)
                t = t.clamp(-self.obs_clip, self.obs_clip)
        return t

    # ------------------------------------------------------------------ acting
    stateful = False  # no per-episode state: reset() is a no-op and any batch of rows may be passed

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        """Episodes start for env ``rows`` (all when None). Stateless policy: nothing to do."""

    @staticmethod
    def _generator(generator: Optional[torch.Generator], seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return generator
        if generator is not None:
            raise DpftError("Pass either generator= or seed= to act/predict_chunk, not both.")
        return torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def predict_chunk(self, obs: ObsLike, deterministic: bool = True, generator: Optional[torch.Generator] = None,
                      seed: Optional[int] = None) -> np.ndarray:
        """The whole predicted chunk, unnormalized: ``np.ndarray float32 (B, horizon_steps, Da)``.

        ``generator`` (a ``torch.Generator``, advanced by the call) or ``seed`` (a fresh generator seeded with
        it: the same call gives the same actions) drives the sampling noise; see the module docstring for
        what ``deterministic`` means.
        """
        generator = self._generator(generator, seed)
        model_obs = self.normalize_obs(obs)
        actions = self.model.sample(model_obs, deterministic=deterministic, generator=generator)[0]
        # the training data spans [-1, 1] after normalization; a stochastic Gaussian sample may step outside it
        # (kept unclipped inside the model so RL log-probs stay exact), but the env only gets in-range actions
        actions = self.normalizer.unnormalize("action", actions.clamp(-1.0, 1.0))
        return actions.detach().to("cpu", torch.float32).numpy()

    def act(self, obs: ObsLike, deterministic: bool = True, generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None) -> np.ndarray:
        """Actions to execute: the first ``act_steps`` of the chunk, ``np.ndarray float32 (B, act_steps, Da)``.

        ``deterministic``, ``generator`` and ``seed`` as in :meth:`predict_chunk`.
        """
        return self.predict_chunk(obs, deterministic, generator, seed)[:, : self.act_steps]

    def describe(self) -> Dict[str, Any]:
        """What is being evaluated (for rollout result files): weights, checkpoint, step, policy, horizons."""
        return {
            "weights": self.weights,
            "checkpoint": self.checkpoint_dir,
            "step": self.meta.get("step"),
            "policy": self.meta.get("policy"),
            "horizon_steps": self.horizon_steps,
            "act_steps": self.act_steps,
            "cond_steps": self.cond_steps,
            "obs_keys": list(self.obs_keys),
        }

    def __repr__(self) -> str:
        return ("Policy(%s, weights=%s, step=%s, obs_keys=%s, action_dim=%d, horizon_steps=%d, act_steps=%d, "
                "cond_steps=%d, device=%s)" % (self.meta.get("policy"), self.weights, self.meta.get("step"),
                                               self.obs_keys, self.action_dim, self.horizon_steps, self.act_steps,
                                               self.cond_steps, self.device))


def build_model_from_meta(config: Any, meta: Mapping[str, Any]) -> nn.Module:
    """Rebuild the (untrained) policy model of a run from its config and meta.json.

    The global torch RNG is left untouched (initialization runs inside ``torch.random.fork_rng``).
    """
    from dpft.models import build_policy_model

    with torch.random.fork_rng(devices=[]):
        return build_policy_model(config.policy, meta["obs_shapes"], int(meta["obs_dim"]), list(meta["image_keys"]),
                                  int(meta["action_dim"]), int(meta["horizon_steps"]), int(meta["cond_steps"]))


#: ``meta["policy_kind"]`` -> builder(ckpt: Checkpoint, weights: str, device) -> policy object with ``meta``,
#: ``act(obs, deterministic=True, generator=None)`` and ``reset(rows=None)``; kinds not listed here
#: ("diffusion", "gaussian", and checkpoints without the key) are built by :func:`load_policy` itself.
POLICY_KINDS = {}  # type: Dict[str, Any]
_KIND_MODULES = {"residual": "dpft.rl.residual", "idql": "dpft.rl.idql", "cmil": "dpft.rl.cmil_policy"}


def register_policy_kind(kind: str, builder: Any) -> None:
    """Make :func:`load_policy` build checkpoints whose ``meta["policy_kind"] == kind`` with ``builder``."""
    POLICY_KINDS[str(kind)] = builder


def build_model_from_spec(meta: Mapping[str, Any]) -> nn.Module:
    """The model of ``meta["policy_spec"]`` (a resolved :func:`dpft.models.policy_spec`, written by fine-tuning
    runs; it includes ``ft_denoising_steps`` and the sampling settings), built from the metadata alone."""
    from dpft.models import build_policy_model

    with torch.random.fork_rng(devices=[]):
        return build_policy_model(dict(meta["policy_spec"]), meta["obs_shapes"], int(meta["obs_dim"]),
                                  list(meta["image_keys"]), int(meta["action_dim"]), int(meta["horizon_steps"]),
                                  int(meta["cond_steps"]))


def load_weights(model: nn.Module, ckpt: Any, weights: str = "ema") -> str:
    """Load ``ckpt``'s EMA weights (``weights="ema"``, when the checkpoint has them) or its live weights into
    ``model`` (strict: missing or unexpected keys are errors naming the file); returns the weights used
    (``"ema"`` or ``"model"``). For policy-kind builders (:func:`register_policy_kind`)."""
    from dpft.checkpoint import EMA_FILE, MODEL_FILE, load_state_strict

    if weights == "ema" and ckpt.ema_state is not None:
        load_state_strict(model, ckpt.ema_state, os.path.join(ckpt.dir, EMA_FILE))
        return "ema"
    load_state_strict(model, ckpt.model_state, os.path.join(ckpt.dir, MODEL_FILE))
    return "model"


def load_policy(path: Any, weights: str = "ema", device: Union[str, torch.device] = "cpu",
                verify: Optional[bool] = None) -> Policy:
    """Rebuild a :class:`Policy` from a run directory, its ``checkpoints/`` folder or a checkpoint directory.

    Args:
        path: RUN_DIR (newest checkpoint), RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_XXXXXXXX.
        weights: ``"ema"`` (default; falls back to the live weights, with ``policy.weights == "model"``,
            when the run had ``ema_decay=0``) or ``"model"``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        verify: check the files against the sha256 checksums in meta.json (``None``: the
            :func:`dpft.checkpoint.verification` default, True). ``False`` loads damaged files anyway, with a
            warning naming each file that fails its checksum (``dpft rollout --no-verify``).
    """
    if verify is not None:  # also for the files a policy kind's builder reads itself (e.g. IDQL's critics)
        from dpft.checkpoint import verification

        with verification(verify):
            return _load_policy(path, weights, device)
    return _load_policy(path, weights, device)


def _load_policy(path: Any, weights: str, device: Union[str, torch.device]) -> Policy:
    from dpft.checkpoint import load_checkpoint
    from dpft.config import PretrainConfig, from_yaml_text

    if weights not in WEIGHTS:
        raise DpftError("weights=%r is not known; expected 'ema' (the EMA average, default) or 'model' (the live "
                        "training weights)." % (weights,))
    ckpt = load_checkpoint(path, training_state=False, ema=weights == "ema")
    kind = ckpt.meta.get("policy_kind")
    if kind in POLICY_KINDS:
        return POLICY_KINDS[kind](ckpt, weights, device)
    if kind is not None and kind not in ("diffusion", "gaussian"):
        if kind in _KIND_MODULES:  # the module that registers the kind, imported on first use
            import importlib

            importlib.import_module(_KIND_MODULES[kind])
        if kind in POLICY_KINDS:
            return POLICY_KINDS[kind](ckpt, weights, device)
        raise DpftError("Checkpoint '%s' holds a policy of kind %r, which this dpft does not know (known: diffusion, "
                        "gaussian, %s)." % (ckpt.dir, kind, ", ".join(sorted(POLICY_KINDS)) or "none registered"))
    missing = [k for k in _REQUIRED_META if k not in ckpt.meta]
    if missing:
        raise DpftError("Checkpoint file '%s' lacks %s; it was not written by dpft pretrain."
                        % (os.path.join(ckpt.dir, "meta.json"), missing))
    if "policy_spec" in ckpt.meta:  # fine-tuned (or spec-carrying) checkpoints: rebuilt from meta alone
        config = None
        model = build_model_from_spec(ckpt.meta)
    else:
        config = from_yaml_text(ckpt.config_yaml, PretrainConfig, source=os.path.join(ckpt.dir, "config.yaml"))
        model = build_model_from_meta(config, ckpt.meta)
    used = load_weights(model, ckpt, weights)
    return Policy(model, ckpt.normalizer, ckpt.meta, weights=used, checkpoint_dir=ckpt.dir, config=config,
                  device=device)


__all__ = ["Policy", "load_policy", "load_weights", "build_model_from_meta", "build_model_from_spec",
           "register_policy_kind",
           "POLICY_KINDS", "WEIGHTS"]
