"""Pretraining loop: behaviour cloning of a diffusion or Gaussian policy on a robomimic HDF5 file.

Python use (the CLI ``dpft pretrain key=value ...`` calls the same function)::

    from dpft.config import compose
    from dpft.agents.pretrain import pretrain
    cfg = compose("pretrain", ["dataset=low_dim.hdf5", "out=runs/can", "steps=5000"])
    ckpt_dir = pretrain(cfg)               # runs/can/checkpoints/step_00005000
    policy = dpft.load_policy("runs/can")  # EMA weights

One step (:meth:`Pretrainer.train_step`): sample a batch, ``loss = model.loss(batch, generator)``,
backward, clip the gradient norm to ``grad_clip``, AdamW (``lr``, ``weight_decay``), the LR schedule
(linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``), then the EMA
update. The loss is accumulated on the device and read every ``log_every`` steps (no per-step sync).
Every ``val_every`` steps the EMA weights are scored on the validation demos with a fixed, separate
generator (the same noise each time, and the training random stream is never touched). Checkpoints are
written every ``save_every`` steps and at the end (see :mod:`dpft.checkpoint`).

Randomness: the model is initialized from ``seed``; ALL training randomness (batch indices, diffusion
timesteps and noise, image augmentation) comes from one ``torch.Generator`` seeded ``seed * 1000 + rank``
whose state is saved in every checkpoint with the global Python/numpy/torch RNG. ``resume=true`` restores
weights, EMA, optimizer, scheduler, RNG and step from the newest complete checkpoint in ``out``, so a run
killed at any moment and restarted with the same command plus ``resume=true`` ends with bit-identical
weights (on CPU, same machine and thread count) to a run that was never interrupted.

Run directory: before any data is read, ``out`` is opened with :func:`dpft.rundir.open_run_dir` (kind
``pretrain``): created and write-checked, locked for the life of the process (a second run into it fails
naming the holder's pid), a non-empty non-dpft directory is refused untouched, and a run that already holds a
checkpoint needs ``resume=true`` (continue) or ``overwrite=true`` (delete it and start over).

Resume rules: only :data:`RESUME_MAY_CHANGE` may differ from the checkpoint's config (run length and
bookkeeping: ``steps``, ``save_every``, ``val_every``, ``log_every``, ``keep_checkpoints``, ``device``,
``num_threads``, logging, ``progress``, the paths ``out``/``dataset`` -- the dataset's content is checked
through the normalizer statistics). The LR schedule is fixed when the run starts: it spans the first run's
``steps`` (``schedule_steps`` in step.json) and is never restarted. A smaller ``steps=`` stops early on that
schedule; a larger one continues past its end at the final rate ``min_lr_ratio * lr`` and is refused when that
rate is 0 (the default ``min_lr_ratio=0``), since the extra steps would not change the weights. ``resume=true``
on a run killed before its first checkpoint starts at step 0 (a note says so; the metrics it logged are kept
in ``metrics.restarted-<n>.jsonl``).

Data parallel: launched under ``torchrun --nproc_per_node N -m dpft.cli pretrain ...`` (env ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), each rank trains on ``batch_size // N`` samples per step (``batch_size`` is
the GLOBAL batch and must be divisible by N) drawn with its own generator; DistributedDataParallel averages
the gradients, so one step sees ``batch_size`` samples in total, exactly as a single process would. The
backend is gloo on CPU and nccl on CUDA. Rank 0 writes checkpoints (holding every rank's generator state,
so resume is exact under DDP too) and metrics.

Test hook: the environment variable ``DPFT_TEST_KILL_AT_STEP=k`` makes the process SIGKILL itself right
after step ``k`` (used by the exact-resume test to simulate a crash between checkpoints).
"""
from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from dpft import checkpoint as ckpt_lib
from dpft.config import ROBOMIMIC_LOW_DIM_KEYS, PretrainConfig, to_object, to_yaml
from dpft.data import build_datasets
from dpft.data.hdf5 import resolve_obs_keys
from dpft.ema import EMA
from dpft.errors import DpftError
from dpft.metrics import MetricsLogger, plot_loss_curve
from dpft.models import build_policy_model, policy_spec
from dpft.rng import capture_rng_state, restore_rng_state, seed_everything
from dpft.rundir import RunDir, open_run_dir
from dpft.train_utils import (  # noqa: F401  (re-exported: older imports name them here)
    DistInfo,
    _grad_norm,
    all_gather_objects,
    barrier,
    clip_grad_norm,
    config_differences as _config_differences,
    cosine_warmup_lambda,
    count_parameters,
    destroy_process_group,
    dist_info_from_env,
    init_process_group,
    per_rank,
    resolve_device,
)

