"""Chunk-level replay buffer for off-policy fine-tuning (IDQL, issue 8).

One transition is one executed action chunk: the observation history the chunk was chosen from, the
executed chunk, the chunk reward (summed over ``act_steps``), the next observation history, and the two
episode flags. Per row::

    obs[key]       (To, *shape)    raw observation history (uint8 images stay uint8; floats as float32)
    chunk          (act_steps, Da) the executed actions, normalized action space
    reward         ()              chunk reward (after the run's reward scaling)
    next_obs[key]  (To, *shape)    history after the chunk; for a truncated or terminated step the
                                   FINAL observation of the episode (``info["final_obs"]``), never the
                                   reset observation of the next episode
    terminated     ()  bool        no bootstrap in the Q target
    truncated      ()  bool        time limit: the Q target still bootstraps V(next_obs)

Storage is preallocated, contiguous, ``capacity`` rows, written as a ring (the oldest rows are overwritten
first, DPPO's ``deque(maxlen)`` semantics, without re-copying the buffer every iteration as DPPO does:
``rl_recipes.md`` 7.6). Sampling is uniform with replacement (as DPPO and IDQL) from a ``torch.Generator``
so a seeded run is reproducible, and :meth:`ChunkReplayBuffer.state_dict` holds only tensors (the filled
rows plus ``pos``/``size``) so a resumed run samples exactly the same batches.

Deliberately *not* done here (the collector's job, ``rl_recipes.md`` 7.1): the collector must pass a copy
of the final observation as ``next_obs`` for finished episodes and keep the live (reset) observation for the
next chunk; DPPO's IDQL overwrites the live observation through a shallow copy.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from dpft.errors import DpftError

Spec = Mapping[str, Tuple[Sequence[int], torch.dtype]]

_SCALARS = (("reward", torch.float32), ("terminated", torch.bool), ("truncated", torch.bool))


def _storage_dtype(dtype: Any) -> torch.dtype:
    """uint8 (torch, numpy or by name) stays uint8 (images); everything else is stored as float32."""
    names = {str(dtype), getattr(dtype, "__name__", "")}
    return torch.uint8 if dtype == torch.uint8 or names & {"uint8", "torch.uint8"} else torch.float32


class ChunkReplayBuffer:
    """Ring buffer of chunk transitions (see the module docstring for the row layout).

    Args:
        capacity: number of transitions kept (DPPO: ``buffer_size x n_envs``).
        obs_spec: ``{key: (row shape (To, *shape), dtype)}``; uint8 keys are stored as uint8, the others as
            float32. :meth:`from_example` builds it from one batch of observations.
        chunk_shape: ``(act_steps, Da)``.
        device: where the storage lives (CPU by default; a GPU env may keep it on its device).
    """

    def __init__(self, capacity: int, obs_spec: Spec, chunk_shape: Sequence[int],
                 device: Union[str, torch.device] = "cpu"):
        if int(capacity) != capacity or int(capacity) < 1:
            raise DpftError("ChunkReplayBuffer capacity must be a positive integer, got {}.".format(capacity))
        if not obs_spec:
            raise DpftError("ChunkReplayBuffer needs at least one observation key in obs_spec.")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.chunk_shape = tuple(int(s) for s in chunk_shape)
        self.obs_spec = {str(k): (tuple(int(s) for s in shape), _storage_dtype(dtype))
                         for k, (shape, dtype) in obs_spec.items()}
        self.obs: Dict[str, torch.Tensor] = {}
        self.next_obs: Dict[str, torch.Tensor] = {}
        for key, (shape, dtype) in self.obs_spec.items():
            self.obs[key] = torch.zeros((self.capacity,) + shape, dtype=dtype, device=self.device)
            self.next_obs[key] = torch.zeros((self.capacity,) + shape, dtype=dtype, device=self.device)
        self.fields: Dict[str, torch.Tensor] = {
            "chunk": torch.zeros((self.capacity,) + self.chunk_shape, dtype=torch.float32, device=self.device)}
        for name, dtype in _SCALARS:
            self.fields[name] = torch.zeros(self.capacity, dtype=dtype, device=self.device)
        self.pos = 0  # next row to write
        self.size = 0  # filled rows

    @classmethod
    def from_example(cls, capacity: int, obs: Mapping[str, Any], chunk: Any,
                     device: Union[str, torch.device] = "cpu") -> "ChunkReplayBuffer":
        """Build the spec from one batch: ``obs {key: (B, To, *shape)}``, ``chunk (B, act_steps, Da)``."""
        spec = {}
        for key, value in obs.items():
            t = torch.as_tensor(value)
            spec[key] = (tuple(t.shape[1:]), t.dtype)
        return cls(capacity, spec, tuple(torch.as_tensor(chunk).shape[1:]), device=device)

    def __len__(self) -> int:
        return self.size

    def _rows(self, value: Any, shape: Tuple[int, ...], dtype: torch.dtype, name: str, batch: int) -> torch.Tensor:
        t = torch.as_tensor(value)
        want = (batch,) + shape
        if tuple(t.shape) != want:
            raise DpftError("ChunkReplayBuffer.add: {} has shape {}, expected {} (batch {}, row shape {}).".format(
                name, tuple(t.shape), want, batch, shape))
        if dtype == torch.uint8 and t.dtype != torch.uint8:
            raise DpftError("ChunkReplayBuffer.add: {} is stored as uint8 (images) but got dtype {}; pass the "
                            "raw uint8 observation, not a normalized one.".format(name, t.dtype))
        if dtype == torch.bool:
            t = t.bool()
        return t.to(device=self.device, dtype=dtype)

    def add(self, obs: Mapping[str, Any], chunk: Any, reward: Any, next_obs: Mapping[str, Any],
            terminated: Any, truncated: Any) -> None:
        """Append B transitions (torch tensors or numpy arrays; B = rows of ``chunk``).

        Shapes: ``obs``/``next_obs`` ``{key: (B, To, *shape)}``, ``chunk (B, act_steps, Da)``, ``reward``,
        ``terminated``, ``truncated`` ``(B,)``. Rows go to ``pos, pos+1, ...`` modulo ``capacity``; when
        ``B > capacity`` only the last ``capacity`` rows are kept (FIFO).
        """
        chunk = torch.as_tensor(chunk)
        batch = int(chunk.shape[0]) if chunk.dim() > 0 else -1
        for what, d in (("obs", obs), ("next_obs", next_obs)):
            if set(d) != set(self.obs_spec):
                raise DpftError("ChunkReplayBuffer.add: {} has keys {}, expected {}.".format(
                    what, sorted(d), sorted(self.obs_spec)))
        scalars = {"reward": reward, "terminated": terminated, "truncated": truncated}
        rows = {"chunk": self._rows(chunk, self.chunk_shape, torch.float32, "chunk", batch)}
        rows.update({name: self._rows(scalars[name], (), dtype, name, batch) for name, dtype in _SCALARS})
        obs_rows = {k: self._rows(obs[k], s, dt, "obs[{!r}]".format(k), batch) for k, (s, dt) in self.obs_spec.items()}
        next_rows = {k: self._rows(next_obs[k], s, dt, "next_obs[{!r}]".format(k), batch)
                     for k, (s, dt) in self.obs_spec.items()}
        if batch == 0:
            return
        skip = max(0, batch - self.capacity)
        start = (self.pos + skip) % self.capacity
        index = (torch.arange(batch - skip, device=self.device) + start) % self.capacity
        for store, new in ((self.fields, rows), (self.obs, obs_rows), (self.next_obs, next_rows)):
            for key, value in new.items():
                store[key][index] = value[skip:]
        self.pos = (self.pos + batch) % self.capacity
        self.size = min(self.capacity, self.size + batch)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[Union[str, torch.device]] = None) -> Dict[str, Any]:
        """``batch_size`` rows drawn uniformly with replacement by ``generator`` (its device must match the
        storage's).

        Returns ``{"obs": {key: (B, To, *shape)}, "chunk": (B, act_steps, Da), "reward": (B,),
        "next_obs": {...}, "terminated": (B,) bool, "truncated": (B,) bool, "index": (B,) long}`` on
        ``device`` (default: the storage's); images stay uint8.
        """
        if self.size == 0:
            raise DpftError("ChunkReplayBuffer.sample: the buffer is empty; collect transitions before updating "
                            "(increase the warm-up or check that training iterations add data).")
        if int(batch_size) < 1:
            raise DpftError("ChunkReplayBuffer.sample: batch_size must be >= 1, got {}.".format(batch_size))
        index = torch.randint(0, self.size, (int(batch_size),), generator=generator,
                              device=self.device if generator is None else generator.device)
        return self.gather(index.to(self.device), device=device)

    def gather(self, index: torch.Tensor, device: Optional[Union[str, torch.device]] = None) -> Dict[str, Any]:
        """The rows ``index (B,)`` (storage positions) in :meth:`sample`'s layout."""
        out_device = self.device if device is None else torch.device(device)
        batch: Dict[str, Any] = {k: v[index].to(out_device) for k, v in self.fields.items()}
        batch["obs"] = {k: v[index].to(out_device) for k, v in self.obs.items()}
        batch["next_obs"] = {k: v[index].to(out_device) for k, v in self.next_obs.items()}
        batch["index"] = index.to(out_device)
        return batch

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Flat tensors: ``obs/<key>``, ``next_obs/<key>``, ``chunk``, ``reward``, ``terminated``,
        ``truncated`` (the ``size`` filled rows, CPU), and 0-d int64 ``pos``, ``size``, ``capacity``."""
        state = {"pos": torch.tensor(self.pos, dtype=torch.int64), "size": torch.tensor(self.size, dtype=torch.int64),
                 "capacity": torch.tensor(self.capacity, dtype=torch.int64)}
        for key, value in self.fields.items():
            state[key] = value[:self.size].cpu().clone()
        for prefix, store in (("obs/", self.obs), ("next_obs/", self.next_obs)):
            for key, value in store.items():
                state[prefix + key] = value[:self.size].cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore exactly what :meth:`state_dict` returned (capacity, keys, shapes and dtypes checked)."""
        expected = {"pos", "size", "capacity"} | set(self.fields)
        expected |= {"obs/" + k for k in self.obs_spec} | {"next_obs/" + k for k in self.obs_spec}
        if set(state) != expected:
            raise DpftError("ChunkReplayBuffer state has keys {}, expected {} (saved with other observation keys?)."
                            .format(sorted(state), sorted(expected)))
        capacity, size, pos = (int(state[k]) for k in ("capacity", "size", "pos"))
        if capacity != self.capacity or not (0 <= size <= capacity) or not (0 <= pos < capacity):
            raise DpftError("ChunkReplayBuffer state has capacity={} size={} pos={}, but this buffer has capacity={}; "
                            "keep the replay size unchanged when resuming.".format(capacity, size, pos, self.capacity))
        stores = [(k, self.fields[k]) for k in self.fields]
        stores += [("obs/" + k, self.obs[k]) for k in self.obs_spec] + [("next_obs/" + k, self.next_obs[k])
                                                                        for k in self.obs_spec]
        for key, store in stores:
            value = state[key]
            if tuple(value.shape) != (size,) + tuple(store.shape[1:]) or value.dtype != store.dtype:
                raise DpftError("ChunkReplayBuffer state {!r} is {} {}, expected {} {}.".format(
                    key, value.dtype, tuple(value.shape), store.dtype, (size,) + tuple(store.shape[1:])))
        for key, store in stores:
            store.zero_()
            store[:size] = state[key].to(self.device)
        self.pos, self.size = pos, size
