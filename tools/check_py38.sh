#!/usr/bin/env bash
# Python 3.8 check for code users run beside Isaac Gym: byte-compile every module with a real 3.8 and load the
# config schemas through OmegaConf (which evaluates dataclass annotations) from a regular, non-editable install.
# Skips (exit 0) when no python3.8 is on PATH; the static check (vermin) in .ci/run always runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY38=""
for cand in "$(command -v python3.8 || true)" $(ls -d "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.8*/bin/python3.8 2>/dev/null); do
  if [ -n "$cand" ] && "$cand" -c "import sys; assert sys.version_info[:2] == (3, 8)" 2>/dev/null; then PY38="$cand"; break; fi
done
if [ -z "$PY38" ]; then
  echo "check_py38: no python3.8 here; skipped (vermin -t=3.8- still checks the code statically)"
  exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY38" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip -q --disable-pip-version-check install hydra-core >/dev/null 2>&1
cp -r "$ROOT" "$TMP/src" && rm -rf "$TMP/src/.venv" "$TMP/src/.git"
"$TMP/venv/bin/python" -m compileall -q "$TMP/src/dpft" "$TMP/src/agents" "$TMP/src/envs" "$TMP/src/tools"
"$TMP/venv/bin/python" -m pip -q --disable-pip-version-check install --no-deps "$TMP/src" >/dev/null 2>&1
(cd "$TMP" && "$TMP/venv/bin/python" - <<'PY'
import sys
from dpft.config import SCHEMAS, compose, to_object
required = {"pretrain": ["dataset=a.hdf5", "out=r"], "demos": ["out=a.hdf5"], "rollout": ["checkpoint=r"],
            "finetune": ["env=hopper", "agent=ppo", "out=r"]}
for name in SCHEMAS:
    # finetune's validate() checks inril/cair settings with dpft.rl (torch), which this torch-free venv lacks:
    # its schema still goes through OmegaConf (annotations evaluated), without the cross-field checks
    to_object(compose(name, required.get(name, []), validate=name != "finetune"))
for policy in ("diffusion_mlp", "diffusion_unet", "gaussian_mlp"):
    to_object(compose("pretrain", required["pretrain"] + ["policy=" + policy]))
print("check_py38: Python %s compiles dpft and loads every config schema" % sys.version.split()[0])
PY
)
