"""``dpft finetune`` data-parallel on CPU: two gloo processes launched the way torchrun launches them (env RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

* the update: two ranks, each holding half of the envs' columns of one rollout, end with the weights, losses,
  KL and step count of a single process updating on the whole rollout (global minibatches, summed gradients,
  global advantage normalization, reward-scaler moments and KL stop), including minibatches a rank has no
  sample of (batch_size=1) and a target-KL stop;
* the loop (``agent=ppo env=hopper`` from scratch): the replicas are bit-identical after every iteration, rank
  0 alone writes metrics.jsonl / checkpoints, the env-step count is the global one, and a resumed DDP run ends
  bit-identical to an uninterrupted one; DPPO runs one iteration;
* the refusals: ``envs`` not divisible by WORLD_SIZE, IDQL and IN-RIL under DDP.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from safetensors.torch import load_file  # noqa: E402

from dpft.config import compose  # noqa: E402
from dpft.errors import DpftError  # noqa: E402
from dpft.metrics import read_metrics  # noqa: E402
from tests.test_finetune import diffusion_run, hopper_data  # noqa: E402,F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: from-scratch Gaussian PPO on Hopper, tiny (global settings: 4 envs, minibatches of 16 env steps)
SCRATCH = ["agent=ppo", "env=hopper", "envs=4", "n_steps=16", "iterations=2", "eval_every=0", "eval_episodes=1",
           "max_episode_steps=30", "progress=false", "num_threads=1", "agent.batch_size=16", "agent.update_epochs=2",
           "save_every=1", "keep_checkpoints=0",
           # constant learning rates: the split run below changes iterations= on resume, and a resumed linear
           # schedule restarts from the optimizer's saved lr (see the report on the linear schedule)
           "agent.lr_schedule=constant"]

#: runs ``spec["runs"]`` (each ``{"name", "overrides"}``) one after the other in one process group (the driver owns
#: it, as torchrun's caller would): per-iteration weight digests, final weights and global statistics per rank
LOOP_DRIVER = (
    "import hashlib, json, os, sys\n"
    "import torch\n"
    "from dpft.cli import _with_preset\n"
    "from dpft.config import compose\n"
    "from dpft.agents.finetune import Finetuner\n"
    "from dpft.train_utils import destroy_process_group, dist_info_from_env, init_process_group\n"
    "spec = json.loads(sys.argv[1])\n"
    "owned = init_process_group(dist_info_from_env(), torch.device('cpu'))\n"
    "for job in spec['runs']:\n"
    "    t = Finetuner(compose('finetune', _with_preset(job['overrides'])))\n"
    "    r = t.dist.rank\n"
    "    def weights():\n"
    "        out = {'model.' + k: v.detach().clone() for k, v in t.model.state_dict().items()}\n"
    "        out.update({'critic.' + k: v.detach().clone() for k, v in t.agent.critic.state_dict().items()})\n"
    "        return out\n"
    "    digests = []\n"
    "    update = t.agent.update\n"
    "    def recorded(ro, update=update):\n"
    "        info = update(ro)\n"
    "        h = hashlib.sha256()\n"
    "        for k, v in sorted(weights().items()):\n"
    "            h.update(v.numpy().tobytes())\n"
    "        digests.append(h.hexdigest())\n"
    "        return info\n"
    "    t.agent.update = recorded\n"
    "    try:\n"
    "        final = t.run()\n"
    "        torch.save(weights(), os.path.join(spec['dump'], '%s_rank%d.pt' % (job['name'], r)))\n"
    "        rms = getattr(t.agent, 'obs_rms', None)\n"
    "        extra = {'obs_mean': rms.mean.tolist() if rms is not None else None,\n"
    "                 'reward_var': float(t.agent.reward_scaler.stats.var)}\n"
    "        json.dump({'digests': digests, 'final': final, 'local_envs': t.local_envs, 'extra': extra},\n"
    "                  open(os.path.join(spec['dump'], '%s_rank%d.json' % (job['name'], r)), 'w'))\n"
    "    finally:\n"
    "        t.close()\n"
    "    print('RUN %s DONE' % job['name'], flush=True)\n"
    "destroy_process_group(owned)\n"
)

#: the update alone on this rank's columns of a saved rollout, for each job (a run config, a rollout, scenarios)
UPDATE_DRIVER = (
    "import json, os, sys\n"
    "import torch\n"
    "from dpft.cli import _with_preset\n"
    "from dpft.config import compose\n"
    "from dpft.agents.finetune import Finetuner\n"
    "from dpft.train_utils import destroy_process_group, dist_info_from_env, init_process_group\n"
    "from tests.test_ddp_finetune import run_scenarios, slice_rollout\n"
    "spec = json.loads(sys.argv[1])\n"
    "owned = init_process_group(dist_info_from_env(), torch.device('cpu'))\n"
    "for job in spec['jobs']:\n"
    "    t = Finetuner(compose('finetune', _with_preset(job['overrides'])))\n"
    "    r = t.dist.rank\n"
    "    try:\n"
    "        ro = slice_rollout(torch.load(job['rollout']), r * t.local_envs, (r + 1) * t.local_envs)\n"
    "        res = run_scenarios(t, ro, job['scenarios'])\n"
    "        torch.save(res, os.path.join(spec['dump'], '%s_rank%d.pt' % (job['name'], r)))\n"
    "    finally:\n"
    "        t.close()\n"
    "destroy_process_group(owned)\n"
)


# ---------------------------------------------------------------------------------------------- helpers
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(driver, spec, timeout=150):
    """Run ``driver`` as ranks 0 and 1 of a gloo group; ``[(returncode, stdout, stderr)]`` per rank."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, "-c", driver, json.dumps(spec)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    for rc, out, err in results:
        assert rc == 0, err[-4000:]
    return results


