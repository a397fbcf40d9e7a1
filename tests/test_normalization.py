from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dpft.errors import DpftError
from dpft.normalization import MinMaxNormalizer


def _fitted():
    # dim 0: range [0, 10]; dim 1: range [-4, 2]; dim 2: constant 3.5
    state = np.array([[0.0, -4.0, 3.5], [10.0, 2.0, 3.5], [5.0, -1.0, 3.5], [2.5, 0.5, 3.5]], dtype=np.float32)
    action = np.array([[-1.0, 0.0], [1.0, 4.0]], dtype=np.float32)
    return MinMaxNormalizer.fit({"state": state, "action": action}), state, action


def test_hand_computed_values_numpy_and_torch():
    norm, state, _ = _fitted()
    np.testing.assert_array_equal(norm.min("state"), [0.0, -4.0, 3.5])
    np.testing.assert_array_equal(norm.max("state"), [10.0, 2.0, 3.5])
    # x_n = (x - mid) * 2 / range ; constant dim -> x - mid
    expected = np.array(
        [[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-0.5, 0.5, 0.0]], dtype=np.float32
    )
    out = norm.normalize("state", state)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    out_t = norm.normalize("state", torch.from_numpy(state))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), expected, atol=1e-6)
    # a value outside the fitted range is not clipped
    np.testing.assert_allclose(norm.normalize("state", np.array([20.0, 5.0, 4.5])), [3.0, 2.0, 1.0], atol=1e-12)
    # action key is independent
    np.testing.assert_allclose(norm.normalize("action", np.array([0.0, 1.0])), [0.0, -0.5], atol=1e-12)


def test_round_trip_leading_dims_numpy_and_torch():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(50, 6)).astype(np.float32) * np.array([1, 10, 0.1, 100, 1, 1], dtype=np.float32)
    norm = MinMaxNormalizer.fit({"state": data})
    x = rng.normal(size=(4, 3, 6)) * 5  # (B, To, Do), float64
    back = norm.unnormalize("state", norm.normalize("state", x))
    assert back.dtype == np.float64 and back.shape == (4, 3, 6)
    np.testing.assert_allclose(back, x, rtol=1e-10, atol=1e-10)
    xt = torch.tensor(x, dtype=torch.float32)
    back_t = norm.unnormalize("state", norm.normalize("state", xt))
    assert back_t.dtype == torch.float32 and back_t.shape == (4, 3, 6)
    np.testing.assert_allclose(back_t.numpy(), xt.numpy(), rtol=1e-5, atol=1e-4)
    xt64 = torch.tensor(x, dtype=torch.float64)
    assert norm.normalize("state", xt64).dtype == torch.float64
    # integer input is computed in float32
    ints = np.arange(12).reshape(2, 6)
    assert norm.normalize("state", ints).dtype == np.float32
    assert norm.normalize("state", torch.from_numpy(ints)).dtype == torch.float32


def test_fitted_data_maps_into_unit_interval_exactly():
    rng = np.random.default_rng(3)
    data = (rng.normal(size=(2000, 9)) * rng.uniform(0.01, 300, size=9) + rng.normal(size=9) * 50).astype(
        np.float32
    )
    norm = MinMaxNormalizer.fit({"state": data})
    for out in (norm.normalize("state", data), norm.normalize("state", torch.from_numpy(data)).numpy()):
        assert out.min() >= -1.0 and out.max() <= 1.0
        # the extremes hit -1 and 1 exactly in every dimension
        np.testing.assert_array_equal(out.min(axis=0), -np.ones(9, np.float32))
        np.testing.assert_array_equal(out.max(axis=0), np.ones(9, np.float32))


