"""dpft.load_policy / Policy: checkpoint round trip, observation handling, unnormalized actions, errors."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import dpft
from dpft.agents.pretrain import pretrain
from dpft.checkpoint import load_checkpoint
from dpft.config import PolicyConfig, compose
from dpft.errors import DpftError
from dpft.models import build_policy_model
from dpft.normalization import MinMaxNormalizer
from dpft.policy import Policy
from tests.synth import write_learnable_hdf5

KEYS = ["robot0_eef_pos", "object"]
SCALE, SHIFT = 5.0, 3.0  # actions are stored as SCALE * a + SHIFT so raw and normalized ranges differ


def _pretrain(path, out, overrides):
    """Pretrain on ``path`` into ``out`` with one thread, quietly, no validation split; torch's thread count is
    restored afterwards so other tests are unaffected."""
    n = torch.get_num_threads()
    try:
        pretrain(compose("pretrain", ["dataset=" + path, "out=" + out, "obs_keys=[%s]" % ",".join(KEYS),
                                      "++num_threads=1", "++progress=false", "++data.valid_ratio=0"] + overrides))
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A diffusion_mlp trained 100 steps on learnable demos with actions in about [-2, 8]."""
    root = tmp_path_factory.mktemp("policy")
    path = str(root / "learnable.hdf5")
    write_learnable_hdf5(path)
    with h5py.File(path, "r+") as f:
        for name in f["data"]:
            a = f["data/%s/actions" % name]
            a[...] = a[...] * SCALE + SHIFT
    out = str(root / "run")
    _pretrain(path, out, [
        "++policy.mlp_dims=[64,64,64]", "++policy.denoising_steps=5", "++steps=100", "++batch_size=64",
        "++save_every=100", "++log_every=50", "++val_every=0", "++warmup_steps=5", "++lr=3e-3", "++act_steps=2",
        "++ema_decay=0.9"])
    with h5py.File(path, "r") as f:
        names = sorted(f["data"], key=lambda s: int(s.split("_")[1]))
        obs = {k: np.concatenate([f["data/%s/obs/%s" % (d, k)][:28] for d in names]) for k in KEYS}
        acts = np.concatenate([np.stack([f["data/%s/actions" % d][t:t + 4] for t in range(28)]) for d in names])
        all_actions = np.concatenate([f["data/%s/actions" % d][...] for d in names])
    return {"out": out, "obs": obs, "chunks": acts, "actions": all_actions}