#: the validation generator is seeded ``seed + VALID_SEED_OFFSET`` at every validation
VALID_SEED_OFFSET = 7919

#: config keys that may change between a run and its resume (the rest must match the checkpoint)
RESUME_MAY_CHANGE = frozenset([
    "steps", "save_every", "val_every", "log_every", "keep_checkpoints", "device", "num_threads", "resume",
    "logger", "wandb_project", "wandb_mode", "progress", "out", "dataset", "overwrite",
])


def resume_schedule_steps(ckpt: ckpt_lib.Checkpoint, cfg: Any) -> int:
    """The LR schedule length of a resumed run, after checking the requested ``steps=`` against it.

    The warm-up + cosine schedule is fixed when a run starts: it spans the first run's ``steps`` (recorded in
    step.json as ``schedule_steps``; older checkpoints: their config's ``steps``) and never restarts.
    ``steps=`` on resume only moves the stop: fewer steps stop early on the same schedule; more steps continue
    after the schedule's end at its final learning rate ``min_lr_ratio * lr``. With ``min_lr_ratio=0`` that rate
    is 0 and extra steps would leave the weights unchanged, so a longer budget is refused.
    """
    from dpft.config import from_yaml_text

    info = (ckpt.training_state or {}).get("step") or {}
    sched = info.get("schedule_steps")
    if sched is None:
        sched = from_yaml_text(ckpt.config_yaml, PretrainConfig, source=os.path.join(ckpt.dir, "config.yaml")).steps
    sched = int(sched)
    steps = int(cfg.steps)
    if steps > sched and steps > ckpt.step:
        final_lr = float(cfg.lr) * float(cfg.min_lr_ratio)
        if final_lr <= 0:
            raise DpftError(
                "resume=true with steps=%d, but the run's learning-rate schedule ends at step %d with min_lr_ratio=%s, "
                "i.e. learning rate 0: the extra steps would not change the weights. dpft does not restart the "
                "cosine schedule on resume. Resume with steps<=%d, or start a new run (new out=) with the longer "
                "steps= (a run started with min_lr_ratio>0 can be extended at its final learning rate)."
                % (steps, sched, cfg.min_lr_ratio, sched))
        if int(os.environ.get("RANK", "0")) == 0:
            print("dpft pretrain: steps=%d extends the run past its learning-rate schedule (%d steps): steps %d..%d "
                  "train at the final learning rate min_lr_ratio * lr = %g (the cosine schedule is not restarted)."
                  % (steps, sched, sched + 1, steps, final_lr), flush=True)
    return sched

KILL_ENV = "DPFT_TEST_KILL_AT_STEP"


# ---------------------------------------------------------------------------------------------- helpers
def config_differences(saved_yaml: str, cfg: Any, may_change: Any = RESUME_MAY_CHANGE) -> List[Tuple[str, Any, Any]]:
    """``(key, saved, requested)`` for every pretraining config key that differs and may not change on resume."""
    return _config_differences(saved_yaml, cfg, may_change, schema=PretrainConfig)


