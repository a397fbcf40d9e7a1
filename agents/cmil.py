"""``dpft finetune agent=cmil dataset=DEMOS.hdf5 out=RUN``: the CMIL trainer (docs/cmil.md section 2).

    from dpft.config import compose
    from dpft.agents.cmil import CmilTrainer
    CmilTrainer(compose("finetune", ["agent=cmil", "preset=cmil_cpu", "dataset=data/lift_pix.hdf5",
                                     "out=runs/lift_cmil"])).run()

It reads the expert episodes (camera images ``cmil.camera``, 64x64 uint8, resized when the file differs; optional
proprio ``cmil.proprio_keys``; actions) from a robomimic HDF5, rebuilds the env from the file's ``env_args`` with
that camera rendered at 64x64, and trains CMIL without env rewards (:class:`dpft.rl.cmil_agent.CmilLearner`):

1. iteration 1 starts with ``cmil.pretrain_steps`` updates on the expert data (the replay holds only the expert
   episodes then) and ``cmil.bc_init_steps`` BC steps of the actor;
2. an iteration steps every env ``n_steps`` times, one env step per action (``act_steps = 1``); the first
   ``cmil.seed_steps`` env steps act without training (the actor, or uniform random actions); afterwards every
   ``cmil.train_every`` env steps run ``cmil.train_steps`` updates on a replay batch (expert + online
   sequences) and an expert batch; finished (and, at the iteration's end, cut) episodes go to the replay;
3. like every trainer: evaluation through :func:`dpft.envs.rollout.rollout` every ``eval_every`` iterations,
   after the last and before the first (the stateful policy, reset per episode); metrics.jsonl; the PNG of
   success/return vs env steps (:func:`dpft.agents.finetune.plot_finetune_curves`); atomic checkpoints
   (:func:`dpft.checkpoint.save_checkpoint`) with the world model + actor as the policy (policy kind ``"cmil"``),
   critics, slow targets, discriminator, all five optimizers, the replay, the generator and counters;
   ``resume=true``.

Env rewards are only summed into ``train/return`` and ``eval/return`` for the log; no reward enters the replay or
any loss.

Exact on resume (CPU, ``reset_at_iteration=true``): envs restart each iteration from seeded resets, every draw
comes from one saved generator, and the replay is saved whole, so a run killed at any point and resumed from its
newest checkpoint ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from dpft.errors import DpftError

IMAGE_SIZE = 64


@dataclass
class ExpertDemos:
    """Expert episodes in memory: ``images`` uint8 ``(N, 64, 64, 3)``, ``actions`` float32 ``(N, A)`` (raw),
    ``proprio`` float32 ``(N, P)`` (``P = 0`` without proprio), ``episode_ends`` ``(E,)`` (exclusive)."""

    images: np.ndarray
    actions: np.ndarray
    proprio: np.ndarray
    episode_ends: np.ndarray
    env_args: Dict[str, Any]
    proprio_keys: List[str]
    proprio_shapes: Dict[str, List[int]]
    path: str

    def episodes(self) -> List[slice]:
        starts = np.concatenate([[0], self.episode_ends[:-1]])
        return [slice(int(s), int(e)) for s, e in zip(starts, self.episode_ends)]


def _obs_keys_of(path: str) -> List[str]:
    from dpft.data.hdf5 import _demo_names_in, open_robomimic

    with open_robomimic(path) as f:
        name = _demo_names_in(f["data"])[0]
        grp = f["data"][name]
        return sorted(grp["obs"].keys()) if "obs" in grp else []


def resize_images(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> uint8 ``(N, size, size, 3)`` (antialiased bilinear; unchanged when already so)."""
    if tuple(images.shape[1:3]) == (size, size):
        return images
    from torch.nn import functional as F

    out = []
    for i in range(0, len(images), 256):
        x = torch.as_tensor(images[i:i + 256]).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out, 0)