def _ft(out, *args):
    from dpft.cli import _with_preset

    return compose("finetune", _with_preset(["out=%s" % out] + list(args)))


def rollout_tensors(ro):
    """The tensors of a :class:`dpft.agents.collector.Rollout` the update reads (time-major, env columns)."""
    return {"obs": dict(ro.obs), "act": dict(ro.act), "reward": ro.reward, "terminated": ro.terminated,
            "truncated": ro.truncated, "values": ro.values, "next_values": ro.next_values}


def slice_rollout(d, lo, hi):
    """The rollout of env columns ``lo:hi`` (what the rank holding those envs collects)."""
    from dpft.agents.collector import Rollout

    cols = lambda x: x[:, lo:hi].clone()  # noqa: E731
    return Rollout(obs={k: cols(v) for k, v in d["obs"].items()}, act={k: cols(v) for k, v in d["act"].items()},
                   reward=cols(d["reward"]), terminated=cols(d["terminated"]), truncated=cols(d["truncated"]),
                   values=cols(d["values"]), next_values=cols(d["next_values"]))


def run_scenarios(t, ro, scenarios):
    """For each scenario (``agent.<key>: value``): restore the initial weights, optimizers and reward scaler,
    seed the sampler generator 123 (rank 0's draws the minibatch permutation), run two updates on ``ro``;
    returns ``[{"weights": ..., "infos": [info, info]}]``."""
    import copy

    a = t.agent
    start = {"model": copy.deepcopy(t.model.state_dict()), "critic": copy.deepcopy(a.critic.state_dict()),
             "opt": {k: copy.deepcopy(o.state_dict()) for k, o in a.optimizers().items()},
             "sched": {k: copy.deepcopy(s.state_dict()) for k, s in a.schedulers().items()},
             "scaler": a.reward_scaler.state_dict(), "cfg": copy.deepcopy(a.cfg), "iters": a.train_iterations}
    out = []
    for sc in scenarios:
        t.model.load_state_dict(start["model"])
        a.critic.load_state_dict(start["critic"])
        for k, o in a.optimizers().items():
            o.load_state_dict(start["opt"][k])
        for k, s in a.schedulers().items():
            s.load_state_dict(start["sched"][k])
        a.reward_scaler.load_state_dict(start["scaler"])
        a.train_iterations = start["iters"]
        a.cfg = copy.deepcopy(start["cfg"])
        for k, v in sc.items():
            setattr(a.cfg, k, v)
        a.gen.manual_seed(123)
        infos = [a.update(ro), a.update(ro)]
        w = {"model." + k: v.detach().clone() for k, v in t.model.state_dict().items()}
        w.update({"critic." + k: v.detach().clone() for k, v in a.critic.state_dict().items()})
        out.append({"weights": w, "infos": infos})
    return out


