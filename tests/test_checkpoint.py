"""Checkpoint files, atomic writes, RNG capture and EMA (dpft.checkpoint, dpft.rng, dpft.ema)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dpft import checkpoint as C
from dpft.ema import EMA
from dpft.errors import DpftError
from dpft.normalization import MinMaxNormalizer
from dpft.rng import capture_rng_state, load_rng_state, restore_rng_state, save_rng_state, seed_everything


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def _normalizer():
    return MinMaxNormalizer({"state": (np.array([0.0, -1.0]), np.array([2.0, 1.0])),
                             "action": (np.array([-2.0]), np.array([4.0]))})


def _trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model.lin(torch.ones(4, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return opt, sched


def _save(run_dir, step, model, **kw):
    opt, sched = _trained_optimizer(model)
    gen = torch.Generator().manual_seed(5)
    ts = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
          "rng": [capture_rng_state({"train": gen})], "step": {"step": step, "ema_step": 7}}
    return C.save_checkpoint(str(run_dir), step, model.state_dict(), {k: v + 1 for k, v in model.state_dict().items()},
                             _normalizer(), {"policy": "tiny", "obs_keys": ["a"]}, "steps: 10\n", ts, **kw)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_matches_hand_computed_warmup_average():
    torch.manual_seed(0)
    model = Tiny()
    ema = EMA(model, decay=0.5)
    w0 = model.lin.weight.detach().clone()
    # update 1 (t=0): decay_t = min(0.5, 1/10) = 0.1 -> shadow = 0.1 w0 + 0.9 w1
    with torch.no_grad():
        model.lin.weight.add_(1.0)
        model.count.fill_(3)
    ema.update(model)
    expected = 0.1 * w0 + 0.9 * (w0 + 1.0)
    assert torch.allclose(ema.state_dict()["lin.weight"], expected, atol=1e-6)
    assert ema.state_dict()["count"].item() == 3  # buffers are copied, not averaged
    # update 2 (t=1): decay_t = min(0.5, 2/11) = 2/11
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    ema.update(model)
    expected = (2 / 11) * expected + (9 / 11) * (w0 + 2.0)
    assert torch.allclose(ema.state_dict()["lin.weight"], expected, atol=1e-6)
    # after warm-up the decay is the configured one: (1+t)/(10+t) >= 0.5 from t = 8
    ema.step = 100
    assert ema.current_decay() == 0.5
    assert EMA(model, 0.9, warmup=False).current_decay() == 0.9


def test_ema_state_dict_has_model_keys_and_copy_to_round_trips():
    model = Tiny()
    ema = EMA(model, decay=0.9)
    assert set(ema.state_dict()) == set(model.state_dict())  # non-persistent 'table' excluded
    with torch.no_grad():
        model.lin.weight.mul_(3.0)
    ema.update(model)
    other = Tiny()
    ema.copy_to(other)
    assert torch.equal(other.lin.weight, ema.state_dict()["lin.weight"])
    restored = EMA(Tiny(), decay=0.9)
    restored.load_state_dict(ema.state_dict(), step=ema.step)
    assert restored.step == 1 and torch.equal(restored.state_dict()["lin.bias"], ema.state_dict()["lin.bias"])
    with pytest.raises(DpftError, match="missing keys .*lin.bias"):
        restored.load_state_dict({"lin.weight": model.lin.weight, "count": model.count}, step=1)


def test_ema_decay_zero_is_exact_copy_and_bad_decay_rejected():
    model = Tiny()
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        model.lin.weight.copy_(torch.randn(2, 3))
    ema.update(model)
    assert torch.equal(ema.state_dict()["lin.weight"], model.lin.weight)
    with pytest.raises(DpftError, match="decay must be in"):
        EMA(model, decay=1.0)


# ---------------------------------------------------------------------------------------------- RNG
def _draws(gen):
    return (random.random(), float(np.random.rand()), float(torch.rand(())), float(torch.rand((), generator=gen)))


def test_rng_state_round_trip_through_files(tmp_path):
    seed_everything(3)
    gen = torch.Generator().manual_seed(11)
    _draws(gen)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    save_rng_state(str(tmp_path), {"train": gen})
    expected = _draws(gen) + (random.gauss(0, 1),)
    seed_everything(99)
    gen2 = torch.Generator().manual_seed(0)
    load_rng_state(str(tmp_path), {"train": gen2})
    assert _draws(gen2) + (random.gauss(0, 1),) == expected
    info = json.loads((tmp_path / "rng.json").read_text())
    assert info["generators"] == {"train": {"device": "cpu"}}
    keys = set(load_file(str(tmp_path / "rng.safetensors")))
    assert {"python.state", "numpy.keys", "torch.cpu", "generator.train"} <= keys


def test_rng_restore_names_missing_generator():
    tensors, info = capture_rng_state({"train": torch.Generator()})
    with pytest.raises(DpftError, match="no state for generator 'valid'"):
        restore_rng_state(tensors, info, {"valid": torch.Generator()})


# ---------------------------------------------------------------------------------------------- save / load
def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    d = _save(tmp_path, 10, model)
    assert d == str(tmp_path / "checkpoints" / "step_00000010")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert set(load_file(os.path.join(d, "model.safetensors"))) == {"lin.weight", "lin.bias", "count"}
    assert set(load_file(os.path.join(d, "normalizer.safetensors"))) == {"state.min", "state.max", "action.min",
                                                                         "action.max"}
    meta = json.loads(open(os.path.join(d, "meta.json")).read())
    assert meta["step"] == 10 and meta["policy"] == "tiny" and meta["torch_version"] == torch.__version__
    assert "dpft_version" in meta and "created" in meta
    ts = os.path.join(d, "training_state")
    assert sorted(os.listdir(ts)) == ["optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors",
                                      "scheduler.json", "step.json"]
    opt_tensors = load_file(os.path.join(ts, "optimizer.safetensors"))
    assert set(opt_tensors) == {"state.%d.%s" % (i, n) for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}
    opt_json = json.loads(open(os.path.join(ts, "optimizer.json")).read())
    assert opt_json["param_groups"][0]["params"] == [0, 1]
    assert json.loads(open(os.path.join(ts, "scheduler.json")).read())["last_epoch"] == 3
    assert json.loads(open(os.path.join(ts, "step.json")).read())["ema_step"] == 7
    # nothing was pickled: every file is safetensors, JSON or YAML text
    for root, _, files in os.walk(d):
        for f in files:
            assert f.endswith((".safetensors", ".json", ".yaml")), f


def test_load_checkpoint_round_trip_restores_optimizer_exactly(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt, sched = _trained_optimizer(model)
    ts = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [], "step": {"step": 3}}
    C.save_checkpoint(str(tmp_path), 3, model.state_dict(), None, _normalizer(), {}, "a: 1\n", ts)
    ck = C.load_checkpoint(str(tmp_path), training_state=True)
    assert ck.step == 3 and ck.ema_state is None and ck.config_yaml == "a: 1\n"
    assert torch.equal(ck.model_state["lin.weight"], model.lin.weight.detach())
    assert np.array_equal(ck.normalizer.max("action"), np.array([4.0], np.float32))
    # a fresh optimizer loaded from the files takes the same next step as the original
    twin = Tiny()
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=1e-3, foreach=True)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    opt2.load_state_dict(ck.training_state["optimizer"])
    sched2.load_state_dict(ck.training_state["scheduler"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)  # tuples survive JSON
    for m, o, s in ((model, opt, sched), (twin, opt2, sched2)):
        m.lin(torch.ones(4, 3)).pow(2).sum().backward()
        o.step()
        s.step()
    assert torch.equal(model.lin.weight, twin.lin.weight)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_keep_prunes_oldest_and_paths_resolve(tmp_path):
    model = Tiny()
    for step in (5, 10, 15):
        _save(tmp_path, step, model, keep=2)
    names = sorted(p for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    assert names == ["step_00000010", "step_00000015"]
    newest = str(tmp_path / "checkpoints" / "step_00000015")
    assert C.find_latest(str(tmp_path)) == newest
    assert C.resolve_checkpoint(str(tmp_path)) == newest
    assert C.resolve_checkpoint(str(tmp_path / "checkpoints")) == newest
    older = str(tmp_path / "checkpoints" / "step_00000010")
    assert C.load_checkpoint(older).step == 10


def test_crash_during_save_keeps_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    model = Tiny()
    first = _save(tmp_path, 10, model)

    def boom(path, text):
        with open(path, "w") as f:
            f.write(text[:2])  # half a file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(C, "_write_text", boom)
    with pytest.raises(DpftError, match=r"Could not write checkpoint step_00000020 in '.*checkpoints': disk full\. "
                       r"Nothing already saved was lost .*the newest complete one, '.*step_00000010', is intact"):
        _save(tmp_path, 20, model)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000010"
    assert sorted(os.listdir(root)) == ["latest", "step_00000010"]  # no step_00000020, no temp dir
    assert C.find_latest(str(tmp_path)) == first
    assert C.load_checkpoint(str(tmp_path)).step == 10


def test_killed_writer_leftovers_are_invisible_and_cleaned(tmp_path):
    model = Tiny()
    first = _save(tmp_path, 10, model)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / "checkpoints" / (".tmp-step_00000020-%d" % dead.pid)
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert C.find_latest(str(tmp_path)) == first
    assert C.clean_stale_tmp(str(tmp_path)) == [leftover.name]
    assert not leftover.exists()


# ---------------------------------------------------------------------------------------------- errors
def test_resolve_errors_name_the_problem(tmp_path):
    with pytest.raises(DpftError, match="does not exist"):
        C.resolve_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DpftError, match="has no complete checkpoint"):
        C.load_checkpoint(str(tmp_path / "run"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DpftError, match="is a file"):
        C.resolve_checkpoint(str(tmp_path / "file.txt"))
    (tmp_path / "other").mkdir()
    with pytest.raises(DpftError, match="neither a dpft run directory"):
        C.resolve_checkpoint(str(tmp_path / "other"))


def test_corrupt_or_missing_files_are_named(tmp_path):
    d = _save(tmp_path, 10, Tiny())
    with open(os.path.join(d, "ema.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(DpftError, match="ema.safetensors' is damaged: its sha256 is"):
        C.load_checkpoint(d)
    with pytest.raises(DpftError, match="ema.safetensors' cannot be read as safetensors"):
        C.load_checkpoint(d, verify=False)
    os.remove(os.path.join(d, "normalizer.safetensors"))
    with pytest.raises(DpftError, match="normalizer.safetensors' is missing"):
        C.load_checkpoint(d, ema=False)
    with open(os.path.join(d, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DpftError, match="meta.json' is not valid JSON"):
        C.load_checkpoint(d)
    os.remove(os.path.join(d, "training_state", "step.json"))
    with pytest.raises(DpftError, match="step.json' is missing"):
        C.load_training_state(d, verify=False)  # meta.json (the checksums) is garbage above


def test_load_state_strict_lists_missing_and_unexpected_keys():
    model = Tiny()
    state = {"lin.weight": torch.zeros(2, 3), "count": torch.zeros((), dtype=torch.long), "extra.w": torch.zeros(1)}
    with pytest.raises(DpftError, match=r"1 missing key\(s\) \['lin.bias'\], 1 unexpected key\(s\) \['extra.w'\]"):
        C.load_state_strict(model, state, "model.safetensors")
    state = dict(model.state_dict(), **{"lin.weight": torch.zeros(5, 3)})
    with pytest.raises(DpftError, match=r"lin.weight: saved \(5, 3\) vs model \(2, 3\)"):
        C.load_state_strict(model, state, "model.safetensors")


def test_tied_weights_are_saved_under_every_name(tmp_path):
    a = nn.Linear(2, 2)
    state = {"enc.weight": a.weight, "dec.weight": a.weight}  # one tensor under two names
    C.save_tensors(str(tmp_path / "t.safetensors"), state)
    back = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(back["enc.weight"], back["dec.weight"])


def test_resaving_a_step_replaces_it_without_a_window_where_it_is_missing_or_partial(tmp_path, monkeypatch):
    model = Tiny()
    _save(tmp_path, 10, model)
    root = tmp_path / "checkpoints"
    seen = []
    real_rmtree = C.shutil.rmtree

    def watching_rmtree(path, *a, **kw):  # whenever an old copy is deleted, step_10 must already be complete
        seen.append((os.path.basename(str(path)), sorted(os.listdir(root / "step_00000010"))))
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(C.shutil, "rmtree", watching_rmtree)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    _save(tmp_path, 10, model)
    assert seen and seen[0][0].startswith(".tmp-retired-step_00000010-")  # renamed aside first, then deleted
    assert "model.safetensors" in seen[0][1]
    assert sorted(os.listdir(root)) == ["latest", "step_00000010"]
    reloaded = load_file(str(root / "step_00000010" / "model.safetensors"))
    assert torch.equal(reloaded["lin.weight"], model.lin.weight)
    # a crash mid-delete leaves only a retired temp dir, which is invisible and cleaned up
    os.makedirs(root / ".tmp-retired-step_00000005-999999")
    assert C.find_latest(str(tmp_path)).endswith("step_00000010")
    assert ".tmp-retired-step_00000005-999999" in C.clean_stale_tmp(str(tmp_path))


# ---------------------------------------------------------------------------------------------- checksums
def _flip_payload_byte(path):
    """Flip one byte in the tensor data (after the safetensors header), so the file still parses."""
    raw = bytearray(open(path, "rb").read())
    header_len = int.from_bytes(bytes(raw[:8]), "little")
    pos = len(raw) - 2  # inside the last tensor's bytes
    assert pos >= 8 + header_len
    raw[pos] ^= 0x40
    with open(path, "wb") as f:
        f.write(bytes(raw))


def test_meta_lists_sha256_of_every_other_file(tmp_path):
    import hashlib

    d = _save(tmp_path, 10, Tiny())
    sums = json.loads(open(os.path.join(d, "meta.json")).read())["checksums"]
    files = sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
    assert sorted(sums) == [f for f in files if f != "meta.json"]
    assert "training_state/optimizer.safetensors" in sums and "model.safetensors" in sums
    for rel, digest in sums.items():
        assert digest == hashlib.sha256(open(os.path.join(d, rel), "rb").read()).hexdigest()


@pytest.mark.parametrize("rel", ["model.safetensors", "ema.safetensors", "normalizer.safetensors",
                                 "training_state/optimizer.safetensors", "training_state/rng.safetensors"])
def test_flipped_payload_byte_is_detected_and_named(tmp_path, rel):
    d = _save(tmp_path, 10, Tiny())
    before = {k: v.clone() for k, v in load_file(os.path.join(d, rel)).items()}  # load_file maps the file
    _flip_payload_byte(os.path.join(d, rel))
    after = load_file(os.path.join(d, rel))  # still a valid safetensors file: only the checksum can tell
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(DpftError) as e:
        C.load_checkpoint(d, training_state=True)
    assert "Checkpoint file '%s' is damaged: its sha256 is" % os.path.join(d, rel) in str(e.value)
    assert "dpft rollout --no-verify, or dpft.load_policy(..., verify=False)" in str(e.value)
    # the escape hatches load the damaged bytes as they are
    if rel != "training_state/rng.safetensors":
        ck = C.load_checkpoint(d, training_state=True, verify=False)
        with C.verification(False):
            ck2 = C.load_checkpoint(d, training_state=True)
        assert ck.step == ck2.step == 10


def test_unlisted_file_refused_and_old_checkpoints_load_unverified(tmp_path):
    d = _save(tmp_path, 10, Tiny())
    meta_path = os.path.join(d, "meta.json")
    meta = json.loads(open(meta_path).read())
    del meta["checksums"]["model.safetensors"]
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(DpftError, match="meta.json' records no checksum for '.*model.safetensors', a file dpft "
                                        "writes into every checkpoint .*meta.json was edited or damaged"):
        C.load_checkpoint(d)
    del meta["checksums"]  # written before checksums existed
    open(meta_path, "w").write(json.dumps(meta))
    _flip_payload_byte(os.path.join(d, "model.safetensors"))
    assert C.load_checkpoint(d, training_state=True).step == 10