def load_expert(path: str, camera: str, proprio_keys: Sequence[str] = ()) -> ExpertDemos:
    """Read CMIL's expert data from a robomimic HDF5 (see :class:`ExpertDemos`); DpftError naming the file and
    the keys it has when the camera (or a proprio key) is missing or not an image."""
    from dpft.data.hdf5 import load_demos

    path = os.fspath(path)
    keys = _obs_keys_of(path)
    if camera not in keys:
        images = [k for k in keys if k.endswith("_image")]
        raise DpftError(
            "Dataset '%s' has no camera key '%s' (cmil.camera); CMIL learns from camera images. Its observation "
            "keys are [%s]%s. Make pixel demos with `dpft demos task=lift image_obs=true camera_size=64 num=20 "
            "out=DEMOS.hdf5`, or set cmil.camera= to one of its image keys." % (
                path, camera, ", ".join(keys), (" (image keys: %s)" % ", ".join(images)) if images else
                " (no image keys)"))
    missing = [k for k in proprio_keys if k not in keys]
    if missing:
        raise DpftError("Dataset '%s' lacks the proprio key(s) %s (cmil.proprio_keys); its observation keys are [%s]."
                        % (path, missing, ", ".join(keys)))
    demos = load_demos(path, [camera] + list(proprio_keys))
    if camera not in demos.image_keys:
        raise DpftError("Dataset '%s': observation '%s' (cmil.camera) is not a uint8 (H, W, C) image (shape %s)."
                        % (path, camera, demos.obs_shapes.get(camera)))
    img = demos.images[camera]
    if img.shape[-1] != 3:
        raise DpftError("Dataset '%s': camera '%s' has %d channels; CMIL's encoder reads RGB (3)."
                        % (path, camera, img.shape[-1]))
    if not demos.env_args:
        raise DpftError("Dataset '%s' has no data.attrs['env_args'], so the environment CMIL interacts with cannot "
                        "be rebuilt." % path)
    return ExpertDemos(images=resize_images(img), actions=demos.actions.astype(np.float32),
                       proprio=demos.state.astype(np.float32), episode_ends=np.asarray(demos.episode_ends),
                       env_args=dict(demos.env_args), proprio_keys=list(demos.low_dim_keys),
                       proprio_shapes={k: list(demos.obs_shapes[k]) for k in demos.low_dim_keys}, path=path)


def pixel_env_args(env_args: Dict[str, Any], camera: str, size: int = IMAGE_SIZE) -> Dict[str, Any]:
    """The dataset's ``env_args`` with ``camera`` (``<name>_image``) rendered at ``size`` x ``size`` (robosuite)."""
    import copy

    from dpft.envs.registry import env_kind

    kind = env_kind(env_args)
    if kind != "robosuite":
        raise DpftError("agent=cmil learns from camera images; the dataset's env is a %s env (env_args type %r), "
                        "which dpft runs without cameras. Use a robosuite dataset." % (kind, env_args.get("type")))
    if not camera.endswith("_image"):
        raise DpftError("cmil.camera=%r must be an image key '<camera>_image' (e.g. agentview_image)." % camera)
    out = copy.deepcopy(env_args)
    kw = out.setdefault("env_kwargs", {})
    kw.update({"has_offscreen_renderer": True, "use_camera_obs": True, "camera_names": [camera[: -len("_image")]],
               "camera_heights": int(size), "camera_widths": int(size), "camera_depths": False})
    return out


def _dreamer_actions(actions: np.ndarray) -> np.ndarray:
    """robomimic ``actions[t]`` (taken at obs t) -> DreamerV2's ``action[t]`` (led to obs t): shifted by one."""
    out = np.zeros_like(actions)
    out[1:] = actions[:-1]
    return out