def _digest_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- the update
def test_sample_layout_maps_global_samples_to_their_rank():
    """(T=2, N=4 envs, S=3 samples per env step) over 2 ranks of 2 envs: global sample s = (t*4 + n)*3 + k."""
    from dpft.rl.data_parallel import SampleLayout

    r0, r1 = SampleLayout(2, 2, 3, 0, 2), SampleLayout(2, 2, 3, 1, 2)
    assert r0.total == r1.total == 24
    # s=7: row 2 (t=0, env 2 -> rank 1, its env 0), k=1 -> local (0*2 + 0)*3 + 1 = 1
    # s=14: row 4 (t=1, env 0 -> rank 0, its env 0), k=2 -> local (1*2 + 0)*3 + 2 = 8
    # s=23: row 7 (t=1, env 3 -> rank 1, its env 1), k=2 -> local (1*2 + 1)*3 + 2 = 11
    idx = torch.tensor([7, 14, 23, 0])
    assert r0.local(idx).tolist() == [8, 0] and r1.local(idx).tolist() == [1, 11]
    # every global sample on exactly one rank, at the place the rank's own (T, N_l, S) layout puts it
    ids = torch.arange(24).reshape(2, 4, 3)
    everything = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    seen = []
    for r, lay in enumerate((r0, r1)):
        mine = ids[:, 2 * r:2 * r + 2].reshape(-1)
        loc = lay.local(everything)
        assert sorted(loc.tolist()) == list(range(12))
        seen += mine[loc].tolist()
    assert sorted(seen) == list(range(24))


def _reference(tmp_path, name, overrides, n_steps, scenarios):
    """A single process with all 4 envs: collect one rollout (saved for the ranks), run the scenarios on it."""
    from dpft.agents.finetune import Finetuner

    ref = Finetuner(_ft(tmp_path / ("single_" + name), *overrides))
    try:
        ref.collector.reset([1000 + i for i in range(4)])
        ro = ref.collector.collect(n_steps)
        assert ro.shape == (n_steps, 4)
        path = str(tmp_path / ("rollout_%s.pt" % name))
        torch.save(rollout_tensors(ro), path)
        return path, run_scenarios(ref, ro, scenarios)
    finally:
        ref.close()


