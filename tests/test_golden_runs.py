"""Golden runs (tools/golden_runs.py): the short seeded runs of every agent and a pretraining run give exactly the
metrics and tensor hashes recorded in tests/golden/golden_runs.json. Behaviour must stay bit for bit through
refactors; after an intended behaviour change re-record with
``.venv/bin/python tools/golden_runs.py --record --overwrite`` and say why in the commit.

Bit-identity only holds on the recorded compute environment (torch build, CPU kernels, BLAS): elsewhere the
comparison is skipped, naming what differs. About 10-15 s on a quiet core."""
from __future__ import annotations

import json
import os

import pytest

from dpft.envs.render import setup_rendering

setup_rendering(require=False)
pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from dpft.errors import DpftError  # noqa: E402
from tools import golden_runs as gr  # noqa: E402

GOLDEN = gr.load_golden()


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    env = gr.compute_record()
    diffs = gr.environment_differences(GOLDEN["compute"], env)
    if diffs:
        pytest.skip("golden runs were recorded on another compute environment (%s): bit-identity only holds there"
                    % "; ".join("%s %r, here %r" % d for d in diffs))
    return gr.record(work=str(tmp_path_factory.mktemp("golden")))


def test_every_agent_is_recorded():
    assert sorted(GOLDEN["runs"]) == sorted(gr.RUNS)
    for name, run in GOLDEN["runs"].items():
        assert run["weights"] and any(k.startswith("model.safetensors/") for k in run["weights"]), name
        assert "step" in run["metrics"], name
        assert not any(gr.is_timing_key(k) for k in run["metrics"]), name
    assert GOLDEN["runs"]["pretrain"]["metrics"]["step"] == 4
    assert GOLDEN["runs"]["cair"]["metrics"]["cair/lambda"] != 0.5  # CAIR did adapt lambda
    assert GOLDEN["runs"]["inril_pcgrad"]["metrics"]["inril/il_steps"] > 0
    assert GOLDEN["compute"]["torch_num_threads"] == 1


@pytest.mark.parametrize("name", gr.RUNS)
def test_run_is_bit_identical_to_the_golden_record(current, name):
    verdict = gr.compare_run(GOLDEN["runs"][name], current["runs"][name])
    assert verdict is None, "golden run %s changed: %s" % (name, verdict)


def test_compare_names_the_first_difference():
    gold = {"metrics": {"a": 1.0, "b": 2.0}, "weights": {"model.safetensors/w": "x", "model.safetensors/v": "y"}}
    assert gr.compare_run(gold, {"metrics": {"a": 1.0, "b": 2.0, "new": 3}, "weights": dict(gold["weights"])}) is None
    assert gr.compare_run(gold, {"metrics": {"a": 1.0, "b": 2.5}, "weights": gold["weights"]}) == \
        "metrics key 'b': recorded 2.0, now 2.5"
    assert gr.compare_run(gold, {"metrics": {"a": 1.0}, "weights": gold["weights"]}) == "metrics key 'b' is missing"
    got = {"metrics": gold["metrics"], "weights": {"model.safetensors/v": "y", "actor.safetensors/w": "x"}}
    assert gr.compare_run(gold, got) == ("weights key 'model.safetensors/w' is missing (the same bytes are now under "
                                         "'actor.safetensors/w')")


def test_tensor_hash_covers_dtype_shape_and_bytes():
    import hashlib

    import torch

    t = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    want = hashlib.sha256(b"torch.float32(1, 2)" + t.numpy().tobytes()).hexdigest()
    assert gr.tensor_sha256(t) == want
    assert gr.tensor_sha256(t.reshape(2)) != want and gr.tensor_sha256(t.double()) != want
    assert gr.tensor_sha256(t.t()) != want  # same bytes, other shape


def test_record_refuses_to_overwrite_and_check_reports(tmp_path, monkeypatch, capsys):
    path = tmp_path / "g.json"
    gr.write_golden({"compute": {}, "runs": {}}, str(path))
    with pytest.raises(DpftError, match="g.json' already exists; pass --overwrite"):
        gr.write_golden({"x": 1}, str(path))
    assert gr.main(["--record", "--golden", str(path), "--runs", "ppo_scratch"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert json.loads(path.read_text()) == {"compute": {}, "runs": {}}  # untouched
    with pytest.raises(DpftError, match="Unknown golden run.*nope.*the runs are pretrain, dppo"):
        gr.run_all(str(tmp_path), ["nope"])
    # --check prints a verdict per run with the first differing key (here a run made with a fake summary)
    fake = {"compute": dict(GOLDEN["compute"]), "runs": {"ppo_scratch": {"metrics": {"step": 3}, "weights": {}}}}
    monkeypatch.setattr(gr, "record", lambda runs, log=None: {"compute": fake["compute"],
                                                             "runs": {"ppo_scratch": {"metrics": {"step": 2},
                                                                                      "weights": {}}}})
    gr.write_golden(fake, str(path), overwrite=True)
    assert gr.main(["--check", "--golden", str(path), "--runs", "ppo_scratch"]) == 1
    assert "ppo_scratch   DIFFERS: metrics key 'step': recorded 3, now 2" in capsys.readouterr().out
    assert os.path.isfile(str(path)) and not os.path.exists(str(path) + ".tmp")


def test_environment_differences_name_the_key():
    rec = dict(GOLDEN["compute"])
    assert gr.environment_differences(rec, dict(rec, torch_num_threads=4, omp_num_threads_env="8")) == []
    assert gr.environment_differences(rec, dict(rec, cpu_capability="AVX2", mujoco_version="9.9")) == [
        ("cpu_capability", rec["cpu_capability"], "AVX2"), ("mujoco_version", rec["mujoco_version"], "9.9")]
