#!/usr/bin/env bash
# One prepared check of every CUDA path of dpft, for a few minutes on a lent GPU. Prints figures; exits non-zero on
# the first failing check. Run from the repository root with the project's virtualenv:
#
#     bash tools/gpu_check.sh                # all checks (about 5 minutes on one H100)
#     GPU_CHECK_OUT=/tmp/gc bash tools/gpu_check.sh
#
# Checks, in order: torch sees CUDA; pretraining throughput on CUDA (tools/bench_pretrain.py); the quickstart on CUDA
# (scripted demos on the mujoco backend -> pretraining -> rollout -> DPPO fine-tuning -> rollout: sampling and the
# DPPO update on the GPU); the GPU controller path (the batched OSC controller's torch twin on CUDA against numpy, at
# 1,024-8,192 envs); MuJoCo Warp if installed (import and a batched step of Lift's model); data-parallel pretraining
# with NCCL when more than one GPU is visible; tools/furniture_check.py when it exists and Isaac Gym imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-${OUT:-/tmp/dpft_gpu_check}}
mkdir -p "$OUT"
export MUJOCO_GL=${MUJOCO_GL:-egl}
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }

step "torch and CUDA"
$PY - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False: no usable CUDA device"
n = torch.cuda.device_count()
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", n,
      [torch.cuda.get_device_name(i) for i in range(n)])
EOF
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")

step "pretraining throughput on CUDA (tools/bench_pretrain.py, 20 s)"
$PY tools/bench_pretrain.py --device cuda --seconds 20 2>&1 | tail -5

step "quickstart on CUDA: demos (mujoco backend) -> pretrain -> rollout -> DPPO -> rollout"
$PY -m dpft quickstart out="$OUT/quickstart" device=cuda demos=6 steps=300 finetune=2 episodes=6 videos=1 2>&1 | tail -15

step "GPU controller path: torch twin of the batched OSC controller on CUDA vs numpy"
$PY - <<'EOF'
import time
import numpy as np
import torch
from dpft.envs.render import setup_rendering
setup_rendering(require=False)
from dpft.envs import osc_batch as osc
from dpft.envs.robosuite_env import RobosuiteEnv, default_env_args

env = RobosuiteEnv(default_env_args("lift"))
p = osc.OSCParams.from_robosuite(env.env.robots[0])
env.close()
xp = osc.torch_namespace("cuda")
rng = np.random.default_rng(0)
for b in (1024, 8192):
    q = rng.normal(size=(b, 4)); q /= np.linalg.norm(q, axis=1, keepdims=True)
    mat = osc.quat2mat(q)
    a = rng.uniform(-1, 1, size=(b, 6))
    pos, bpos = rng.normal(size=(b, 3)), rng.normal(size=(b, 3))
    jac = rng.normal(size=(b, 6, 7))
    mass = rng.normal(size=(b, 7, 7)); mass = mass @ np.swapaxes(mass, 1, 2) + 7 * np.eye(7)
    vel, bvel = rng.normal(size=(b, 6)), np.zeros((b, 6))
    bias, qq, qd, q0 = (rng.normal(size=(b, 7)) for _ in range(4))
    args = (pos, mat, vel, bpos, mat, bvel, jac, mass, bias, qq, qd, q0)
    gp, go = osc.osc_goal(a, pos, mat, bpos, mat, p)
    ref = osc.osc_torques(gp, go, *args, p)
    t = [torch.as_tensor(x, device="cuda") for x in (gp, go) + args]
    out = osc.osc_torques(*t, p, xp=xp); torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(20):
        out = osc.osc_torques(*t, p, xp=xp)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t1) / 20
    err = float(np.abs(out.cpu().numpy() - ref).max())
    print("envs %5d: max |cuda - numpy| = %.1e, %.2f ms per controller substep (%.0f env-substeps/s)"
          % (b, err, dt * 1e3, b / dt))
    assert err < 1e-6, err
EOF

step "MuJoCo Warp (optional extra: pip install mujoco-warp warp-lang)"
if $PY -c "import mujoco_warp" 2>/dev/null; then
$PY - <<'EOF'
import time
import mujoco
import mujoco_warp as mjw
import warp as wp
from dpft.envs.render import setup_rendering
setup_rendering(require=False)
from dpft.envs.mujoco_backend import MujocoSim
from dpft.envs.robosuite_env import convert_legacy_env_args, default_env_args

sim = MujocoSim(convert_legacy_env_args(default_env_args("lift")))
sim.reset(sim.add_env(), 0)
m = mjw.put_model(sim.model)
for n in (1024, 8192):
    d = mjw.put_data(sim.model, sim.datas[0], nworld=n)
    mjw.step(m, d); wp.synchronize()
    t = time.perf_counter()
    for _ in range(25):
        mjw.step(m, d)
    wp.synchronize()
    dt = time.perf_counter() - t
    print("mujoco_warp Lift, %d worlds: %.0f env steps/s (25 substeps each, no controller)" % (n, n / dt))
EOF
else
  echo "mujoco_warp not installed: skipped (the controller's torch twin above is the GPU path's control law)"
fi

if [ "$NGPU" -gt 1 ]; then
  step "data-parallel pretraining with NCCL on $NGPU GPUs"
  DS="$OUT/quickstart/demos.hdf5"
  [ -f "$DS" ] || DS=$(ls "$OUT"/quickstart/*.hdf5 | head -1)
  $PY -m torch.distributed.run --nproc_per_node "$NGPU" -m dpft pretrain dataset="$DS" out="$OUT/ddp" \
      device=cuda steps=100 2>&1 | tail -5
else
  step "data-parallel (NCCL): one GPU visible, skipped"
fi

if [ -f tools/furniture_check.py ] && $PY -c "import isaacgym" 2>/dev/null; then
  step "FurnitureBench on Isaac Gym (tools/furniture_check.py)"
  $PY tools/furniture_check.py 2>&1 | tail -10
else
  step "FurnitureBench: tools/furniture_check.py or isaacgym missing, skipped"
fi

step "all checks passed"