def test_constant_and_nearly_constant_dims_stay_finite():
    data = np.zeros((10, 3), dtype=np.float32)
    data[:, 0] = 123.456  # constant
    data[:, 1] = np.linspace(0.0, 1.0, 10)
    data[:, 2] = 7.0 + np.linspace(0.0, 5e-7, 10)  # range below 1e-6
    norm = MinMaxNormalizer.fit({"state": data})
    assert norm.constant_dims("state").tolist() == [0, 2]
    out = norm.normalize("state", data)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, 0], np.zeros(10, np.float32))  # constant maps exactly to 0
    assert np.abs(out[:, 2]).max() < 1e-6  # scale 1: x - mid, tiny
    np.testing.assert_allclose(out[:, 1], np.linspace(-1, 1, 10), atol=1e-6)
    # unnormalize of 0 gives the constant back; a new value is shifted, not blown up
    np.testing.assert_allclose(norm.unnormalize("state", np.zeros((1, 3)))[0, 0], 123.456, rtol=1e-6)
    np.testing.assert_allclose(norm.normalize("state", np.array([124.456, 0.5, 7.0]))[0], 1.0, rtol=1e-5)
    out_t = norm.normalize("state", torch.from_numpy(data))
    assert torch.isfinite(out_t).all() and (out_t[:, 0] == 0).all()


def test_unnormalize_returns_the_constant_of_constant_dims():
    """A dim that never varied (e.g. rotation of a translation-only expert) is never driven by predictions."""
    actions = np.zeros((20, 3), dtype=np.float32)
    actions[:, 0] = np.linspace(-0.5, 0.5, 20)  # varies
    actions[:, 1] = 0.0  # constant 0 (rotation never used)
    actions[:, 2] = -1.0  # constant -1 (e.g. gripper always open)
    norm = MinMaxNormalizer.fit({"action": actions})
    pred = np.array([[0.5, 0.7, -0.3], [-1.0, -0.9, 0.9]], dtype=np.float32)
    raw = norm.unnormalize("action", pred)
    np.testing.assert_allclose(raw[:, 0], [0.25, -0.5], atol=1e-6)  # (x + 1) * 0.5 - 0.5
    np.testing.assert_array_equal(raw[:, 1], [0.0, 0.0])
    np.testing.assert_array_equal(raw[:, 2], [-1.0, -1.0])
    raw_t = norm.unnormalize("action", torch.from_numpy(pred))
    np.testing.assert_allclose(raw_t.numpy(), raw, atol=1e-6)
    assert raw_t.dtype == torch.float32 and raw.dtype == np.float32


def test_state_dict_safetensors_round_trip(tmp_path):
    norm, state, action = _fitted()
    sd = norm.state_dict()
    assert sorted(sd) == ["action.max", "action.min", "state.max", "state.min"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sd["state.min"].tolist() == [0.0, -4.0, 3.5]
    f = tmp_path / "normalizer.safetensors"
    save_file(sd, str(f))
    loaded = MinMaxNormalizer.from_state_dict(load_file(str(f)))
    assert sorted(loaded.keys()) == ["action", "state"]
    x = np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.normalize("state", x), norm.normalize("state", x))
    np.testing.assert_array_equal(loaded.unnormalize("action", action), norm.unnormalize("action", action))


def test_errors_name_the_problem():
    norm, _, _ = _fitted()
    with pytest.raises(DpftError, match=r"no statistics for key 'obs'.*known keys: \['state', 'action'\]"):
        norm.normalize("obs", np.zeros(3))
    with pytest.raises(DpftError, match=r"no statistics for key 'foo'"):
        norm.unnormalize("foo", torch.zeros(3))
    with pytest.raises(DpftError, match=r"key 'state' has 3 features but the input has shape \(2, 4\)"):
        norm.normalize("state", np.zeros((2, 4)))
    bad = np.zeros((5, 2))
    bad[3, 1] = np.nan
    with pytest.raises(DpftError, match=r"key 'action' contains NaN or Inf \(first at row 3, dimension 1"):
        MinMaxNormalizer.fit({"action": bad})
    with pytest.raises(DpftError, match=r"key 'state' is empty"):
        MinMaxNormalizer.fit({"state": np.zeros((0, 3))})
    sd = norm.state_dict()
    del sd["state.max"]
    with pytest.raises(DpftError, match=r"lacks 'state.max'"):
        MinMaxNormalizer.from_state_dict(sd)
    with pytest.raises(DpftError, match=r"unexpected entry 'state.mean'"):
        MinMaxNormalizer.from_state_dict({"state.mean": torch.zeros(3)})
    with pytest.raises(DpftError, match=r"min > max in dimensions \[1\]"):
        MinMaxNormalizer.from_state_dict({"a.min": torch.tensor([0.0, 2.0]), "a.max": torch.tensor([1.0, 1.0])})