def test_load_policy_acts_in_raw_action_units(run):
    policy = dpft.load_policy(run["out"])
    assert policy.weights == "ema" and policy.meta["step"] == 100
    obs = run["obs"]
    b = obs["object"].shape[0]
    act = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert isinstance(act, np.ndarray) and act.dtype == np.float32 and act.shape == (b, 2, 4)  # act_steps=2
    chunk = policy.predict_chunk(obs, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (b, 4, 4)
    np.testing.assert_array_equal(chunk[:, :2], act)
    lo, hi = run["actions"].min(0), run["actions"].max(0)
    eps = 1e-4 * (hi - lo)
    assert np.all(chunk >= lo - eps) and np.all(chunk <= hi + eps)  # the model's [-1, 1] maps onto the data range
    assert chunk.max() > 1.5  # raw units, not normalized ones
    err = np.abs(chunk - run["chunks"]).mean()
    baseline = np.abs(run["chunks"] - run["chunks"].mean(axis=(0, 1))).mean()
    assert err < 0.8 * baseline, (err, baseline)


def test_ema_and_model_weights_are_selectable_and_differ(run):
    ema = dpft.load_policy(run["out"], weights="ema")
    live = dpft.load_policy(run["out"], weights="model")
    assert live.weights == "model" and ema.describe()["weights"] == "ema"
    ck = load_checkpoint(run["out"])
    for key, value in live.model.state_dict().items():
        assert torch.equal(value, ck.model_state[key])
        assert torch.equal(ema.model.state_dict()[key], ck.ema_state[key])
    assert any(not torch.equal(ck.model_state[k], ck.ema_state[k]) for k in ck.model_state)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not np.array_equal(ema.act(run["obs"], generator=g()), live.act(run["obs"], generator=g()))
    with pytest.raises(DpftError, match="weights='best' is not known"):
        dpft.load_policy(run["out"], weights="best")


def test_obs_forms_and_normalization(run):
    policy = dpft.load_policy(run["out"])
    obs = {k: v[:5] for k, v in run["obs"].items()}
    norm = policy.normalizer
    state = np.concatenate([obs["robot0_eef_pos"], obs["object"]], axis=-1).astype(np.float32)
    lo, hi = norm.min("state"), norm.max("state")
    expected = (state - lo) / ((hi - lo) / 2) - 1  # the checkpoint's min-max statistics
    got = policy.normalize_obs(obs)["state"]
    assert got.shape == (5, 1, 6)
    np.testing.assert_allclose(got[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = policy.act(obs, generator=g())
    np.testing.assert_array_equal(policy.act({k: v[:, None] for k, v in obs.items()}, generator=g()), a)  # (B,To,..)
    np.testing.assert_array_equal(policy.act(state, generator=g()), a)  # the bare low-dim vector
    np.testing.assert_array_equal(policy.act(torch.from_numpy(state[:, None]), generator=g()), a)
    extra = dict(obs, robot0_joint_pos=np.zeros((5, 7)))
    np.testing.assert_array_equal(policy.act(extra, generator=g()), a)  # extra keys are ignored


def test_obs_errors_name_keys_and_shapes(run):
    policy = dpft.load_policy(run["out"])
    with pytest.raises(DpftError, match=r"\['object'\] missing: the policy needs \['robot0_eef_pos', 'object'\] and "
                                        r"got \['robot0_eef_pos'\]"):
        policy.act({"robot0_eef_pos": np.zeros((2, 3))})
    with pytest.raises(DpftError, match=r"'object' has shape \(2, 4\); expected \(B, 1, 3\) or \(B, 3\)"):
        policy.act({"robot0_eef_pos": np.zeros((2, 3)), "object": np.zeros((2, 4))})
    with pytest.raises(DpftError, match="batch size 3 but earlier keys have 2"):
        policy.act({"robot0_eef_pos": np.zeros((2, 3)), "object": np.zeros((3, 3))})
    with pytest.raises(DpftError, match=r"'state' has shape \(2, 5\); expected \(B, 1, 6\)"):
        policy.act(np.zeros((2, 5)))


def test_describe_and_global_rng_untouched(run):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    policy = dpft.load_policy(run["out"])
    assert torch.equal(torch.get_rng_state(), before)  # rebuilding the model does not consume the user's RNG
    d = policy.describe()
    assert d["checkpoint"].endswith("step_00000100") and d["step"] == 100 and d["act_steps"] == 2
    assert d["policy"] == "diffusion_mlp" and d["obs_keys"] == KEYS
    assert "weights=ema" in repr(policy)


def _image_policy(cond_steps=2):
    meta = {"obs_keys": ["robot0_eef_pos", "agentview_image"], "low_dim_keys": ["robot0_eef_pos"],
            "image_keys": ["agentview_image"], "obs_shapes": {"robot0_eef_pos": [3], "agentview_image": [16, 16, 3]},
            "obs_dim": 3, "action_dim": 2, "horizon_steps": 4, "cond_steps": cond_steps, "act_steps": 3,
            "policy": "gaussian_mlp"}
    cfg = PolicyConfig(name="gaussian_mlp", mlp_dims=[16], image_feature_dim=8)
    torch.manual_seed(0)
    model = build_policy_model(cfg, meta["obs_shapes"], 3, ["agentview_image"], 2, 4, cond_steps)
    norm = MinMaxNormalizer({"state": (np.zeros(3), np.full(3, 4.0)), "action": (np.full(2, -10.0), np.full(2, 10.0))})
    return Policy(model, norm, meta, weights="model")


def test_image_policy_with_history():
    policy = _image_policy(cond_steps=2)
    rng = np.random.default_rng(0)
    obs = {"robot0_eef_pos": rng.uniform(0, 4, (3, 2, 3)),
           "agentview_image": rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)}
    model_obs = policy.normalize_obs(obs)
    assert model_obs["agentview_image"].dtype == torch.uint8 and model_obs["agentview_image"].shape == (3, 2, 16, 16, 3)
    np.testing.assert_allclose(model_obs["state"].numpy(), obs["robot0_eef_pos"] / 2 - 1, atol=1e-6)
    act = policy.act(obs)
    assert act.shape == (3, 3, 2)
    # deterministic Gaussian = its mean, unnormalized: 10 * tanh(...) lies in (-10, 10)
    expected = policy.model.sample(model_obs, deterministic=True)[0][:, :3].numpy() * 10.0
    np.testing.assert_allclose(act, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DpftError, match=r"'agentview_image' has dtype float32; expected uint8"):
        policy.act(dict(obs, agentview_image=obs["agentview_image"].astype(np.float32)))
    with pytest.raises(DpftError, match=r"'agentview_image' has shape \(3, 16, 16, 3\); expected \(B, 2, 16, 16, 3\)"):
        policy.act(dict(obs, agentview_image=obs["agentview_image"][:, 0]))  # (B, ...) needs cond_steps == 1
    with pytest.raises(DpftError, match="observes cameras"):
        policy.act(np.zeros((3, 2, 3)))


def test_load_policy_errors(tmp_path):
    with pytest.raises(DpftError, match="does not exist"):
        dpft.load_policy(str(tmp_path / "missing"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DpftError, match="has no complete checkpoint"):
        dpft.load_policy(str(tmp_path / "run"))


def test_stochastic_gaussian_actions_stay_in_the_data_range(tmp_path):
    """A wide Gaussian's samples leave [-1, 1] in normalized units; Policy.act clamps before un-normalizing."""
    path = str(tmp_path / "learnable.hdf5")
    write_learnable_hdf5(path)
    out = str(tmp_path / "gauss")
    _pretrain(path, out, [
        "policy=gaussian_mlp", "policy.mlp_dims=[32,32]", "policy.init_std=1.0", "policy.std_max=1.0", "steps=2",
        "batch_size=16", "save_every=2", "val_every=0", "horizon_steps=1", "act_steps=1", "ema_decay=0"])
    policy = dpft.load_policy(out)
    with h5py.File(path, "r") as f:
        names = sorted(f["data"], key=lambda s: int(s.split("_")[1]))
        obs = {k: np.concatenate([f["data/%s/obs/%s" % (d, k)][...] for d in names]) for k in KEYS}
        actions = np.concatenate([f["data/%s/actions" % d][...] for d in names])
    raw = policy.act(obs, deterministic=False, generator=torch.Generator().manual_seed(0))
    lo, hi = actions.min(0), actions.max(0)
    eps = 1e-5 * (hi - lo + 1)
    assert np.all(raw >= lo - eps) and np.all(raw <= hi + eps)
    # the std really is wide: many samples sit on the bounds, i.e. they were clamped
    on_bounds = np.isclose(raw[:, 0], lo, atol=1e-5) | np.isclose(raw[:, 0], hi, atol=1e-5)
    assert on_bounds.mean() > 0.05


def test_pretrain_rejects_ft_denoising_steps_with_a_message(tmp_path):
    with pytest.raises(DpftError, match=r"policy.ft_denoising_steps=3: pretraining trains the base denoiser"):
        compose("pretrain", ["dataset=x.hdf5", "out=" + str(tmp_path / "r"), "policy.ft_denoising_steps=3"])


def test_acting_leaves_the_model_mode_alone(run):
    policy = dpft.load_policy(run["out"])
    assert not policy.model.training  # built for evaluation
    policy.model.train()  # a trainer sharing the model switched it to training mode
    policy.act({k: v[:2] for k, v in run["obs"].items()})
    assert policy.model.training


# ---------------------------------------------------------------- building from metadata, registry, act contract


def test_load_policy_builds_from_meta_alone(run, tmp_path):
    from dpft.models import policy_spec

    ckpt = load_checkpoint(run["out"])
    assert ckpt.meta["policy_kind"] == "diffusion"
    assert ckpt.meta["policy_spec"] == policy_spec(dict(name="diffusion_mlp", mlp_dims=[64, 64, 64], denoising_steps=5))
    from dpft.checkpoint import save_checkpoint

    d = str(tmp_path / "other")  # config.yaml that is not a PretrainConfig: must not matter
    save_checkpoint(d, 100, ckpt.model_state, ckpt.ema_state, ckpt.normalizer, ckpt.meta,
                    "iterations: 3\nagent: {name: dppo}\n")
    policy = dpft.load_policy(d)
    ref = dpft.load_policy(run["out"])
    obs = {k: v[:4] for k, v in run["obs"].items()}
    np.testing.assert_array_equal(policy.act(obs, seed=1), ref.act(obs, seed=1))


def _write_finetuned(run_dir, out, use_ddim):
    """A fine-tuned checkpoint as a fine-tuning run writes it: base + ft weights, spec with K' and DDIM."""
    from dpft.checkpoint import save_checkpoint
    from dpft.models import build_policy_model

    ckpt = load_checkpoint(run_dir)
    meta = dict(ckpt.meta)
    spec = dict(meta["policy_spec"], ft_denoising_steps=2)
    if use_ddim:
        spec.update(use_ddim=True, ddim_steps=5)
    meta.update(policy_spec=spec, ft_denoising_steps=2, use_ddim=use_ddim)
    model = build_policy_model(spec, meta["obs_shapes"], meta["obs_dim"], meta["image_keys"], meta["action_dim"],
                               meta["horizon_steps"], meta["cond_steps"])
    base = {k: v for k, v in ckpt.ema_state.items()}
    state = dict(base)
    for k, v in base.items():  # the fine-tuned copy moved away from the base
        state["ft_" + k if k.startswith("network.") else k] = v
    state.update({"ft_" + k: v * 1.05 for k, v in base.items() if k.startswith("network.")})
    model.load_state_dict(state)
    save_checkpoint(out, 7, model.state_dict(), None, ckpt.normalizer, meta, "iterations: 1\n")
    return model, ckpt


@pytest.mark.parametrize("use_ddim", [False, True])
def test_finetuned_diffusion_policy_acts_as_dppo_evaluates(run, tmp_path, use_ddim):
    out = str(tmp_path / "ft")
    model, ckpt = _write_finetuned(run["out"], out, use_ddim)
    policy = dpft.load_policy(out)  # no EMA in the checkpoint: the live weights
    assert policy.weights == "model" and policy.model.ft_denoising_steps == 2
    assert policy.model.use_ddim == use_ddim and policy.model.ft_network is not None
    obs = {k: v[:6] for k, v in run["obs"].items()}
    got = policy.act(obs, seed=3)
    # independently: deterministic stepping, base network for steps < N-2, ft network for the last 2
    model.eval()
    model_obs = policy.normalize_obs(obs)
    gen = torch.Generator().manual_seed(3)
    cond = model.encode(model_obs)
    n = model.num_sampling_steps
    x = torch.randn(6, 4, 4, generator=gen)
    with torch.no_grad():
        for i in range(n):
            mean, std = model.step_distribution(x, i, cond, deterministic=True)
            x = mean if (use_ddim or i == n - 1) else mean + std * torch.randn(x.shape, generator=gen).clamp(-10, 10)
    expected = policy.normalizer.unnormalize("action", x.clamp(-1, 1))[:, :2].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    base_only = dpft.load_policy(run["out"]).act(obs, seed=3)
    assert not np.allclose(got, base_only, atol=1e-3)  # the fine-tuned steps change the actions


def test_register_policy_kind_and_unknown_kind(run, tmp_path):
    from dpft.checkpoint import save_checkpoint
    from dpft.policy import POLICY_KINDS, register_policy_kind

    ckpt = load_checkpoint(run["out"])
    out = str(tmp_path / "odd")
    save_checkpoint(out, 1, ckpt.model_state, None, ckpt.normalizer, dict(ckpt.meta, policy_kind="odd"), "x: 1\n")
    with pytest.raises(DpftError, match="kind 'odd'"):
        dpft.load_policy(out)
    seen = []
    register_policy_kind("odd", lambda c, weights, device: seen.append((c.meta["step"], weights, device)) or "built")
    try:
        assert dpft.load_policy(out, weights="model") == "built" and seen == [(1, "model", "cpu")]
    finally:
        POLICY_KINDS.pop("odd", None)


def test_act_contract_seed_nan_and_empty_batch(run):
    policy = dpft.load_policy(run["out"])
    obs = {k: v[:3].copy() for k, v in run["obs"].items()}
    a = policy.act(obs, deterministic=False, seed=5)
    np.testing.assert_array_equal(policy.act(obs, deterministic=False, seed=5), a)
    np.testing.assert_array_equal(policy.act(obs, deterministic=False, generator=torch.Generator().manual_seed(5)), a)
    assert not np.array_equal(policy.act(obs, deterministic=False, seed=6), a)
    with pytest.raises(DpftError, match="either generator= or seed="):
        policy.act(obs, seed=1, generator=torch.Generator())
    bad = dict(obs, object=obs["object"].copy())
    bad["object"][1, 0] = np.nan
    with pytest.raises(DpftError, match=r"'object' \(batch rows \[1\]\) contains NaN or Inf"):
        policy.act(bad)
    bad["object"][1, 0] = np.inf
    with pytest.raises(DpftError, match="'object'"):
        policy.act(bad)
    with pytest.raises(DpftError, match="B = 0"):
        policy.act({k: v[:0] for k, v in obs.items()})
    policy.reset()  # stateless: a no-op
    policy.reset([0, 2])
    assert policy.stateful is False


def test_rollout_resets_stateful_policies_and_gives_them_every_env_row():
    import functools

    from dpft.envs.fake_env import FakeEnv, ScriptedReachPolicy
    from dpft.envs.rollout import rollout

    class Stateful(ScriptedReachPolicy):
        stateful = True

        def __init__(self):
            super().__init__(act_steps=4)
            self.resets = []

        def reset(self, rows=None):
            self.resets.append(None if rows is None else list(rows))

    env_fns = [functools.partial(FakeEnv, max_episode_steps=12, terminate_on_success=True)] * 3
    plain = rollout(ScriptedReachPolicy(), env_fns, episodes=7, seed=20, mode="inline", progress=False)
    pol = Stateful()
    res = rollout(pol, env_fns, episodes=7, seed=20, mode="inline", progress=False)
    assert [e["return"] for e in res["episodes"]] == [e["return"] for e in plain["episodes"]]
    assert pol.resets[0] is None  # all envs start
    restarted = [r for rows in pol.resets[1:] for r in rows]
    assert len(restarted) == 7 - 3 and set(restarted) <= {0, 1, 2}
    assert set(pol.batch_sizes) == {3}  # always all env rows, also when some envs are idle