@pytest.mark.slow  # two processes (~20 s on an idle 2-core machine, mostly imports)
def test_two_rank_update_equals_single_process_update(tmp_path, diffusion_run):
    ppo_scenarios = [
        {},  # ppo_scratch: 4 minibatches of 16, 2 epochs, grad clip 0.5, value clip, running reward scaling
        {"target_kl": 1e-7},  # the KL stop fires after the first minibatch step (ratio 1 there: KL 0)
        {"batch_size": 1, "update_epochs": 1},  # 64 one-sample minibatches: one rank has none in each
    ]
    dppo = ["agent=dppo", "checkpoint=%s" % diffusion_run, "envs=4", "n_steps=3", "agent.ft_denoising_steps=3",
            "agent.batch_size=8", "agent.update_epochs=2", "agent.critic_dims=[16,16,16]", "agent.n_critic_warmup_itr=0",
            "eval_episodes=1", "max_episode_steps=20", "progress=false", "num_threads=1", "inril.monitor_every=0"]
    dppo_scenarios = [{}, {"batch_size": 5, "clip_vloss": 0.2}]  # (env step, denoising step) pairs: 36 per rollout
    jobs = []
    want = {}
    for name, overrides, n_steps, scenarios in (("ppo", SCRATCH, 16, ppo_scenarios), ("dppo", dppo, 3, dppo_scenarios)):
        path, want[name] = _reference(tmp_path, name, overrides, n_steps, scenarios)
        jobs.append({"name": name, "overrides": ["out=%s" % (tmp_path / ("ddp_" + name))] + list(overrides),
                     "rollout": path, "scenarios": scenarios})
    dump = tmp_path / "dump"
    dump.mkdir()
    launch_pair(UPDATE_DRIVER, {"jobs": jobs, "dump": str(dump)})
    for job in jobs:
        name = job["name"]
        got = [torch.load(str(dump / ("%s_rank%d.pt" % (name, r)))) for r in range(2)]
        for i, sc in enumerate(job["scenarios"]):
            w0, w1, ws = got[0][i]["weights"], got[1][i]["weights"], want[name][i]["weights"]
            assert _digest_equal(w0, w1), (name, sc)  # every rank applied the same summed gradients
            for k in ws:
                torch.testing.assert_close(w0[k], ws[k], rtol=1e-4, atol=2e-5,
                                           msg=lambda m: "%s %s %s: %s" % (name, sc, k, m))
            for info0, info1, info_s in zip(got[0][i]["infos"], got[1][i]["infos"], want[name][i]["infos"]):
                assert info0 == info1
                assert set(info0) == set(info_s), (name, sc)
                assert info0["grad_steps"] == info_s["grad_steps"] and info0["kl_stop"] == info_s["kl_stop"], sc
                for key in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "ratio", "entropy", "explained_variance"):
                    if key in info_s:  # (no step taken: no losses)
                        assert info0[key] == pytest.approx(info_s[key], rel=1e-4, abs=1e-6), (name, sc, key)
    steps = [[info["grad_steps"] for info in w["infos"]] for w in want["ppo"]]
    assert steps[0] == [8, 8] and steps[2] == [64, 64]
    assert steps[1][0] == 1 and want["ppo"][1]["infos"][0]["kl_stop"]  # the stop fired before the second step
    assert [[info["grad_steps"] for info in w["infos"]] for w in want["dppo"]] == [[8, 8], [14, 14]]


# ---------------------------------------------------------------------------------------------- the loop
def _rank_results(dump, name):
    ranks = [json.loads((dump / ("%s_rank%d.json" % (name, r))).read_text()) for r in range(2)]
    weights = [torch.load(str(dump / ("%s_rank%d.pt" % (name, r)))) for r in range(2)]
    assert ranks[0]["digests"] == ranks[1]["digests"], name  # identical replicas after every iteration
    assert _digest_equal(weights[0], weights[1]), name
    return ranks, weights[0]


