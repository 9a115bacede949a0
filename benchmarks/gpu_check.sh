#!/usr/bin/env bash
# GPU check: train + certify `ibp` on `digits` on CUDA through the Python API, then time one
# training step per method (benchmarks/step_cost.py). For a machine with an NVIDIA GPU and a
# Python 3 that has its own torch, numpy, scipy and scikit-learn but no pydantic/pyyaml and no
# package registry: the wheels come along in .whl/ (see benchmarks/README.md for how to make it).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# DEVICE=cpu bash benchmarks/gpu_check.sh runs the same phases on the CPU (a local dry run).
set -euo pipefail

DEVICE="${DEVICE:-cuda}"
REPEATS="${REPEATS:-30}"
PYTHON="${PYTHON:-python3}"
export CERTREPRO_DOWNLOAD=0  # digits ships with scikit-learn: nothing to download, ever
export CERTREPRO_HOME="${CERTREPRO_HOME:-/tmp/certrepro-gpu-check}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

T0=$(date +%s.%N)
PHASE_T=$T0
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
phase() {  # phase NAME: close the previous phase (print its time) and open the next
  local now
  now=$(date +%s.%N)
  if [[ -n "${PHASE_NAME:-}" ]]; then
    printf '=== %s: %s s\n' "$PHASE_NAME" "$(elapsed "$PHASE_T" "$now")"
  fi
  PHASE_NAME="$1"
  PHASE_T=$now
  [[ -n "$1" ]] && printf '\n=== %s\n' "$1"
  return 0
}

phase "install wheels"
if [[ -d .whl ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
  ls .whl
else
  echo "no .whl folder: using the packages $PYTHON already has"
  export PYTHONPATH="$PWD"
fi

phase "versions"
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
"$PYTHON" - "$DEVICE" <<'EOF'
import sys, platform
import torch, pydantic, yaml
device = sys.argv[1]
print(f"python {platform.python_version()}  torch {torch.__version__}  "
      f"pydantic {pydantic.VERSION}  pyyaml {yaml.__version__}")
print(f"torch.cuda.is_available(): {torch.cuda.is_available()}  "
      f"torch.version.cuda: {torch.version.cuda}")
if device == "cuda":
    print("device:", torch.cuda.get_device_name(0))
EOF

phase "train + certify ibp on digits ($DEVICE)"
"$PYTHON" - "$DEVICE" <<'EOF'
import sys, time
import torch
from workers.core.attacks import PGD
from workers.core.bounds import PerturbationSet
from workers.core.certify import certify
from workers.core.config import RunConfig, resolve
from workers.core.data import load_split
from workers.core.train import train

device = sys.argv[1]
# 20 short epochs (29 steps each): kappa 1 -> 0.5 and eps 0 -> 0.15 over epochs 2-10, lr x0.1 at
# 15. On the CPU (torch 2.13, 2 threads) this reaches clean 0.92 / PGD 0.67 / IBP-verified 0.60.
cfg = resolve(RunConfig(method="ibp", dataset="digits", model="small", eps=0.1, eps_train=0.15,
                        epochs=20, batch_size=50, device=device, optimizer={"lr_milestones": [15]},
                        schedule={"warmup_epochs": 2, "rampup_epochs": 8}))
x, y = load_split("digits", "train")
xt, yt = load_split("digits", "test")
print(f"train {tuple(x.shape)}, test {tuple(xt.shape)}")
began = time.perf_counter()
result = train(cfg, x, y)
print(f"train: {time.perf_counter() - began:.1f} s; sec/epoch "
      + ", ".join(f"{s:.2f}" for s in result.sec_per_epoch))
for epoch, means in enumerate(result.history, 1):
    if epoch in (1, 2, 5, 10, 15, 20):
        print(f"  epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(means.items())))
devices = {str(p.device) for p in result.model.parameters()}
print("parameter devices:", devices)
if not all(p.device.type == device for p in result.model.parameters()):
    sys.exit(f"FAIL: parameters on {devices}, expected {device}")
began = time.perf_counter()
cert = certify(result.model, xt, yt, PerturbationSet("linf", 0.1), ["ibp"], PGD(steps=50, restarts=2))
m = cert.metrics()
print(f"certify: {time.perf_counter() - began:.1f} s")
print(f"clean acc {m['clean_acc']:.3f}  PGD acc {m['pgd_acc']:.3f}  "
      f"IBP-verified acc {m['verified_acc']['ibp']:.3f}  (eps 0.1, {len(yt)} test examples)")
if not m["verified_acc"]["ibp"] <= m["pgd_acc"] <= m["clean_acc"]:
    sys.exit("FAIL: expected verified <= PGD <= clean accuracy (a certificate must imply both)")
if m["verified_acc"]["ibp"] == 0:
    sys.exit("FAIL: nothing IBP-verified: IBP training did not work on this device")
if m["clean_acc"] < 0.8 or m["verified_acc"]["ibp"] < 0.4:
    print("WARNING: accuracies well below the CPU reference (0.92 / 0.67 / 0.60)")
EOF

phase "rows with every diagnostic ($DEVICE): toy2d ibp, digits bcp and local_lip_b"
"$PYTHON" - "$DEVICE" <<'EOF'
import math, sys, tempfile, time
from workers.runner import run_row

device = sys.argv[1]
lipschitz = dict(dataset="digits", model="mlp2x100", norm="l2", eps=0.5, eps_train=0.5, epochs=3,
                 batch_size=64, train_limit=500, test_limit=100, device=device,
                 schedule={"warmup_epochs": 0, "rampup_epochs": 2}, attack={"steps": 20})
rows = {
    "toy2d ibp (bound_area)": dict(method="ibp", dataset="toy2d", model="mlp3x100", eps=0.08,
                                   eps_train=0.08, epochs=50, batch_size=13, augment=False,
                                   certifiers=["ibp"], test_limit=13, device=device,
                                   attack={"steps": 20}),
    "digits bcp": dict(lipschitz, method="bcp", certifiers=["bcp", "lipschitz", "local_lip"]),
    "digits local_lip_b": dict(lipschitz, method="local_lip_b", certifiers=["local_lip"]),
}


def numbers(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)):
            yield f"{prefix}{key}", value


failed = []
for name, config in rows.items():
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        result = run_row(config, workdir)
    metrics = dict(numbers(result["metrics"]))
    history = dict(numbers(result["history"][-1]))
    print(f"{name}: {time.perf_counter() - began:.1f} s on {result['device']}")
    print("  metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    print("  last epoch: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(history.items())))
    print("  figure data: " + (", ".join(sorted(result.get("figure_data") or {})) or "none"))
    bad = [k for k, v in {**metrics, **history}.items() if not math.isfinite(v)]
    if bad:
        failed.append(f"{name}: not finite: {bad}")
if failed:
    sys.exit("FAIL: " + "; ".join(failed))
EOF

phase "step cost ($DEVICE, --repeats $REPEATS)"
# STEP_COST_ARGS: extra flags, e.g. "--batch-size 32 --warmup 1" for a quick CPU dry run
# shellcheck disable=SC2086
"$PYTHON" benchmarks/step_cost.py --device "$DEVICE" --repeats "$REPEATS" \
  --json "${STEP_COST_JSON:-/tmp/step_cost_$DEVICE.json}" ${STEP_COST_ARGS:-}
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp "${STEP_COST_JSON:-/tmp/step_cost_$DEVICE.json}" "$OUT/"; fi

phase ""
printf '\n=== total: %s s\n' "$(elapsed "$T0" "$(date +%s.%N)")"