class _LossForward(nn.Module):
    """Routes ``forward`` to ``model.loss`` so DistributedDataParallel sees the training computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, Any], generator: torch.Generator):  # type: ignore[override]
        return self.model.loss(batch, generator)


# ---------------------------------------------------------------------------------------------- trainer
class Pretrainer:
    """Holds everything a pretraining run needs; :meth:`run` trains to ``cfg.steps``.

    Construction sets up the process group (under torchrun), device, data (normalizer fitted on the
    train split), model, AdamW, LR schedule, EMA, and restores a checkpoint when ``cfg.resume``.
    :meth:`train_step` is one full optimizer step as the loop runs it (``tools/bench_pretrain.py`` times it).

    Attributes: ``cfg`` (DictConfig), ``model`` (unwrapped), ``ema`` (None when ``ema_decay == 0``),
    ``optimizer``, ``scheduler``, ``generator``, ``train_ds``, ``valid_ds``, ``normalizer``, ``info``
    (dataset facts), ``step``, ``dist`` (:class:`DistInfo`), ``device``, ``per_rank_batch``.
    """

    def __init__(self, cfg: Any):
        from omegaconf import OmegaConf

        if isinstance(cfg, PretrainConfig):
            cfg = OmegaConf.structured(cfg)
        to_object(cfg).validate()
        cfg = copy.deepcopy(cfg)  # obs_keys may be resolved below; the caller's config stays as it was
        self.cfg = cfg
        self.out = os.path.abspath(os.path.expanduser(str(cfg.out)))
        self.dist = dist_info_from_env()
        self.rank0 = self.dist.rank == 0
        self._pg_owned = False
        if cfg.num_threads:  # before open_run_dir, which records the resolved count in run.json
            torch.set_num_threads(int(cfg.num_threads))
        # before any data or model work: out= is created, writable, ours (locked) and resumable as asked
        self.run_dir = (open_run_dir(self.out, "pretrain", resume=bool(cfg.resume), overwrite=bool(cfg.overwrite),
                                     inputs={"dataset": cfg.dataset})
                        if self.rank0 else None)  # type: Optional[RunDir]
        try:
            self._setup(cfg)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: Any) -> None:
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        if cfg.num_threads:
            torch.set_num_threads(int(cfg.num_threads))
        self.per_rank_batch = per_rank("batch_size", cfg.batch_size, self.dist.world_size, "the global batch")
        self._kill_at = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
        # obs_keys left at robomimic's default on a file without those keys (Gym-style `obs`): the file's keys
        keys, note = resolve_obs_keys(cfg.dataset, list(cfg.obs_keys), ROBOMIMIC_LOW_DIM_KEYS)
        if note is not None:
            cfg.obs_keys = keys  # recorded in config.yaml, so a resume compares the keys actually used
            if self.rank0:
                print("dpft pretrain: " + note, flush=True)
        self._init_process_group()

        # ---- where do we start? (open_run_dir refused an existing run with checkpoints unless resume/overwrite)
        resume_ckpt = None  # type: Optional[ckpt_lib.Checkpoint]
        latest = ckpt_lib.find_latest(self.out) if os.path.isdir(self.out) and not cfg.overwrite else None
        self.schedule_steps = int(cfg.steps)
        if cfg.resume and latest is None:
            pass  # stopped before its first save: open_run_dir printed that it starts over (metrics kept)
        elif cfg.resume:
            try:
                resume_ckpt = ckpt_lib.load_checkpoint(latest, training_state=True)
            except ckpt_lib.ChecksumError as e:
                older = [c for c in ckpt_lib.list_checkpoints(self.out) if c != latest]
                raise DpftError("resume=true: %s%s" % (
                    str(e).split(" Restore the file")[0],
                    (" To resume from the previous checkpoint (%s), delete '%s'." % (os.path.basename(older[-1]), latest))
                    if older else " The run has no older checkpoint; restore the file or start over with "
                    "overwrite=true.")) from None
            diffs = config_differences(resume_ckpt.config_yaml, cfg)
            if diffs:
                desc = "; ".join("%s: checkpoint %r, requested %r" % d for d in diffs)
                raise DpftError("resume=true but the request differs from the checkpoint '%s' in keys that must not "
                                "change during a run: %s. Resume with the run's settings (only %s may change) or "
                                "start a new run with a new out=."
                                % (latest, desc, ", ".join(sorted(RESUME_MAY_CHANGE))))
            self.schedule_steps = resume_schedule_steps(resume_ckpt, cfg)
            from dpft.train_utils import apply_resume_compute

            warning = apply_resume_compute(cfg.num_threads, resume_ckpt.meta, latest)  # recorded threads if unset
            if warning and self.rank0:
                print("dpft pretrain: " + warning, file=sys.stderr, flush=True)
        elif latest is not None:  # DDP ranks other than 0 (rank 0's open_run_dir refused this already)
            raise DpftError("out='%s' already holds a run with checkpoints (newest: %s). Pass resume=true to continue "
                            "it, or choose a new out= directory." % (self.out, os.path.basename(latest)))

        # ---- data, model, optimization
        self.train_ds, self.valid_ds, self.normalizer, self.info = build_datasets(
            cfg.dataset, list(cfg.obs_keys), cfg.horizon_steps, cfg.cond_steps,
            train_filter_key=cfg.data.train_filter_key, valid_filter_key=cfg.data.valid_filter_key,
            valid_ratio=cfg.data.valid_ratio, seed=cfg.seed, device=self.device)
        seed_everything(cfg.seed)  # identical initialization on every rank
        self.model = build_policy_model(cfg.policy, self.info["obs_shapes"], self.info["obs_dim"],
                                        self.info["image_keys"], self.info["action_dim"], cfg.horizon_steps,
                                        cfg.cond_steps).to(self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # foreach: one fused kernel per op over all tensors (about 1.5x faster than the per-tensor loop on CPU)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        self._lr_fn = cosine_warmup_lambda(cfg.warmup_steps, self.schedule_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_fn)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.eval_model = None  # type: Optional[nn.Module]
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.step = 0
        self.meta = self._build_meta()
        self.config_yaml = to_yaml(cfg)

        # on-device accumulators, read every log_every steps
        self._loss_sum = torch.zeros((), device=self.device)
        self._gn_sum = torch.zeros((), device=self.device)
        self._acc_steps = 0
        self._data_time = 0.0
        self._update_time = 0.0
        self._last_info = {}  # type: Dict[str, torch.Tensor]
        self._grad_norm_last = None  # type: Optional[torch.Tensor]

        if resume_ckpt is not None:
            self._restore(resume_ckpt)

        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # broadcast_buffers=False: the models have no BatchNorm, their buffers (noise schedule) never change
            self._loss_fn = DDP(_LossForward(self.model), device_ids=ids, broadcast_buffers=False)  # type: Callable
        else:
            self._loss_fn = self.model.loss

    # ------------------------------------------------------------------ setup pieces
    def _init_process_group(self) -> None:
        self._pg_owned = init_process_group(self.dist, self.device)

    def _build_meta(self) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        return {
            "policy": str(cfg.policy.name),
            "policy_type": "gaussian" if cfg.policy.name == "gaussian_mlp" else "diffusion",
            # (H-model) what dpft.load_policy builds from, without this run's config schema
            "policy_kind": "gaussian" if cfg.policy.name == "gaussian_mlp" else "diffusion",
            "policy_spec": policy_spec(cfg.policy),
            "obs_keys": list(info["obs_keys"]),
            "low_dim_keys": list(info["low_dim_keys"]),
            "image_keys": list(info["image_keys"]),
            "obs_shapes": {k: list(v) for k, v in info["obs_shapes"].items()},
            "obs_dim": int(info["obs_dim"]),
            "state_slices": {k: list(v) for k, v in info["state_slices"].items()},
            "action_dim": int(info["action_dim"]),
            "horizon_steps": int(cfg.horizon_steps),
            "cond_steps": int(cfg.cond_steps),
            "act_steps": int(cfg.act_steps),
            "denoising_steps": int(cfg.policy.denoising_steps) if cfg.policy.name != "gaussian_mlp" else None,
            "env_args": dict(info["env_args"]),
            "dataset": os.path.abspath(str(cfg.dataset)),
            # (H-inril) how the demos were split: fine-tuning with IN-RIL rebuilds the same train/held-out demos
            "data_split": {"train_filter_key": cfg.data.train_filter_key, "valid_filter_key": cfg.data.valid_filter_key,
                           "valid_ratio": float(cfg.data.valid_ratio), "seed": int(cfg.seed), "source": info["split"]},
            "train_demos": len(info["train_demos"]),
            "valid_demos": len(info["valid_demos"]),
        }

    def _restore(self, ckpt: ckpt_lib.Checkpoint) -> None:
        saved_norm = ckpt.normalizer.state_dict()
        fitted = self.normalizer.state_dict()
        if set(saved_norm) != set(fitted) or any(not torch.equal(saved_norm[k], fitted[k]) for k in fitted):
            raise DpftError("The normalization statistics fitted on '%s' differ from those in checkpoint '%s': the "
                            "dataset changed since the run started. Resume with the original file or start a new "
                            "run." % (self.cfg.dataset, ckpt.dir))
        ckpt_lib.load_state_strict(self.model, ckpt.model_state, os.path.join(ckpt.dir, ckpt_lib.MODEL_FILE))
        ts = ckpt.training_state or {}
        step_info = ts.get("step") or {}
        if self.ema is not None:
            if ckpt.ema_state is None:
                raise DpftError("Checkpoint '%s' has no ema.safetensors but ema_decay=%s; it was written with "
                                "ema_decay=0." % (ckpt.dir, self.cfg.ema_decay))
            self.ema.load_state_dict(ckpt.ema_state, int(step_info.get("ema_step", ckpt.step)))
        if ts.get("optimizer") is None or ts.get("scheduler") is None:
            raise DpftError("Checkpoint '%s' lacks optimizer.json/scheduler.json in training_state/; it cannot be "
                            "resumed exactly." % ckpt.dir)
        try:
            self.optimizer.load_state_dict(ts["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise DpftError("The optimizer state in '%s' does not fit the model (%s)." % (ckpt.dir, e)) from None
        self.scheduler.load_state_dict(ts["scheduler"])
        self.step = int(ckpt.step)
        accs = step_info.get("accumulators") or []
        acc = accs[self.dist.rank] if self.dist.rank < len(accs) else {}
        self._loss_sum.fill_(float(acc.get("loss_sum", 0.0)))
        self._gn_sum.fill_(float(acc.get("grad_norm_sum", 0.0)))
        self._acc_steps = int(acc.get("steps", 0))
        rngs = ts.get("rng") or []
        saved_world = int(step_info.get("world_size", len(rngs) or 1))
        if saved_world != self.dist.world_size and self.rank0:
            print("dpft pretrain: warning: the checkpoint was written by %d process(es) and this run has %d; the "
                  "resume is not bit-exact (per-rank batches and random streams change)." %
                  (saved_world, self.dist.world_size), file=sys.stderr)
        if self.dist.rank < len(rngs):
            tensors, rinfo = rngs[self.dist.rank]
            restore_rng_state(tensors, rinfo, {"train": self.generator},
                              source="%s/training_state (rank %d)" % (ckpt.dir, self.dist.rank))
        else:  # a rank that did not exist when the checkpoint was written: fresh, step-dependent stream
            self.generator.manual_seed((self.cfg.seed * 1000 + self.dist.rank) * 1000003 + self.step)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> None:
        """One optimizer step: sample, loss, backward, clip, AdamW, LR schedule, EMA (no host sync)."""
        t0 = time.perf_counter()
        batch = self.train_ds.sample(self.per_rank_batch, self.generator)
        t1 = time.perf_counter()
        loss, info = self._loss_fn(batch, self.generator)
        loss.backward()
        if self.cfg.grad_clip > 0:
            self._gn_sum.add_(clip_grad_norm(self.params, self.cfg.grad_clip))
        elif (self.step + 1) % self.cfg.log_every == 0:
            self._grad_norm_last = _grad_norm(self.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self._loss_sum.add_(loss.detach())
        self._last_info = info
        self._acc_steps += 1
        self.step += 1
        t2 = time.perf_counter()
        self._data_time += t1 - t0
        self._update_time += t2 - t1

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> Optional[float]:
        """Mean loss of the EMA weights (live weights without EMA) over every validation window, with a
        generator seeded ``seed + VALID_SEED_OFFSET`` (same t and noise at every validation)."""
        if self.valid_ds is None:
            return None
        if self.eval_model is None:
            self.eval_model = copy.deepcopy(self.model)
        if self.ema is not None:
            self.ema.copy_to(self.eval_model)
        else:
            self.eval_model.load_state_dict(self.model.state_dict())
        self.eval_model.eval()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.seed + VALID_SEED_OFFSET)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        for batch in self.valid_ds.iter_batches(self.cfg.batch_size):
            loss, _ = self.eval_model.loss(batch, gen)
            b = batch["actions"].shape[0]
            total += loss.double() * b
            n += b
        return float(total.item() / max(n, 1))

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[str]:
        """Write a checkpoint of the current step (rank 0 writes; every rank's RNG is gathered)."""
        mine = {"rng": capture_rng_state({"train": self.generator}),
                "accumulators": {"loss_sum": float(self._loss_sum.item()),
                                 "grad_norm_sum": float(self._gn_sum.item()), "steps": self._acc_steps}}
        gathered = all_gather_objects(mine, self.dist)
        rngs = [g["rng"] for g in gathered]
        path = None
        if self.rank0:
            training_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "step": {
                    "step": self.step,
                    "world_size": self.dist.world_size,
                    "batch_size": int(self.cfg.batch_size),
                    "per_rank_batch_size": self.per_rank_batch,
                    "ema_step": self.ema.step if self.ema is not None else 0,
                    # the LR schedule's length: the first run's steps (a longer steps= on resume keeps it)
                    "schedule_steps": self.schedule_steps,
                    # partial sums of the current logging window, per rank (exact metrics after resume)
                    "accumulators": [g["accumulators"] for g in gathered],
                },
            }
            path = ckpt_lib.save_checkpoint(
                self.out, self.step, self.model.state_dict(),
                self.ema.state_dict() if self.ema is not None else None, self.normalizer, self.meta,
                self.config_yaml, training_state, keep=int(self.cfg.keep_checkpoints))
        self._barrier()
        return path or os.path.join(self.out, ckpt_lib.CHECKPOINTS, ckpt_lib.step_dir_name(self.step))

    def _barrier(self) -> None:
        barrier(self.dist)

    # ------------------------------------------------------------------ logging
    def _collect_metrics(self, elapsed: float) -> Dict[str, Any]:
        n = max(self._acc_steps, 1)
        loss_sum = self._loss_sum
        if self.dist.enabled:
            import torch.distributed as dist

            loss_sum = loss_sum.clone()
            dist.all_reduce(loss_sum)
            loss_sum /= self.dist.world_size
        loss = float(loss_sum.item()) / n
        if not math.isfinite(loss):
            raise DpftError("Training diverged: the mean loss over the last %d steps is %s at step %d. Lower lr "
                            "(now %g) or check the dataset for extreme values (dpft data info)." %
                            (n, loss, self.step, self.cfg.lr))
        rec = {"loss": loss, "lr": self.cfg.lr * self._lr_fn(self.step - 1)}  # type: Dict[str, Any]
        if self.cfg.grad_clip > 0:
            rec["grad_norm"] = float(self._gn_sum.item()) / n
        elif self._grad_norm_last is not None:
            rec["grad_norm"] = float(self._grad_norm_last.item())
        for k, v in self._last_info.items():
            if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1:
                rec[k] = float(v.item())
        rec["samples_per_s"] = self.cfg.batch_size * self._acc_steps / max(elapsed, 1e-9)
        rec["data_time"] = self._data_time / n
        rec["update_time"] = self._update_time / n
        rec["epoch"] = self.step * self.cfg.batch_size / max(len(self.train_ds), 1)  # global samples / windows
        self._loss_sum.zero_()
        self._gn_sum.zero_()
        self._acc_steps = 0
        self._data_time = 0.0
        self._update_time = 0.0
        return rec

    def _summary(self) -> str:
        info, cfg = self.info, self.cfg
        def demos(n: int) -> str:
            return "1 demo" if n == 1 else "%d demos" % n

        valid = ("%d valid windows (%s)" % (info["num_valid_windows"], demos(len(info["valid_demos"])))
                 if self.valid_ds is not None else "no validation split")
        lines = [
            "dpft pretrain: %s on %s" % (cfg.policy.name, cfg.dataset),
            "  data: %d train windows (%s), %s; obs_dim %d, action_dim %d, images %s"
            % (info["num_train_windows"], demos(len(info["train_demos"])), valid, info["obs_dim"], info["action_dim"],
               info["image_keys"] or "none"),
            "  model: %s parameters; horizon_steps %d, cond_steps %d, act_steps %d"
            % (count_parameters(self.model), cfg.horizon_steps, cfg.cond_steps, cfg.act_steps),
            "  device %s, %d process(es), global batch %d (%d per process), steps %d%s"
            % (self.device, self.dist.world_size, cfg.batch_size, self.per_rank_batch, cfg.steps,
               ((", resuming at step %d" % self.step) if self.step else "")
               + ((", LR schedule over %d steps" % self.schedule_steps) if self.schedule_steps != cfg.steps else "")),
            "  run dir: %s" % self.out,
        ]
        lines.extend("  warning: %s" % w for w in info.get("warnings", []))
        return "\n".join(lines)

    # ------------------------------------------------------------------ loop
    def run(self) -> str:
        """Train to ``cfg.steps``; returns the final checkpoint directory."""
        from tqdm import tqdm

        _c = ckpt_lib
        cfg = self.cfg
        if self.rank0:
            os.makedirs(self.out, exist_ok=True)
            _c.clean_stale_tmp(self.out)
            _c.write_text_atomic(os.path.join(self.out, _c.CONFIG_FILE), self.config_yaml)
            print(self._summary(), flush=True)
        logger = MetricsLogger(self.out, use_wandb=cfg.logger == "wandb", wandb_project=cfg.wandb_project,
                               wandb_mode=cfg.wandb_mode, config_dict=_plain_config(cfg), rank0=self.rank0,
                               start_step=self.step)
        if self.step >= cfg.steps:
            logger.close()
            latest = _c.find_latest(self.out)
            if self.rank0:
                print("dpft pretrain: the run is already at step %d >= steps=%d; nothing to do."
                      % (self.step, cfg.steps))
            return latest or ""
        bar = tqdm(total=cfg.steps, initial=self.step, desc="pretrain", dynamic_ncols=True,
                   disable=not (cfg.progress and self.rank0), file=sys.stdout)
        last_saved = self.step
        final = None  # type: Optional[str]
        try:
            t_window = time.perf_counter()
            while self.step < cfg.steps:
                self.train_step()
                bar.update(1)
                step = self.step
                if self._kill_at is not None and step == self._kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    rec = self._collect_metrics(now - t_window)
                    if cfg.val_every and step % cfg.val_every == 0 and self.rank0:
                        v = self.validate()
                        if v is not None:
                            rec["valid_loss"] = v
                    logger.log(rec, step)
                    bar.set_postfix(loss="%.4g" % rec["loss"], sps="%.0f" % rec["samples_per_s"], refresh=False)
                    t_window = time.perf_counter()
                elif cfg.val_every and step % cfg.val_every == 0 and self.rank0:
                    v = self.validate()
                    if v is not None:
                        logger.log({"valid_loss": v}, step)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    t_save = time.perf_counter()
                    final = self.save()
                    last_saved = step
                    t_window += time.perf_counter() - t_save  # checkpoint time is not training throughput
            if last_saved != self.step:
                final = self.save()
        finally:
            bar.close()
            logger.close()
        if self.rank0:
            png = plot_loss_curve(self.out)
            print("dpft pretrain: done at step %d; checkpoint %s%s" % (
                self.step, final, ("; loss curve %s" % png) if png else ""), flush=True)
        return final or ""

    def close(self) -> None:
        """Tear down the process group this trainer created and release the run directory's lock."""
        run_dir, self.run_dir = getattr(self, "run_dir", None), None
        if run_dir is not None:
            run_dir.close()
        owned, self._pg_owned = self._pg_owned, False
        destroy_process_group(owned)


def _plain_config(cfg: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def pretrain(cfg: Any) -> str:
    """Run pretraining for a composed config (``dpft.config.compose("pretrain", overrides)``).

    ``batch_size`` is the GLOBAL batch: under torchrun with N processes each one trains on
    ``batch_size // N`` samples per step. Returns the final checkpoint directory (on every rank).
    """
    trainer = Pretrainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["Pretrainer", "pretrain", "cosine_warmup_lambda", "config_differences", "resolve_device",
           "dist_info_from_env", "DistInfo", "RESUME_MAY_CHANGE", "VALID_SEED_OFFSET"]