@pytest.mark.slow  # two processes running three short fine-tuning runs (~30 s on an idle 2-core machine)
def test_two_rank_finetune_ppo_hopper_and_exact_resume(tmp_path, capsys):
    run, split, dump = tmp_path / "run", tmp_path / "split", tmp_path / "dump"
    dump.mkdir()
    first = [o for o in SCRATCH if not o.startswith("iterations=")] + ["iterations=1"]
    res = launch_pair(LOOP_DRIVER, {"dump": str(dump), "runs": [
        {"name": "full", "overrides": ["out=%s" % run] + SCRATCH},
        # the same run in two sessions (1 iteration, then resume=true to 2)
        {"name": "part", "overrides": ["out=%s" % split] + first},
        {"name": "resumed", "overrides": ["out=%s" % split, "resume=true"] + SCRATCH}]})
    ranks, w = _rank_results(dump, "full")
    assert [x["local_envs"] for x in ranks] == [2, 2] and len(ranks[0]["digests"]) == 2
    assert ranks[0]["extra"] == ranks[1]["extra"]  # global observation and return statistics on both ranks
    # rank 0 alone wrote: one checkpoint per iteration, metrics once per iteration (plus the start's evaluation)
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000001", "step_00000002"]
    recs = read_metrics(str(run))
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert [r["env_steps"] for r in recs] == [0, 64, 128]  # 16 chunks x 4 envs (both ranks) per iteration
    assert "eval/return" in recs[0] and "eval/return" in recs[2]
    assert res[0][1].count("done at iteration 2") == 2 and "done at" not in res[1][1]
    final = run / "checkpoints" / "step_00000002"
    saved = load_file(str(final / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, w["model." + k]), k
    assert json.loads((final / "training_state" / "step.json").read_text())["world_size"] == 2
    assert (run / "finetune_curves.png").is_file()
    # resumed under DDP: bit-identical to the uninterrupted run
    assert "resumed from" in res[0][1] and "resumed from" not in res[1][1]
    _, resumed = _rank_results(dump, "resumed")
    assert _digest_equal(resumed, w)
    assert [r["env_steps"] for r in read_metrics(str(split))] == [0, 64, 128]

    # the DDP run's checkpoint is the single-process layout: one process resumes it (warned: not bit-exact), and
    # it loads as a policy
    import dpft
    from dpft.agents.finetune import finetune

    more = [o for o in SCRATCH if not o.startswith("iterations=")] + ["iterations=3", "resume=true"]
    finetune(_ft(run, *more))
    assert "written by 2 process(es) and this run has 1" in capsys.readouterr().err
    assert [r["env_steps"] for r in read_metrics(str(run))] == [0, 64, 128, 192]
    assert dpft.load_policy(str(run)) is not None


@pytest.mark.slow  # two processes, one DPPO and one residual PPO iteration (~25 s on an idle 2-core machine)
def test_two_rank_dppo_and_residual_ppo_iteration(tmp_path, diffusion_run):
    dump = tmp_path / "dump"
    dump.mkdir()
    common = ["checkpoint=%s" % diffusion_run, "envs=2", "n_steps=4", "iterations=1", "eval_episodes=1",
              "max_episode_steps=20", "progress=false", "num_threads=1", "agent.batch_size=8", "agent.update_epochs=1",
              "agent.critic_dims=[16,16,16]", "agent.n_critic_warmup_itr=0"]
    launch_pair(LOOP_DRIVER, {"dump": str(dump), "runs": [
        {"name": "dppo", "overrides": ["out=%s" % (tmp_path / "dppo"), "agent=dppo", "agent.ft_denoising_steps=3"]
         + common},
        {"name": "residual", "overrides": ["out=%s" % (tmp_path / "res"), "agent=residual_ppo", "agent.mlp_dims=[16]"]
         + common}]})
    for name, out in (("dppo", "dppo"), ("residual", "res")):
        ranks, w = _rank_results(dump, name)
        assert len(ranks[0]["digests"]) == 1
        recs = read_metrics(str(tmp_path / out))
        assert [r["iteration"] for r in recs] == [0, 1] and recs[1]["grad_steps"] >= 1, name
        saved = load_file(str(tmp_path / out / "checkpoints" / "step_00000001" / "model.safetensors"))
        assert all(torch.equal(v, w["model." + k]) for k, v in saved.items()), name


# ---------------------------------------------------------------------------------------------- refusals
def _as_rank(monkeypatch, rank=0, world=2):
    for k, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(k, str(v))


def test_envs_not_divisible_by_world_size_names_both(tmp_path, monkeypatch):
    from dpft.agents.finetune import Finetuner

    _as_rank(monkeypatch, world=2)
    args = [o for o in SCRATCH if not o.startswith("envs=")] + ["envs=3"]
    with pytest.raises(DpftError) as e:
        Finetuner(_ft(tmp_path / "o", *args))
    msg = str(e.value)
    assert "envs=3" in msg and "number of DDP processes (2)" in msg and "envs=2" in msg
    assert not (tmp_path / "o").exists()  # refused before out= was touched


def test_idql_and_inril_refused_under_ddp(tmp_path, monkeypatch):
    from dpft.agents.finetune import _check_data_parallel

    _as_rank(monkeypatch, world=2)
    c = _ft(tmp_path / "o", *SCRATCH)
    from dpft.config import to_object

    obj = to_object(c)
    obj.agent.name = "idql"
    with pytest.raises(DpftError, match="agent=idql does not run data-parallel"):
        _check_data_parallel(obj, 2)
    obj = to_object(c)
    obj.inril.m = "10"
    with pytest.raises(DpftError, match=r"IN-RIL / CAIR \(inril.m=10"):
        _check_data_parallel(obj, 2)
    assert _check_data_parallel(to_object(c), 2) == 2 and _check_data_parallel(to_object(c), 1) == 4
