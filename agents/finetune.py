"""``dpft finetune``: the one RL training loop shared by every agent.

    from dpft.config import compose
    from dpft.agents.finetune import finetune
    finetune(compose("finetune", ["agent=dppo", "checkpoint=runs/lift", "out=runs/lift_dppo"]))

One iteration (``iterations`` of them):

1. reset every env from seeds derived from (``seed``, iteration) (``reset_at_iteration=true``; the cut episodes
   are bootstrapped as truncations, so nothing is lost but partial episodes), which makes a resumed run redo
   exactly what an uninterrupted one does;
2. collect ``n_steps`` action chunks from each of the ``envs`` envs (:class:`~dpft.agents.collector.OnPolicyCollector`);
3. ``agent.update(rollout)`` (returns, advantages, epochs x minibatches; :mod:`dpft.agents.onpolicy`);
4. every ``eval_every`` iterations, after the last one and once before the first: evaluate the current policy
   deterministically on ``eval_episodes`` episodes with seeds ``eval_seed + i`` (the same episodes every time)
   through :func:`dpft.envs.rollout.rollout` -- the exact policy a saved checkpoint gives ``dpft rollout``;
5. log one metrics.jsonl record (env steps, train/eval success and return, losses, KL, time split) and checkpoint
   every ``save_every`` iterations (atomic; weights, critic, optimizers, schedulers, reward scaler, observation
   statistics, sampler RNG, iteration and env-step counters).

The Agent interface (an agent is its loss and its update; see :class:`dpft.agents.onpolicy.OnPolicyAgent`):
``obs_to_model(raw_obs, update=False)``, ``act(model_obs, deterministic)``, ``env_action(out)``,
``value_batched(model_obs)``, ``on_episode_start(rows)``, ``update(rollout) -> metrics``, ``modules()``,
``optimizers()``, ``schedulers()``, ``extra_tensors()`` / ``load_extra_tensors()``, ``export_obs_norm(normalizer)``.
Optional hooks (``model_from_checkpoint(cfg) -> (model, normalizer, meta)``, a classmethod/staticmethod: the agent
builds its own model and meta from ``checkpoint=``, e.g. residual PPO's frozen base + residual with
``act_steps=1``; off-policy IDQL, :mod:`dpft.agents.idql`): ``export_meta() -> dict`` merged into the checkpoint's
meta (e.g. another ``policy_kind``), ``extra_weights() -> {name: weights}`` saved next to the model
(``critic.safetensors``), ``eval_policy(normalizer, meta)`` (the policy evaluation uses). The rollout's transition
form (:meth:`dpft.agents.collector.Rollout.next_obs`) gives replay agents the next observation of every step.
Agents are registered in :data:`AGENTS` with the policy type their checkpoint must hold.

What is exact on resume: on CPU, with ``reset_at_iteration=true``, a run killed at any point and resumed from
its newest checkpoint ends with the same weights as an uninterrupted run for gym (in-process, seeded) and
robosuite (worker processes, seeded resets) envs. FurnitureBench (``env_args`` kind ``"furniture"``) runs ONE
GPU-batched :class:`~dpft.envs.furniture.FurnitureEnv` holding all ``envs`` envs, built by
:func:`~dpft.envs.furniture.furniture_env_from_args` (``env_kwargs.simulator``: ``isaacgym`` or the CPU ``fake``;
``simulator=`` overrides it and is recorded in the run's meta) with torch outputs on the simulator's device; the
same instance evaluates (``eval_episodes`` episodes in waves of ``envs``). The fork cannot seed envs one by one:
each iteration's reset seeds torch's and numpy's global generators with ``env_seed(seed, iteration, 0, envs)``
and restarts every env with the "open" gripper command, so on the CPU fake a resumed run ends with the
uninterrupted run's weights (tested for dppo, residual_ppo and idql). On Isaac Gym the resumed run restores the
same weights, optimizer, replay and RNG state and the same seeded reset draw, but PhysX on the GPU is not
bit-reproducible, so its trajectories (and weights) drift from an uninterrupted run's.

Data parallel (``torchrun --standalone --nproc_per_node W -m dpft.cli finetune ...``; env ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``; gloo on CPU, NCCL with ``device=cuda`` on ``cuda:LOCAL_RANK``; docs/design.md): ``envs`` is the
GLOBAL env count (divisible by W, refused otherwise) and ``agent.batch_size`` the GLOBAL minibatch. Rank r steps
the envs ``r * envs / W ...`` seeded as a single process would seed them, sampling from its own stream reseeded
every iteration from (seed, rank, iteration); the update is the single-process update over all ranks' samples
(global minibatches from rank 0's permutation, each rank's mean losses weighted by its share and the gradients
summed, global advantage normalization, reward-scaler and observation statistics, KL stop;
:mod:`dpft.rl.data_parallel`), so the replicas stay bit-identical. Rank 0 evaluates, logs (episodes and env
steps gathered from every rank), writes checkpoints and the PNG; the others wait at barriers; every rank resumes
from the same checkpoint (exact with the same W). ``agent=idql`` and IN-RIL/CAIR are refused under DDP.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dpft.errors import DpftError

#: agent name -> (module, class, policy type of the checkpoint it fine-tunes)
AGENTS = {"dppo": ("dpft.agents.dppo", "DPPOAgent", "diffusion"),
          "ppo": ("dpft.agents.ppo", "PPOAgent", "gaussian"),
          "idql": ("dpft.agents.idql", "IDQLAgent", "diffusion"),
          "residual_ppo": ("dpft.agents.residual_ppo", "ResidualPPOAgent", "diffusion")}

ENV_EXTRAS = {"robosuite": "pip install 'dpft[robomimic]'", "gym": "pip install 'dpft[gym]'",
              "furniture": "Isaac Gym + ankile's furniture-bench fork (README, FurnitureBench)"}


def env_seed(seed: int, iteration: int, env_index: int, num_envs: int) -> int:
    """Seed of env ``env_index`` at the start of training iteration ``iteration``: distinct for every (run seed,
    iteration, env) below 10^6 iterations x envs, and never one of the demo (0, 1, ...) or evaluation (100000+)
    seeds."""
    return 10 ** 9 + int(seed) * 10 ** 6 + int(iteration) * int(num_envs) + int(env_index)


def _policy_spec_of(ckpt: Any) -> Dict[str, Any]:
    from dpft.config import PretrainConfig, from_yaml_text
    from dpft.models import policy_spec

    if "policy_spec" in ckpt.meta:
        return dict(ckpt.meta["policy_spec"])
    cfg = from_yaml_text(ckpt.config_yaml, PretrainConfig, source=os.path.join(ckpt.dir, "config.yaml"))
    return policy_spec(cfg.policy)


def eval_record(res: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    """The ``eval/*`` metrics of one evaluation from :func:`dpft.envs.rollout.rollout`'s result: success rate with
    its binomial standard error, return mean and std, length, episode count, and its wall time. Every trainer logs
    these keys, with the settings that ``dpft rollout`` of the same weights needs to give the same numbers
    (``eval/seed`` of the first episode, ``eval/num_envs``: the envs share one sampling-noise stream, so another
    count gives other noise)."""
    n = int(res["num_episodes"])
    out = {"eval/return": res["mean_return"], "eval/return_std": res["std_return"], "eval/length": res["mean_length"],
           "eval/episodes": n, "eval/seed": int(res.get("seed", 0)), "eval/num_envs": int(res.get("num_envs", 0)),
           "time/eval": float(seconds)}
    if res.get("success_rate") is not None:  # None: the task has no success signal (Gym locomotion)
        p = float(res["success_rate"])
        out.update({"eval/success_rate": p, "eval/success_se": math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))})
    return out


def load_resume_checkpoint(out: str, agent: str, cfg_node: Any) -> Any:
    """The newest checkpoint of the run in ``out`` with its training state, for ``resume=true`` (``None`` if the run
    has none yet), after checking that it was trained by ``agent`` and that only :data:`RESUME_MAY_CHANGE` settings
    differ from ``cfg_node`` (errors name the run directory and the differing keys). Shared by every trainer."""
    from dpft.checkpoint import find_latest, load_checkpoint
    from dpft.config import from_yaml_text
    from dpft.rl.config import RESUME_MAY_CHANGE, FinetuneConfig
    from dpft.train_utils import config_differences

    latest = find_latest(out)
    if latest is None:
        return None
    ckpt = load_checkpoint(latest, training_state=True, ema=False)
    saved = from_yaml_text(ckpt.config_yaml, FinetuneConfig, source=os.path.join(latest, "config.yaml"))
    if saved.agent.name != agent:
        raise DpftError("resume=true with agent=%s, but the run in '%s' was trained with agent=%s; resume with "
                        "the same agent (or start a new out=)." % (agent, out, saved.agent.name))
    diffs = config_differences(ckpt.config_yaml, cfg_node, RESUME_MAY_CHANGE)
    if diffs:
        desc = ", ".join("%s: %r -> %r" % d for d in diffs[:8])
        raise DpftError("resume=true: these settings differ from the run in '%s' and may not change on resume: "
                        "%s. Only %s may change." % (out, desc, ", ".join(RESUME_MAY_CHANGE)))
    return ckpt


def bind_start_checkpoint(checkpoint: str, out: str, resume: bool, write: bool = True) -> Optional[Dict[str, Any]]:
    """The identity (:func:`dpft.checkpoint.checkpoint_identity`: path and sha256 of its weights, normalizer and
    meta) of the checkpoint a fine-tuning run starts from, recorded in ``OUT/start_checkpoint.json`` (``write``) and
    in every checkpoint's meta (``start_checkpoint``). With ``resume=true`` the identity recorded by the run (its
    newest checkpoint's meta, else start_checkpoint.json) must match ``checkpoint=``: another checkpoint, or the
    same path re-pretrained in place, is refused naming both. Returns the identity the run is bound to (None when
    ``checkpoint`` cannot be read: loading it reports why)."""
    import json
    import sys

    from dpft.checkpoint import (
        START_CHECKPOINT_FILE,
        check_start_checkpoint,
        checkpoint_identity,
        find_latest,
        read_json,
        resolve_checkpoint,
        write_text_atomic,
    )

    try:
        current = checkpoint_identity(resolve_checkpoint(checkpoint))
    except (DpftError, OSError):
        return None  # a missing or damaged checkpoint: loading it gives the precise message
    record = os.path.join(out, START_CHECKPOINT_FILE)
    if resume:
        recorded, source = None, None  # type: Any, Any
        latest = find_latest(out) if os.path.isdir(out) else None
        if latest is not None:
            try:
                saved = read_json(os.path.join(latest, "meta.json")).get("start_checkpoint")
            except (DpftError, AttributeError):
                saved = None  # the resume itself reports a damaged meta.json
            if isinstance(saved, dict):
                recorded, source = saved, os.path.join(latest, "meta.json")
        if recorded is None and os.path.isfile(record):
            try:
                recorded, source = read_json(record), record
            except DpftError:
                recorded = None
        if isinstance(recorded, dict):
            note = check_start_checkpoint(recorded, current, out, source)
            if note and write:
                print("dpft finetune: note: " + note, flush=True)
            current = dict(recorded)
        elif latest is not None and write:
            print("dpft finetune: warning: the run in '%s' records no start-checkpoint identity (written by an older "
                  "dpft), so checkpoint='%s' cannot be checked to be the one it started from." % (out, checkpoint),
                  file=sys.stderr)
    if write and not (resume and os.path.isfile(record)):
        write_text_atomic(record, json.dumps(current, indent=1, sort_keys=True) + "\n")
    return current


class Finetuner:
    """Builds the policy, env and agent of a :class:`dpft.rl.config.FinetuneConfig` and runs the loop."""

    def __init__(self, cfg: Any):
        from omegaconf import OmegaConf

        from dpft.config import to_object, to_yaml
        from dpft.rundir import open_run_dir
        from dpft.train_utils import dist_info_from_env, resolve_device

        self.cfg_node = cfg
        self.cfg = to_object(cfg)
        self.cfg.validate()
        c = self.cfg
        if c.agent.name not in AGENTS:  # (H-cmil) agent=cmil has its own trainer
            raise DpftError("agent=%s is not run by Finetuner; use dpft.agents.finetune.finetune(cfg), which hands "
                            "agent=cmil to dpft.agents.cmil.CmilTrainer." % c.agent.name)
        self.config_yaml = to_yaml(cfg)
        self.config_dict = OmegaConf.to_container(cfg, resolve=True)
        self.dist = dist_info_from_env()  # (H-ddp) torchrun: RANK / WORLD_SIZE / LOCAL_RANK
        self.rank0 = self.dist.rank == 0
        self.local_envs = _check_data_parallel(c, self.dist.world_size)
        self.device = resolve_device(c.device, self.dist.local_rank)
        if c.num_threads:
            torch.set_num_threads(int(c.num_threads))
        if c.checkpoint and not os.path.exists(str(c.checkpoint)):
            raise DpftError("checkpoint='%s' does not exist; pass a pretrained run directory (its newest checkpoint "
                            "is used) or a checkpoint directory.%s" % (c.checkpoint, (
                                " resume=true rebuilds the policy from the checkpoint the run started from and then "
                                "restores the run's own weights and training state, so that checkpoint must still "
                                "exist (the run's meta.json names it as source_checkpoint)." if c.resume else "")))
        self.run_dir = (open_run_dir(c.out, kind="finetune", resume=c.resume, overwrite=c.overwrite,
                                     inputs={"checkpoint": c.checkpoint, "inril.dataset": c.inril.dataset})
                        if self.rank0 else None)  # (H-ddp) rank 0 owns the run directory
        self.out = self.run_dir.path if self.run_dir is not None else os.path.abspath(os.path.expanduser(str(c.out)))
        self.env = None  # type: Any
        try:  # the run is bound to its start checkpoint: resume refuses another one (or one changed in place)
            self.start_identity = (bind_start_checkpoint(c.checkpoint, self.out, bool(c.resume), write=self.rank0)
                                   if c.checkpoint else None)
        except BaseException:
            self.close()
            raise
        self._pg_owned = False
        self.dp = None  # type: Any
        try:
            self._init_data_parallel()
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        import importlib

        from dpft.policy import Policy

        c = self.cfg
        name = c.agent.name
        module, cls, ptype = AGENTS[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(c.seed))
            agent_cls = getattr(importlib.import_module(module), cls)
            if c.checkpoint and hasattr(agent_cls, "model_from_checkpoint"):  # (H-residual) own model + meta
                model, normalizer, meta = agent_cls.model_from_checkpoint(c)  # residual PPO: base + residual
                scratch = False
            elif c.checkpoint:
                model, normalizer, meta = self._from_checkpoint(ptype)
                scratch = False
            else:
                model, normalizer, meta = self._from_scratch()
                scratch = True
            for key in ("obs_clip", "raw_obs_clip"):  # the clamps act in Policy, so evaluation and rollouts match
                value = getattr(c, key)
                meta[key] = None if value is None else float(value)
            self.meta = meta
            from dpft.envs.registry import has_success_signal

            self.has_success = has_success_signal(meta.get("env_args"))  # Gym locomotion: returns only
            self.policy = Policy(model, normalizer, meta, weights="model", device=self.device)
            self.model = self.policy.model
            self.model.train()
            self.env = self._make_env(meta, num_envs=self.local_envs)
            self._derive_rollout_sizes(meta)
            self.gen = torch.Generator(device="cpu")
            self.gen.manual_seed(int(c.seed))
            agent_cls = getattr(importlib.import_module(module), cls)
            kw = {"scratch": True} if scratch else {}
            self.agent = agent_cls(c.agent, self.policy, self.env.num_envs, self.device, self.gen, c.iterations, **kw)
            if self.dp is not None:
                self.agent.dp = self.dp
        from dpft.agents.collector import OnPolicyCollector

        self.collector = OnPolicyCollector(self.env, self.agent,
                                           truncation_as_terminal=bool(c.truncation_as_terminal),
                                           success_as_terminal=bool(c.success_as_terminal))
        from dpft.agents.inril import build_inril  # (H-inril) IN-RIL / CAIR / alignment monitor plug-in

        if self.dp is not None and int(c.inril.monitor_every):  # (H-ddp) IN-RIL/CAIR were refused above
            c.inril.monitor_every = 0
            if self.rank0 and c.checkpoint:
                print("dpft finetune: the gradient-alignment monitor (inril.monitor_every) is off under torchrun.")
        self.inril = build_inril(c, self.agent, self.meta, self.policy.normalizer, self.device)
        self.iteration = 0
        self.env_steps = 0
        if c.resume:
            self._restore()

    def _derive_rollout_sizes(self, meta: Dict[str, Any]) -> None:
        """Resolve ``n_steps=null`` (one episode per iteration) and ``agent.batch_size=null`` (the recipe's)."""
        c = self.cfg
        derived = {}
        if c.n_steps is None:
            limit = getattr(self.env, "max_episode_steps", None)
            if not limit:
                raise DpftError("n_steps=null derives the chunks per iteration from the env's episode length, but "
                                "this env has none; set n_steps= (action chunks per env per iteration).")
            c.n_steps = int(math.ceil(int(limit) / int(self.env.act_steps)))
            derived["n_steps"] = c.n_steps
        if c.agent.batch_size is None:
            from dpft.envs.furniture import recipe_batch_size
            from dpft.envs.registry import env_kind

            env_args = meta.get("env_args") or {}
            c.agent.batch_size = recipe_batch_size(
                c.agent.name, env_kind(env_args) if env_args else None, (env_args.get("env_kwargs") or {}),
                str(meta.get("policy", "")), int(c.n_steps), int(c.envs))
            derived["agent.batch_size"] = c.agent.batch_size
        if derived:
            meta["derived_settings"] = derived
            if self.rank0 and c.progress:
                print("dpft finetune: derived %s" % ", ".join("%s=%d" % kv for kv in derived.items()))

    def _from_checkpoint(self, ptype: str):
        from dpft.checkpoint import load_checkpoint, load_state_strict
        from dpft.models import build_policy_model

        c, a = self.cfg, self.cfg.agent
        ckpt = load_checkpoint(c.checkpoint, ema=c.weights == "ema")
        meta = dict(ckpt.meta)
        have = meta.get("policy_type", "diffusion")
        if have != ptype:
            want = [k for k, v in AGENTS.items() if v[2] == have
                    and not (k == "residual_ppo" and meta.get("ft_denoising_steps"))]  # its base must be pretrained
            if want:
                hint = "use agent=%s" % " or agent=".join(want)
            elif meta.get("source_checkpoint"):
                hint = ("no agent fine-tunes a %s checkpoint further; pass the pretrained checkpoint it started from "
                        "(%s)" % (have, meta["source_checkpoint"]))
            else:  # e.g. a CMIL run: trained from demonstrations, not from a pretrained checkpoint
                hint = ("no agent fine-tunes a %s checkpoint, and it was not started from a pretrained one (its "
                        "meta.json names none); evaluate it with `dpft rollout checkpoint=%s`, continue its own run "
                        "with resume=true, or fine-tune a checkpoint of `dpft pretrain`" % (have, ckpt.dir))
            raise DpftError("agent=%s fine-tunes a %s policy, but checkpoint '%s' holds a %s policy (%s); %s."
                            % (a.name, ptype, ckpt.dir, have, meta.get("policy"), hint))
        spec = _policy_spec_of(ckpt)
        if ptype == "diffusion":
            if spec.get("eval_randn_clip_value") is None:  # deterministic evaluation samples as the start checkpoint
                spec["eval_randn_clip_value"] = float(spec.get("randn_clip_value", 10.0))
            for key in ("min_sampling_denoising_std", "min_logprob_denoising_std", "randn_clip_value", "ddim_eta"):
                spec[key] = float(getattr(a, key))
            if a.use_ddim is not None and bool(a.use_ddim) != bool(spec.get("use_ddim")):
                spec["use_ddim"] = bool(a.use_ddim)
            if a.ddim_steps is not None:
                spec["ddim_steps"] = int(a.ddim_steps)
            if spec.get("use_ddim") and not spec.get("ddim_steps"):
                raise DpftError("agent.use_ddim=true needs agent.ddim_steps (DPPO fine-tunes with 5).")
        else:
            for key in ("init_std", "std_min", "std_max"):
                if getattr(a, key) is not None:
                    spec[key] = float(getattr(a, key))
        model = build_policy_model(spec, meta["obs_shapes"], int(meta["obs_dim"]), list(meta["image_keys"]),
                                   int(meta["action_dim"]), int(meta["horizon_steps"]), int(meta["cond_steps"]))
        state = ckpt.ema_state if (c.weights == "ema" and ckpt.ema_state is not None) else ckpt.model_state
        load_state_strict(model, state, ckpt.dir)
        if ptype == "diffusion":
            n = model.num_sampling_steps
            k = n if int(a.ft_denoising_steps) == 0 else int(a.ft_denoising_steps)  # 0 = the whole chain
            if not 1 <= k <= n:
                raise DpftError("agent.ft_denoising_steps=%d must be between 1 and the policy's %d sampling steps "
                                "(%s)." % (a.ft_denoising_steps, n, "ddim_steps" if model.use_ddim else "denoising_steps"))
            model.make_finetunable(k)
            spec["ft_denoising_steps"] = k
            meta["ft_denoising_steps"] = k
        elif a.init_std is not None:
            with torch.no_grad():
                model.log_std.fill_(math.log(float(a.init_std)))
        meta.update({"policy_spec": spec, "policy_kind": ptype, "source_checkpoint": os.path.abspath(ckpt.dir)})
        return model, ckpt.normalizer, meta

    def _from_scratch(self):
        from dpft.envs.registry import env_args_for_task
        from dpft.models import build_policy_model, policy_spec
        from dpft.normalization import MinMaxNormalizer

        c, a = self.cfg, self.cfg.agent
        env_args = env_args_for_task(c.env)
        probe = self._make_env({"env_args": env_args, "obs_keys": None, "cond_steps": 1, "act_steps": 1}, num_envs=1)
        try:
            obs_shapes = {k: list(v) for k, v in probe.obs_shapes.items()}
            action_dim = int(probe.action_dim)
        finally:
            probe.close()
        images = [k for k in obs_shapes if len(obs_shapes[k]) == 3]
        if images:
            raise DpftError("Training from scratch uses low-dim observations only; env=%s gives cameras %s." % (c.env, images))
        keys = sorted(obs_shapes)
        obs_dim = int(sum(int(np.prod(obs_shapes[k])) for k in keys))
        slices, start = {}, 0
        for k in keys:
            d = int(np.prod(obs_shapes[k]))
            slices[k] = [start, start + d]
            start += d
        spec = policy_spec({"name": "gaussian_mlp", "mlp_dims": list(a.mlp_dims), "activation": a.activation,
                            "tanh_mean": False, "init_std": a.init_std or 1.0, "std_min": a.std_min or 1e-3,
                            "std_max": a.std_max or 10.0})
        meta = {"policy": "gaussian_mlp", "policy_type": "gaussian", "policy_kind": "gaussian", "policy_spec": spec,
                "obs_keys": keys, "low_dim_keys": keys, "image_keys": [], "obs_shapes": obs_shapes,
                "obs_dim": obs_dim, "state_slices": slices, "action_dim": action_dim,
                "horizon_steps": int(a.horizon_steps), "cond_steps": 1, "act_steps": int(a.act_steps),
                "denoising_steps": None, "env_args": env_args}
        model = build_policy_model(spec, obs_shapes, obs_dim, [], action_dim, int(a.horizon_steps), 1)
        # identity normalization of states; actions in the env's [-1, 1] box (gym MuJoCo locomotion)
        normalizer = MinMaxNormalizer({"state": (-np.ones(obs_dim), np.ones(obs_dim)),
                                       "action": (-np.ones(action_dim), np.ones(action_dim))})
        return model, normalizer, meta

    def _make_env(self, meta: Dict[str, Any], num_envs: Optional[int] = None):
        from dpft.envs.registry import EnvFactory, env_kind
        from dpft.envs.rollout import env_mode_for
        from dpft.envs.vector import VectorEnv

        c = self.cfg
        env_args = meta.get("env_args")
        if not env_args:
            raise DpftError("The checkpoint has no env_args in its meta.json (its dataset had no "
                            "data.attrs['env_args']), so the environment to fine-tune in cannot be rebuilt.")
        kind = env_kind(env_args)
        if c.simulator is not None and kind != "furniture":
            raise DpftError("simulator=%s applies to FurnitureBench checkpoints only; this one's env is %s."
                            % (c.simulator, kind))
        if kind == "furniture":  # one GPU-batched env holds all envs; its tensors stay on its device
            from dpft.envs.furniture import furniture_env_from_args

            if c.simulator is not None:  # recorded in the run's meta, so its checkpoints roll out the same way
                env_args = dict(env_args, env_kwargs=dict(env_args.get("env_kwargs") or {}, simulator=c.simulator))
                meta["env_args"] = env_args
            fo = c.furniture  # recorded the same way (the fork's lamp bulb hold, DPPO's chunk-end time limit)
            extra = {"max_env_steps": fo.max_env_steps, "truncate_at_chunk_end": bool(fo.truncate_at_chunk_end)}
            env_args = dict(env_args, env_kwargs=dict(env_args.get("env_kwargs") or {}, **extra))
            meta["env_args"] = env_args

            return furniture_env_from_args(env_args, int(num_envs or c.envs), int(meta["act_steps"]),
                                           int(meta["cond_steps"]), device=self.device,
                                           max_episode_steps=c.max_episode_steps or None,
                                           terminate_on_success=bool(c.terminate_on_success), return_torch=True)
        if c.furniture.max_env_steps is not None or c.furniture.truncate_at_chunk_end:
            raise DpftError("furniture.max_env_steps / furniture.truncate_at_chunk_end apply to FurnitureBench "
                            "checkpoints only; this one's env is %s." % kind)
        if kind == "robosuite":  # record the physics backend in the run's meta, so rollouts use what training used
            from dpft.envs.mujoco_backend import resolve_backend

            backend = c.backend or resolve_backend(env_args, meta.get("obs_keys"))[0]
            env_args = dict(env_args, env_kwargs=dict(env_args.get("env_kwargs") or {}, backend=backend))
            meta["env_args"] = env_args
        elif c.backend is not None:
            raise DpftError("backend=%s applies to robosuite tasks only; this checkpoint's env is %s." % (c.backend, kind))
        options = {"terminate_on_success": bool(c.terminate_on_success)}
        if c.max_episode_steps:
            options["max_episode_steps"] = int(c.max_episode_steps)
        obs_keys = list(meta.get("obs_keys") or []) or None
        mode = env_mode_for(env_args)
        if mode == "process" and kind == "robosuite":
            from dpft.envs.render import setup_rendering

            setup_rendering(require=False)
        n = int(num_envs or c.envs)
        fns = [EnvFactory(env_args, obs_keys=obs_keys, kwargs=options) for _ in range(n)]
        try:
            return VectorEnv(fns, cond_steps=int(meta["cond_steps"]), act_steps=int(meta["act_steps"]), mode=mode)
        except ImportError as e:
            raise DpftError("The %s environment of this run cannot be built: %s. Install it with %s."
                            % (kind, e, ENV_EXTRAS.get(kind, "the matching dpft extra"))) from None

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> str:
        from dpft.checkpoint import save_checkpoint

        a = self.agent
        normalizer = a.export_obs_norm(self.policy.normalizer) if hasattr(a, "export_obs_norm") else self.policy.normalizer
        meta = dict(self.meta)
        meta["finetune"] = {"agent": self.cfg.agent.name, "iteration": self.iteration, "env_steps": self.env_steps}
        if self.start_identity is not None:  # what resume=true checks checkpoint= against
            meta["start_checkpoint"] = self.start_identity
        if hasattr(a, "export_meta"):  # agents whose checkpoint is another policy kind (IDQL: "idql" + critics)
            meta.update(a.export_meta())
        extra = a.extra_weights() if hasattr(a, "extra_weights") else None
        tensors = {"critic": a.critic.state_dict(), "sampler_rng": {"state": self.gen.get_state()}}
        tensors.update(a.extra_tensors())
        if self.dp is not None:  # (H-ddp) the reward scaler's per-env carried returns of ALL envs, rank order
            rs = dict(tensors["reward_scaler"])
            rs["ret"] = self.dp.all_gather_cat(a.reward_scaler.ret, 0).cpu()
            tensors["reward_scaler"] = rs
        ts = {"optimizers": {k: o.state_dict() for k, o in a.optimizers().items()},
              "json": {"schedulers": {k: s.state_dict() for k, s in a.schedulers().items()},
                       "agent": {"train_iterations": a.train_iterations}},
              "tensors": tensors,
              "step": {"iteration": self.iteration, "env_steps": self.env_steps, "agent": self.cfg.agent.name,
                       "world_size": self.dist.world_size}}
        if self.inril is not None:  # (H-inril) schedule, estimators, lambda, reference EMA, IL stream, IL optimizer
            self.inril.save_into(ts)
        path = None
        if self.rank0:  # (H-ddp) rank 0 writes; the replicas are identical
            path = save_checkpoint(self.out, self.iteration, self.model.state_dict(), None, normalizer, meta,
                                   self.config_yaml, training_state=ts, keep=self.cfg.keep_checkpoints,
                                   extra_weights=extra)
        self._barrier()
        return path or ""

    def _restore(self) -> None:
        from dpft.checkpoint import load_state_strict

        ckpt = load_resume_checkpoint(self.out, self.cfg.agent.name, self.cfg_node)
        if ckpt is None:
            return  # killed before its first checkpoint: start from the beginning
        latest = ckpt.dir
        from dpft.train_utils import apply_resume_compute

        warning = apply_resume_compute(self.cfg.num_threads, ckpt.meta, latest)  # the recorded threads when unset
        if warning and self.rank0:
            import sys

            print("dpft finetune: " + warning, file=sys.stderr, flush=True)
        ts = ckpt.training_state
        load_state_strict(self.model, ckpt.model_state, latest)
        a = self.agent
        a.critic.load_state_dict(ts["tensors"]["critic"])
        for k, o in a.optimizers().items():
            o.load_state_dict(ts["optimizers"][k])
        for k, s in a.schedulers().items():
            s.load_state_dict(ts["json"]["schedulers"][k])
            # the optimizer's restored lr is the OLD schedule's; with a changed iterations= the (linear) schedule is
            # the new one's, so every group's lr is recomputed from it at the restored step (unchanged otherwise)
            for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, getattr(s, "lr_lambdas", ())):
                group["lr"] = base * fn(s.last_epoch)
            s._last_lr = [group["lr"] for group in s.optimizer.param_groups]
        extra_ts = dict(ts["tensors"])
        if self.dist.enabled:  # (H-ddp) this rank's envs' rows of the saved carried returns (all envs)
            rs = dict(extra_ts["reward_scaler"])
            lo = self.dist.rank * self.local_envs
            rs["ret"] = torch.as_tensor(rs["ret"])[lo:lo + self.local_envs]
            extra_ts["reward_scaler"] = rs
        a.load_extra_tensors(extra_ts)
        a.train_iterations = int(ts["json"]["agent"]["train_iterations"])
        if self.inril is not None:  # (H-inril)
            self.inril.load_from(ts, latest)
        self.gen.set_state(ts["tensors"]["sampler_rng"]["state"])
        self.iteration = int(ts["step"]["iteration"])
        self.env_steps = int(ts["step"]["env_steps"])
        saved_world = int(ts["step"].get("world_size", 1))
        if saved_world != self.dist.world_size and self.rank0:
            import sys

            print("dpft finetune: warning: the checkpoint was written by %d process(es) and this run has %d; the "
                  "resume is not bit-exact (the ranks' sampling streams change)." % (saved_world, self.dist.world_size),
                  file=sys.stderr)
        if self.rank0 and not self.cfg.reset_at_iteration:
            import sys

            print("dpft finetune: warning: reset_at_iteration=false: the envs' mid-episode states are not in the "
                  "checkpoint, so the resumed run restarts them from fresh seeds and is not bit-exact.", file=sys.stderr)
        if self.rank0:
            print("dpft finetune: resumed from %s (iteration %d, %d env steps)" % (latest, self.iteration,
                                                                               self.env_steps))

    # ------------------------------------------------------------------ evaluation
    def eval_policy(self) -> Any:
        """A :class:`dpft.policy.Policy` of the current weights, acting exactly as the saved checkpoint will."""
        from dpft.policy import Policy

        a = self.agent
        normalizer = a.export_obs_norm(self.policy.normalizer) if hasattr(a, "export_obs_norm") else self.policy.normalizer
        if hasattr(a, "eval_policy"):  # IDQL: candidates chosen by the critics, as its checkpoint acts
            p = a.eval_policy(normalizer, self.meta)
        else:
            p = Policy(self.model, normalizer, self.meta, weights="model", device=self.device)
        self.model.train()
        return p

    def evaluate(self) -> Dict[str, Any]:
        from dpft.envs.rollout import rollout

        c = self.cfg
        t0 = time.perf_counter()
        res = rollout(self.eval_policy(), self.env, episodes=int(c.eval_episodes), seed=int(c.eval_seed),
                      deterministic=True, progress=False)
        self.model.train()
        rec = eval_record(res, time.perf_counter() - t0)
        limit = getattr(self.env, "max_episode_steps", None)
        if limit is not None:
            rec["eval/max_episode_steps"] = int(limit)
        return dict(rec, **self._heldout_il())

    def _heldout_il(self) -> Dict[str, Any]:
        """(H-inril) the IL loss on held-out demos at every evaluation (IN-RIL's Figure 8)."""
        if getattr(self, "inril", None) is None:
            return {}
        return {"eval/il_loss_heldout": self.inril.heldout_loss()}

    # ------------------------------------------------------------------ loop
    def run(self) -> str:
        from dpft.metrics import MetricsLogger

        c = self.cfg
        logger = MetricsLogger(self.out, use_wandb=c.logger == "wandb", wandb_project=c.wandb_project,
                               wandb_mode=c.wandb_mode, config_dict=self.config_dict, start_step=self.iteration,
                               rank0=self.rank0)
        if self.iteration == 0 and self.rank0:
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
        bar = None
        if c.progress and self.rank0:
            from tqdm import tqdm

            bar = tqdm(total=int(c.iterations), initial=self.iteration, desc="finetune %s" % c.agent.name,
                       dynamic_ncols=True)
        last = {}  # type: Dict[str, Any]
        evaluated = False
        try:
            if self.iteration == 0:  # the starting policy, on the same evaluation episodes
                rec = {"iteration": 0, "env_steps": 0}
                if self.rank0:  # (H-ddp) rank 0 evaluates, the others wait
                    rec.update(self.evaluate())
                self._barrier()
                logger.log(rec, step=0)
                last, evaluated = rec, True
            while self.iteration < int(c.iterations):
                if self.dp is not None:  # (H-ddp) each rank's sampling stream, derived: resume needs no state
                    from dpft.rl.data_parallel import rank_stream_seed

                    self.gen.manual_seed(rank_stream_seed(c.seed, self.dist.rank, self.iteration))
                if c.reset_at_iteration or evaluated or self.collector.raw_obs is None:
                    n, first = int(c.envs), self.dist.rank * self.local_envs  # global env indices of this rank
                    self.collector.reset([env_seed(c.seed, self.iteration, first + i, n)
                                          for i in range(self.local_envs)])
                    self.agent.reward_scaler.reset()
                t0 = time.perf_counter()
                ro = self.collector.collect(int(c.n_steps))
                t1 = time.perf_counter()
                info = self.agent.update(ro)
                t2 = time.perf_counter()
                self.iteration += 1
                eps, steps, nan_eps = self._gather_episodes(ro)
                self.env_steps += steps
                rec = {"iteration": self.iteration, "env_steps": self.env_steps,
                       "train/episodes": len(eps),
                       "train/success_rate": float(np.mean([e["success"] for e in eps]))
                       if eps and self.has_success else None,  # None: the task has no success signal
                       "train/return": float(np.mean([e["return"] for e in eps])) if eps else None,
                       "train/length": float(np.mean([e["length"] for e in eps])) if eps else None,
                       "train/failed_episodes": int(sum(e["failed"] for e in eps)),
                       "train/nan_episodes": int(nan_eps),
                       "time/env": ro.env_time, "time/inference": ro.policy_time, "time/update": t2 - t1,
                       "time/iteration": t2 - t0, "env_steps_per_s": steps / max(t2 - t0, 1e-9)}
                rec.update(info)
                final = self.iteration >= int(c.iterations)
                evaluated = final or bool(c.eval_every and self.iteration % int(c.eval_every) == 0)
                if evaluated:
                    if self.rank0:
                        rec.update(self.evaluate())
                    self._barrier()
                logger.log(rec, step=self.iteration)
                last = rec
                if bar is not None:
                    bar.update(1)
                    post = {"succ": _fmt(rec["train/success_rate"])} if self.has_success else {}
                    post.update({"ret": _fmt(rec["train/return"]), "steps": self.env_steps,
                                 "sps": int(rec["env_steps_per_s"])})
                    bar.set_postfix(post)
                if final or (c.save_every and self.iteration % int(c.save_every) == 0):
                    self._save()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        from dpft.checkpoint import find_latest

        if not self.rank0:  # (H-ddp)
            return find_latest(self.out) or self.out
        png = plot_finetune_curves(self.out)
        if self.inril is not None:  # (H-inril)
            from dpft.agents.inril import plot_alignment

            plot_alignment(self.out)
        final = find_latest(self.out)
        success = ("success %s, " % _fmt(last.get("eval/success_rate"))) if self.has_success else ""
        print("dpft finetune: done at iteration %d (%d env steps); eval %sreturn %s; checkpoint %s%s"
              % (self.iteration, self.env_steps, success, _fmt(last.get("eval/return")),
                 final, ("; curves " + png) if png else ""))
        return final or self.out

    # ------------------------------------------------------------------ data parallel (H-ddp)
    def _init_data_parallel(self) -> None:
        """Join torchrun's process group (gloo on CPU, NCCL on CUDA) and wait until rank 0 has opened ``out=``."""
        from dpft.train_utils import barrier, init_process_group

        if not self.dist.enabled:
            return
        from dpft.rl.data_parallel import DataParallel

        self._pg_owned = init_process_group(self.dist, self.device)
        self.dp = DataParallel(self.dist, self.device)
        barrier(self.dist)

    def _barrier(self) -> None:
        if self.dp is not None:
            self.dp.barrier()

    def _gather_episodes(self, ro: Any) -> Tuple[List[Dict[str, Any]], int, int]:
        """The iteration's finished episodes, env steps and NaN-cut episodes of all ranks (rank order)."""
        if self.dp is None:
            return list(ro.episodes), int(ro.env_steps), int(ro.nan_episodes)
        parts = self.dp.gather_objects((list(ro.episodes), int(ro.env_steps), int(ro.nan_episodes)))
        return ([e for p in parts for e in p[0]], sum(p[1] for p in parts), sum(p[2] for p in parts))

    def close(self) -> None:
        from dpft.train_utils import destroy_process_group

        if self.env is not None:
            self.env.close()
            self.env = None
        run_dir, self.run_dir = getattr(self, "run_dir", None), None
        if run_dir is not None:
            run_dir.close()
        owned, self._pg_owned = getattr(self, "_pg_owned", False), False
        destroy_process_group(owned)


def _check_data_parallel(c: Any, world_size: int) -> int:
    """(H-ddp) The envs per rank (``envs`` is the GLOBAL count); refuses what does not run data-parallel."""
    if world_size <= 1:
        return int(c.envs)
    if c.agent.name == "idql":
        raise DpftError("agent=idql does not run data-parallel (WORLD_SIZE=%d): its replay buffer, target networks "
                        "and replay-ratio step count are per process and are not synchronized across ranks. Run it "
                        "as a single process (without torchrun), or use agent=dppo, ppo or residual_ppo under "
                        "torchrun." % world_size)
    from dpft.agents.inril import inril_active

    if inril_active(c):
        raise DpftError("IN-RIL / CAIR (inril.m=%s, cair=%s) do not run data-parallel (WORLD_SIZE=%d): the IL steps, "
                        "demo batches and gradient statistics are per process. Run it as a single process, or set "
                        "inril.m=inf cair=false under torchrun." % (c.inril.m, c.cair.enabled, world_size))
    from dpft.train_utils import per_rank

    return per_rank("envs", c.envs, world_size, "the global number of environments")


def _fmt(x: Any) -> str:
    return "-" if x is None else ("%.3g" % x)


def plot_finetune_curves(run_dir: str, path: Optional[str] = None) -> Optional[str]:
    """``RUN_DIR/finetune_curves.png``: success rate and return against env steps, train and eval
    (:func:`dpft.plotting.plot_run`)."""
    from dpft.plotting import Panel, plot_run

    panels = [Panel("", [("train/%s" % key, "train"), ("eval/%s" % key, "eval")], ylabel=key.replace("_", " "))
              for key in ("success_rate", "return")]
    return plot_run(run_dir, panels, "finetune_curves.png", path=path, panel_size=(5.0, 3.6))


def finetune(cfg: Any) -> str:
    """Run ``dpft finetune`` for a composed config; returns the final checkpoint directory."""
    if str(cfg.agent.name) == "cmil":  # (H-cmil) its own loop: world model + imagination, agents/cmil.py
        from dpft.agents.cmil import cmil_train

        return cmil_train(cfg)
    trainer = Finetuner(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["finetune", "Finetuner", "bind_start_checkpoint", "AGENTS", "env_seed", "plot_finetune_curves"]
