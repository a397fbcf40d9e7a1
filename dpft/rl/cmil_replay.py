"""Sequence replay for CMIL's world model: whole episodes in one ring of steps, sampled as fixed-length windows.

Storage follows :class:`dpft.rl.replay.ChunkReplayBuffer`'s conventions: preallocated CPU tensors, images as
uint8 ``(H, W, C)``, low-dim data float32, a ``state_dict`` of plain tensors for the checkpoint. Each step ``t``
holds DreamerV2's alignment: ``image[t]`` (+ ``proprio[t]``), ``action[t]`` = the normalized action that *led
to* observation ``t`` (zeros at an episode's first step) and ``is_first[t]``.

There is no reward field: CMIL never learns from env rewards, so the replay does not store them.

Episodes are appended whole (:meth:`add_episode`); the oldest steps are overwritten when the ring is full. A
sampled window is ``length`` consecutive stored steps (it may cross episode boundaries: ``is_first`` restarts the
latent there, as in DreamerV2); its first step is always marked ``is_first`` (the filter starts from zeros).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from dpft.errors import DpftError


class SequenceReplay:
    """Ring of ``capacity`` steps; see the module docstring."""

    def __init__(self, capacity: int, image_shape: Sequence[int], action_dim: int, proprio_dim: int = 0):
        if int(capacity) < 1:
            raise DpftError("SequenceReplay capacity must be >= 1, got %s." % capacity)
        self.capacity = int(capacity)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.action_dim, self.proprio_dim = int(action_dim), int(proprio_dim)
        self.image = torch.zeros((self.capacity,) + self.image_shape, dtype=torch.uint8)
        self.action = torch.zeros(self.capacity, self.action_dim, dtype=torch.float32)
        self.proprio = torch.zeros(self.capacity, self.proprio_dim, dtype=torch.float32)
        self.is_first = torch.zeros(self.capacity, dtype=torch.bool)
        self.pos = 0  # next write index
        self.size = 0  # valid steps
        self.episodes = 0  # episodes added

    def __len__(self) -> int:
        return self.size

    def add_episode(self, image: Any, action: Any, proprio: Optional[Any] = None) -> None:
        """Append one episode: ``image`` uint8 ``(T, H, W, C)``, ``action`` ``(T, A)`` (``action[0]`` is ignored
        and stored as zeros), ``proprio`` ``(T, P)`` when ``proprio_dim > 0``."""
        img = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
        act = torch.as_tensor(action, dtype=torch.float32)
        t = int(img.shape[0])
        if t < 1:
            return
        if img.dtype != torch.uint8 or tuple(img.shape[1:]) != self.image_shape:
            raise DpftError("SequenceReplay.add_episode: images must be uint8 (T, %s), got %s %s."
                            % (", ".join(map(str, self.image_shape)), img.dtype, tuple(img.shape)))
        if tuple(act.shape) != (t, self.action_dim):
            raise DpftError("SequenceReplay.add_episode: actions must be (T, A) = (%d, %d), got %s."
                            % (t, self.action_dim, tuple(act.shape)))
        if self.proprio_dim:
            if proprio is None:
                raise DpftError("SequenceReplay.add_episode: this replay stores %d proprio dims; pass proprio."
                                % self.proprio_dim)
            pro = torch.as_tensor(proprio, dtype=torch.float32).reshape(t, self.proprio_dim)
        if t > self.capacity:  # keep the newest part
            img, act = img[-self.capacity:], act[-self.capacity:]
            if self.proprio_dim:
                pro = pro[-self.capacity:]
            t = self.capacity
        idx = (torch.arange(t) + self.pos) % self.capacity
        act = act.clone()
        act[0] = 0.0
        first = torch.zeros(t, dtype=torch.bool)
        first[0] = True
        self.image[idx] = img
        self.action[idx] = act
        self.is_first[idx] = first
        if self.proprio_dim:
            self.proprio[idx] = pro
        self.pos = int((self.pos + t) % self.capacity)
        self.size = int(min(self.capacity, self.size + t))
        self.episodes += 1

    def sample(self, batch: int, length: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """``batch`` windows of ``length`` steps: ``image`` uint8 ``(B, L, H, W, C)``, ``action`` ``(B, L, A)``,
        ``is_first`` ``(B, L)`` (column 0 True), ``proprio`` ``(B, L, P)`` when stored. Starts are uniform over
        the stored windows (``generator`` drives them)."""
        length = int(length)
        if self.size < length:
            raise DpftError("SequenceReplay.sample: %d steps stored, fewer than one window of %d; add episodes or "
                            "lower cmil.seq_len." % (self.size, length))
        n_starts = self.size - length + 1
        start = torch.randint(n_starts, (int(batch),), generator=generator)
        oldest = (self.pos - self.size) % self.capacity
        idx = (oldest + start[:, None] + torch.arange(length)[None]) % self.capacity
        out = {"image": self.image[idx], "action": self.action[idx], "is_first": self.is_first[idx].clone()}
        out["is_first"][:, 0] = True
        if self.proprio_dim:
            out["proprio"] = self.proprio[idx]
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The stored steps (oldest first) and counters as plain tensors."""
        oldest = (self.pos - self.size) % self.capacity
        idx = (oldest + torch.arange(self.size)) % self.capacity
        return {"image": self.image[idx].clone(), "action": self.action[idx].clone(),
                "proprio": self.proprio[idx].clone(), "is_first": self.is_first[idx].clone(),
                "counters": torch.tensor([self.capacity, self.size, self.episodes], dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        cap, size, episodes = [int(x) for x in state["counters"].tolist()]
        if cap != self.capacity:
            raise DpftError("SequenceReplay.load_state_dict: saved capacity %d, this replay has %d (cmil.replay_size "
                            "may not change on resume)." % (cap, self.capacity))
        self.image.zero_()
        self.action.zero_()
        self.proprio.zero_()
        self.is_first.zero_()
        self.image[:size] = state["image"]
        self.action[:size] = state["action"]
        self.proprio[:size] = state["proprio"]
        self.is_first[:size] = state["is_first"]
        self.size, self.pos, self.episodes = size, size % self.capacity, episodes


__all__ = ["SequenceReplay"]
