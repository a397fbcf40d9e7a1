"""dpft.data: robomimic HDF5 reading/validation and the in-memory windowed dataset.

Quick use::

    from dpft.data import build_datasets
    train_ds, valid_ds, normalizer, info = build_datasets(
        "low_dim.hdf5", ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"],
        horizon_steps=16, cond_steps=2)
    batch = train_ds.sample(256, torch.Generator().manual_seed(0))
"""
from __future__ import annotations

from dpft.data.dataset import Batch, DemoSplit, WindowDataset, build_datasets, split_demos, window_starts
from dpft.data.hdf5 import (
    Demos,
    demo_sort_key,
    describe,
    format_description,
    list_demos,
    load_demos,
    load_hdf5,
    open_robomimic,
    read_env_args,
    read_filter_keys,
)

__all__ = [
    "Batch",
    "DemoSplit",
    "Demos",
    "WindowDataset",
    "build_datasets",
    "demo_sort_key",
    "describe",
    "format_description",
    "list_demos",
    "load_demos",
    "load_hdf5",
    "open_robomimic",
    "read_env_args",
    "read_filter_keys",
    "split_demos",
    "window_starts",
]