class CmilTrainer:
    """Builds data, env, model and learner of a ``dpft finetune agent=cmil`` config and runs the loop.

    ``env_fns`` (optional, for tests and custom envs): zero-argument env constructors used instead of the env
    rebuilt from the dataset's ``env_args`` (run in this process).
    """

    def __init__(self, cfg: Any, env_fns: Optional[Sequence[Callable[[], Any]]] = None):
        from omegaconf import OmegaConf

        from dpft.config import to_object, to_yaml
        from dpft.rundir import open_run_dir
        from dpft.train_utils import resolve_device

        self.cfg_node = cfg
        self.cfg = to_object(cfg)
        self.cfg.validate()
        c = self.cfg
        if c.agent.name != "cmil":
            raise DpftError("CmilTrainer runs agent=cmil, got agent=%s." % c.agent.name)
        self.config_yaml = to_yaml(cfg)
        self.config_dict = OmegaConf.to_container(cfg, resolve=True)
        self.device = resolve_device(c.device)
        if c.num_threads:
            torch.set_num_threads(int(c.num_threads))
        if not os.path.isfile(str(c.dataset)):
            raise DpftError("dataset='%s' does not exist or is not a file; pass a robomimic HDF5 of pixel demos."
                            % c.dataset)
        if c.checkpoint and not os.path.exists(str(c.checkpoint)):
            raise DpftError("checkpoint='%s' does not exist; with agent=cmil it names a CMIL run whose encoder "
                            "initializes this one." % c.checkpoint)
        self.run_dir = open_run_dir(c.out, kind="finetune", resume=c.resume, overwrite=c.overwrite,
                                    inputs={"dataset": c.dataset, "checkpoint": c.checkpoint})
        self.out = self.run_dir.path
        self.env = None  # type: Any
        try:
            self._build(env_fns)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _build(self, env_fns: Optional[Sequence[Callable[[], Any]]]) -> None:
        from dpft.models.world_model import WorldModelConfig
        from dpft.normalization import MinMaxNormalizer
        from dpft.rl.cmil_agent import CmilLearner
        from dpft.rl.cmil_policy import CmilModel, CmilPolicy, cmil_spec
        from dpft.rl.cmil_replay import SequenceReplay

        c, k = self.cfg, self.cfg.cmil
        proprio_keys = list(k.proprio_keys) if k.proprio else []
        self.demos = d = load_expert(str(c.dataset), k.camera, proprio_keys)
        action_dim = int(d.actions.shape[1])
        pdim = int(d.proprio.shape[1]) if proprio_keys else 0
        stats = {"action": (d.actions.min(0), d.actions.max(0))}
        if pdim:
            stats["state"] = (d.proprio.min(0), d.proprio.max(0))
        self.normalizer = MinMaxNormalizer(stats)
        env_args = pixel_env_args(d.env_args, k.camera) if env_fns is None else dict(d.env_args)
        wm_cfg = WorldModelConfig(image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), proprio_dim=pdim, deter=int(k.deter),
                                  stoch=int(k.stoch), hidden=int(k.hidden), ensemble=int(k.ensemble),
                                  depth=int(k.depth), mlp_units=int(k.mlp_units), kl_balance=float(k.kl_balance),
                                  kl_free=float(k.kl_free))
        spec = cmil_spec(wm_cfg, action_dim, int(k.actor_layers), int(k.actor_units), float(k.actor_min_std),
                         k.camera, proprio_keys)
        obs_keys = [k.camera] + proprio_keys
        shapes = {k.camera: [IMAGE_SIZE, IMAGE_SIZE, 3]}
        shapes.update(d.proprio_shapes)
        slices, start = {}, 0
        for key in proprio_keys:
            n = int(np.prod(shapes[key]))
            slices[key] = [start, start + n]
            start += n
        self.meta = {"policy": "cmil", "policy_type": "cmil", "policy_kind": "cmil", "cmil_spec": spec,
                     "obs_keys": obs_keys, "low_dim_keys": proprio_keys, "image_keys": [k.camera],
                     "obs_shapes": shapes, "obs_dim": pdim, "state_slices": slices, "action_dim": action_dim,
                     "horizon_steps": 1, "cond_steps": 1, "act_steps": 1, "denoising_steps": None,
                     "env_args": env_args, "dataset": os.path.abspath(str(c.dataset))}
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(int(c.seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(c.seed))
            self.model = CmilModel(spec)
            if c.checkpoint:
                self._init_encoder(self.model)
            self.learner = CmilLearner(self.model, k, self.device, self.gen)
        self.policy = CmilPolicy(self.model, self.normalizer, self.meta, weights="model", device=self.device)
        self.model.train()
        # replays: the world model trains on expert + online episodes; a separate expert replay for D and BC
        shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
        self.replay = SequenceReplay(int(k.replay_size), shape, action_dim, pdim)
        self.expert = SequenceReplay(max(len(d.images), int(k.seq_len)), shape, action_dim, pdim)
        act_n = self._norm_actions(d.actions)
        # expert proprio normalized exactly as the online rows (_proprio_row) and the policy's input
        pro_n = (self.normalizer.normalize("state", torch.as_tensor(np.asarray(d.proprio, np.float32))).numpy()
                 if pdim else None)
        for sl in d.episodes():
            for buf in (self.expert, self.replay):
                buf.add_episode(d.images[sl], _dreamer_actions(act_n[sl]), pro_n[sl] if pdim else None)
        if len(self.expert) < int(k.seq_len):
            raise DpftError("Dataset '%s' holds %d steps, fewer than one sequence (cmil.seq_len=%d)."
                            % (d.path, len(self.expert), int(k.seq_len)))
        self.env = self._make_env(env_args, obs_keys, env_fns)
        got = tuple(self.env.obs_shapes.get(k.camera, ()))
        if got != shape:
            raise DpftError("The env gives '%s' with shape %s; CMIL needs %s (the env was built from the dataset's "
                            "env_args with the camera at %dx%d)." % (k.camera, got or "(absent)", shape, IMAGE_SIZE,
                                                                     IMAGE_SIZE))
        self.iteration = 0
        self.env_steps = 0
        self.since_train = 0
        self.pretrained = False
        self.raw_obs = None  # type: Any
        self._pending = []  # type: List[Dict[str, List[Any]]]
        if c.resume:
            self._restore()

    def _norm_actions(self, actions: np.ndarray) -> np.ndarray:
        a = self.normalizer.normalize("action", torch.as_tensor(actions, dtype=torch.float32))
        return a.clamp(-1.0, 1.0).numpy()

    def _init_encoder(self, model: Any) -> None:
        """``checkpoint=``: initialize the encoder from a CMIL run's checkpoint (other dpft checkpoints' image
        encoders are a different architecture: refused with the reason)."""
        from dpft.checkpoint import load_checkpoint, load_state_strict

        ckpt = load_checkpoint(self.cfg.checkpoint, ema=False)
        kind = ckpt.meta.get("policy_kind", ckpt.meta.get("policy_type", "diffusion"))
        if kind != "cmil":
            raise DpftError(
                "checkpoint='%s' holds a %s policy (%s). Its image encoder (dpft.models.vision.ConvEncoder: "
                "GroupNorm convs with soft-argmax keypoints on [-1, 1] pixels, per-camera feature vectors) is not "
                "the DreamerV2 conv encoder of CMIL's world model (4 stride-2 convs without norm layers, a flat "
                "32*depth embedding, x/255 - 0.5 pixels), so its weights cannot initialize it. With agent=cmil, "
                "checkpoint= takes a CMIL run (its encoder initializes this one); drop checkpoint= to start from "
                "scratch." % (ckpt.dir, kind, ckpt.meta.get("policy")))
        prefix = "wm.encoder."
        state = {key[len(prefix):]: v for key, v in ckpt.model_state.items() if key.startswith(prefix)}
        load_state_strict(model.wm.encoder, state, os.path.join(ckpt.dir, "model.safetensors") +
                          " (its encoder; cmil.depth and cmil.proprio must match that run)")

    def _make_env(self, env_args: Dict[str, Any], obs_keys: List[str],
                  env_fns: Optional[Sequence[Callable[[], Any]]]) -> Any:
        from dpft.agents.finetune import ENV_EXTRAS
        from dpft.envs.registry import EnvFactory
        from dpft.envs.vector import VectorEnv

        c = self.cfg
        if env_fns is not None:
            return VectorEnv(list(env_fns), cond_steps=1, act_steps=1, mode="inline")
        from dpft.envs.render import setup_rendering

        setup_rendering(require=True)
        options = {"terminate_on_success": bool(c.terminate_on_success)}
        if c.max_episode_steps:
            options["max_episode_steps"] = int(c.max_episode_steps)
        fns = [EnvFactory(env_args, obs_keys=obs_keys, kwargs=options) for _ in range(int(c.envs))]
        try:
            return VectorEnv(fns, cond_steps=1, act_steps=1, mode="process")
        except ImportError as e:
            raise DpftError("The robosuite environment of dataset '%s' cannot be built: %s. Install it with %s."
                            % (c.dataset, e, ENV_EXTRAS["robosuite"])) from None

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> str:
        from dpft.checkpoint import save_checkpoint

        lr = self.learner
        meta = dict(self.meta)
        meta["finetune"] = {"agent": "cmil", "iteration": self.iteration, "env_steps": self.env_steps,
                            "updates": lr.updates}
        tensors = {name: m.state_dict() for name, m in lr.modules().items()}
        tensors["replay"] = self.replay.state_dict()
        tensors["sampler_rng"] = {"state": self.gen.get_state()}
        ts = {"optimizers": {name: o.state_dict() for name, o in lr.opts.items()},
              "json": {"cmil": {"updates": lr.updates, "bc_steps": lr.bc_steps, "since_train": self.since_train,
                                "pretrained": self.pretrained}},
              "tensors": tensors,
              "step": {"iteration": self.iteration, "env_steps": self.env_steps, "agent": "cmil"}}
        return save_checkpoint(self.out, self.iteration, self.model.state_dict(), None, self.normalizer, meta,
                               self.config_yaml, training_state=ts, keep=self.cfg.keep_checkpoints)

    def _restore(self) -> None:
        from dpft.agents.finetune import load_resume_checkpoint
        from dpft.checkpoint import load_state_strict

        ckpt = load_resume_checkpoint(self.out, "cmil", self.cfg_node)
        if ckpt is None:
            return  # killed before its first checkpoint: start from the beginning
        latest = ckpt.dir
        from dpft.train_utils import apply_resume_compute

        warning = apply_resume_compute(self.cfg.num_threads, ckpt.meta, latest)  # the recorded threads when unset
        if warning:
            import sys

            print("dpft finetune: " + warning, file=sys.stderr, flush=True)
        ts = ckpt.training_state
        load_state_strict(self.model, ckpt.model_state, latest)
        lr = self.learner
        for name, m in lr.modules().items():
            m.load_state_dict(ts["tensors"][name])
        for name, o in lr.opts.items():
            o.load_state_dict(ts["optimizers"][name])
        self.replay.load_state_dict(ts["tensors"]["replay"])
        self.gen.set_state(ts["tensors"]["sampler_rng"]["state"])
        js = ts["json"]["cmil"]
        lr.updates, lr.bc_steps = int(js["updates"]), int(js["bc_steps"])
        self.since_train, self.pretrained = int(js["since_train"]), bool(js["pretrained"])
        self.iteration = int(ts["step"]["iteration"])
        self.env_steps = int(ts["step"]["env_steps"])
        print("dpft finetune: resumed CMIL from %s (iteration %d, %d env steps, %d updates)"
              % (latest, self.iteration, self.env_steps, lr.updates))

    # ------------------------------------------------------------------ data
    def _sample(self, buf: Any) -> Dict[str, torch.Tensor]:
        k = self.cfg.cmil
        return buf.sample(int(k.batch_size), int(k.seq_len), self.gen, self.device)

    def train_round(self, n: int) -> List[Dict[str, float]]:
        """``n`` learner updates on fresh replay and expert batches."""
        return [self.learner.update(self._sample(self.replay), self._sample(self.expert)) for _ in range(int(n))]

    def _start_episode(self, rows: Sequence[int], obs: Dict[str, np.ndarray]) -> None:
        k = self.cfg.cmil
        for i in rows:
            self._pending[i] = {"image": [obs[k.camera][i, -1]], "action": [np.zeros(self.model.action_dim, np.float32)],
                                "proprio": [self._proprio_row(obs, i)], "return": 0.0}

    def _proprio_row(self, obs: Dict[str, np.ndarray], i: int) -> Optional[np.ndarray]:
        keys = self.meta["low_dim_keys"]
        if not keys:
            return None
        raw = np.concatenate([np.asarray(obs[key][i, -1], np.float32).reshape(-1) for key in keys])
        return self.normalizer.normalize("state", torch.as_tensor(raw)).numpy()

    def _flush(self, i: int) -> None:
        p = self._pending[i]
        if p is None or len(p["image"]) < 2:
            return
        pro = np.stack(p["proprio"]) if self.meta["low_dim_keys"] else None
        self.replay.add_episode(np.stack(p["image"]), np.stack(p["action"]), pro)
        self._pending[i] = None

    def reset_envs(self) -> None:
        from dpft.agents.finetune import env_seed

        n = self.env.num_envs
        self.raw_obs = self.env.reset(seeds=[env_seed(self.cfg.seed, self.iteration, i, n) for i in range(n)])
        self._pending = [None] * n
        self._start_episode(range(n), self.raw_obs)
        self.policy.reset(None)

    # ------------------------------------------------------------------ one iteration
    def collect_and_train(self, n_steps: int) -> Dict[str, Any]:
        """``n_steps`` env steps per env, with the training rounds they make due."""
        c, k = self.cfg, self.cfg.cmil
        env, n = self.env, self.env.num_envs
        episodes = []  # type: List[Dict[str, Any]]
        infos = []  # type: List[Dict[str, float]]
        t_env = t_pol = t_upd = 0.0
        steps = 0
        for _ in range(int(n_steps)):
            t0 = time.perf_counter()
            a = self.policy.act_normalized(self.raw_obs, deterministic=False, generator=self.gen)
            if self.env_steps < int(k.seed_steps) and k.seed_action == "random":
                a = torch.rand(a.shape, generator=self.gen).to(a.device) * 2.0 - 1.0
                self.policy.prev_action = a
            env_a = self.normalizer.unnormalize("action", a).detach().cpu().numpy().astype(np.float32)
            t1 = time.perf_counter()
            res = env.step(env_a[:, None])
            t2 = time.perf_counter()
            t_pol += t1 - t0
            t_env += t2 - t1
            a_np = a.detach().cpu().numpy().astype(np.float32)
            reward = np.asarray(res.reward, dtype=np.float64)  # logged only
            failed = np.asarray(res.info.get("failed", np.zeros(n, dtype=bool)), dtype=bool)
            done = np.logical_or(np.logical_or(res.terminated, res.truncated), failed)
            nxt = res.final_obs
            for i in range(n):
                p = self._pending[i]
                p["image"].append(nxt[k.camera][i, -1])
                p["action"].append(a_np[i])
                p["proprio"].append(self._proprio_row(nxt, i))
                p["return"] += float(reward[i]) if math.isfinite(float(reward[i])) else 0.0
            rows = np.nonzero(done)[0]
            for i in rows:
                p = self._pending[i]
                episodes.append({"return": p["return"], "length": len(p["image"]) - 1,
                                 "success": bool(res.success[i]) and not bool(failed[i]), "failed": bool(failed[i])})
                self._flush(int(i))
            if len(rows):
                self._start_episode([int(i) for i in rows], res.obs)
                self.policy.reset([int(i) for i in rows])
            self.raw_obs = res.obs
            step_n = int(np.asarray(res.info.get("steps", np.ones(n))).sum())
            steps += step_n
            self.env_steps += step_n
            if self.env_steps > int(k.seed_steps):
                self.since_train += step_n
                t3 = time.perf_counter()
                while self.since_train >= int(k.train_every):
                    self.since_train -= int(k.train_every)
                    infos += self.train_round(int(k.train_steps))
                t_upd += time.perf_counter() - t3
        return {"episodes": episodes, "infos": infos, "env_steps": steps, "time/env": t_env,
                "time/inference": t_pol, "time/update": t_upd}

    def pretrain(self) -> Dict[str, Any]:
        """``cmil.pretrain_steps`` updates on the replay as it is (the expert episodes) and ``cmil.bc_init_steps``
        BC steps; once per run (before the first env step)."""
        k = self.cfg.cmil
        t0 = time.perf_counter()
        infos = self.train_round(int(k.pretrain_steps))
        bc = [self.learner.bc_step(self._sample(self.expert)) for _ in range(int(k.bc_init_steps))]
        self.pretrained = True
        out = {"time/pretrain": time.perf_counter() - t0, "pretrain/updates": len(infos),
               "pretrain/bc_steps": len(bc)}
        if infos:
            out.update({"pretrain/" + key: v for key, v in _mean_dicts(infos).items()})
        if bc:
            out["pretrain/bc_init_loss"] = bc[-1]["bc_init_loss"]
        return out

    # ------------------------------------------------------------------ evaluation
    def eval_policy(self) -> Any:
        """A fresh stateful :class:`~dpft.rl.cmil_policy.CmilPolicy` on the current weights (as the checkpoint acts)."""
        from dpft.rl.cmil_policy import CmilPolicy

        p = CmilPolicy(self.model, self.normalizer, self.meta, weights="model", device=self.device)
        self.model.train()
        return p

    def evaluate(self) -> Dict[str, Any]:
        from dpft.agents.finetune import eval_record
        from dpft.envs.rollout import rollout

        c = self.cfg
        t0 = time.perf_counter()
        res = rollout(self.eval_policy(), self.env, episodes=int(c.eval_episodes), seed=int(c.eval_seed),
                      deterministic=True, progress=False)
        return eval_record(res, time.perf_counter() - t0)

    # ------------------------------------------------------------------ loop
    def run(self) -> str:
        from dpft.agents.finetune import _fmt, plot_finetune_curves
        from dpft.checkpoint import find_latest
        from dpft.metrics import MetricsLogger

        c = self.cfg
        logger = MetricsLogger(self.out, use_wandb=c.logger == "wandb", wandb_project=c.wandb_project,
                               wandb_mode=c.wandb_mode, config_dict=self.config_dict, start_step=self.iteration)
        if self.iteration == 0:
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
        bar = None
        if c.progress:
            from tqdm import tqdm

            bar = tqdm(total=int(c.iterations), initial=self.iteration, desc="finetune cmil", dynamic_ncols=True)
        last = {}  # type: Dict[str, Any]
        evaluated = False
        try:
            if self.iteration == 0:
                rec = {"iteration": 0, "env_steps": 0}
                rec.update(self.evaluate())
                logger.log(rec, step=0)
                last, evaluated = rec, True
            while self.iteration < int(c.iterations):
                if c.reset_at_iteration or evaluated or self.raw_obs is None:
                    self.reset_envs()
                t0 = time.perf_counter()
                rec = {}  # type: Dict[str, Any]
                if not self.pretrained:
                    rec.update(self.pretrain())
                ro = self.collect_and_train(int(c.n_steps))
                if c.reset_at_iteration:
                    for i in range(self.env.num_envs):  # cut episodes go to the replay too
                        self._flush(i)
                t1 = time.perf_counter()
                self.iteration += 1
                eps = ro["episodes"]
                dt = t1 - t0
                rec.update({"iteration": self.iteration, "env_steps": self.env_steps, "updates": self.learner.updates,
                            "replay_steps": len(self.replay), "train/episodes": len(eps),
                            "train/success_rate": float(np.mean([e["success"] for e in eps])) if eps else None,
                            "train/return": float(np.mean([e["return"] for e in eps])) if eps else None,
                            "train/length": float(np.mean([e["length"] for e in eps])) if eps else None,
                            "train/failed_episodes": int(sum(e["failed"] for e in eps)),
                            "time/env": ro["time/env"], "time/inference": ro["time/inference"],
                            "time/update": ro["time/update"], "time/iteration": dt,
                            "env_steps_per_s": ro["env_steps"] / max(dt, 1e-9),
                            "time/per_update": ro["time/update"] / len(ro["infos"]) if ro["infos"] else None})
                rec.update(_mean_dicts(ro["infos"]))
                final = self.iteration >= int(c.iterations)
                evaluated = final or bool(c.eval_every and self.iteration % int(c.eval_every) == 0)
                if evaluated:
                    if not c.reset_at_iteration:
                        for i in range(self.env.num_envs):
                            self._flush(i)
                    rec.update(self.evaluate())
                logger.log(rec, step=self.iteration)
                last = rec
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"succ": _fmt(rec["train/success_rate"]), "eval": _fmt(rec.get("eval/success_rate")),
                                     "steps": self.env_steps, "upd": self.learner.updates})
                if final or (c.save_every and self.iteration % int(c.save_every) == 0):
                    self._save()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        png = plot_finetune_curves(self.out)
        final_ckpt = find_latest(self.out)
        print("dpft finetune: CMIL done at iteration %d (%d env steps, %d updates); eval success %s, return %s; "
              "checkpoint %s%s" % (self.iteration, self.env_steps, self.learner.updates,
                                   _fmt(last.get("eval/success_rate")), _fmt(last.get("eval/return")), final_ckpt,
                                   ("; curves " + png) if png else ""))
        return final_ckpt or self.out

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        self.run_dir.close()


def _mean_dicts(items: List[Dict[str, float]]) -> Dict[str, float]:
    if not items:
        return {}
    return {key: float(np.mean([d[key] for d in items if key in d])) for key in items[0]}


def cmil_train(cfg: Any, env_fns: Optional[Sequence[Callable[[], Any]]] = None) -> str:
    """Run the CMIL trainer for a composed ``finetune`` config; returns the final checkpoint directory."""
    trainer = CmilTrainer(cfg, env_fns=env_fns)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["CmilTrainer", "ExpertDemos", "cmil_train", "load_expert", "pixel_env_args", "resize_images"]
