#!/usr/bin/env bash
# The GPU throughput measurement as one prepared command: MFU of the ~0.5B configuration with
# fsdp + bf16 + compile (goal: at least 45%), plus the card, the versions and a profile-free table.
# Written for an offline GPU machine reached through a short-lived remote runner, so it is sized
# to finish in ~5 minutes:
#
#   bash bench/gpu_wheels.sh                                     # here, once: .whl/ (git-ignored)
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Results land in $OUT (the device tool brings them back): env.txt, throughput.txt / .json.
# On any machine: VLM_CHECK_DEVICE=cpu VLM_CHECK_SIZES=tiny bash bench/gpu_check.sh (a dry run of
# the same steps; OUT defaults to /tmp/vlm_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vlm_gpu_check}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # packages the image lacks, installed beside it
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DEVICE=${VLM_CHECK_DEVICE:-cuda}
SIZES=${VLM_CHECK_SIZES:-0.5b}
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 - <<'PY'
import sys
import torch, lightning, hydra, omegaconf, webdataset, tokenizers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| lightning", lightning.__version__,
      "| hydra", hydra.__version__, "| cuda", torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "environment check failed (see $OUT/env.txt): a missing package? run bash bench/gpu_wheels.sh first and carry .whl"; exit 1; }
set -x
timeout 420 python3 bench/train_throughput.py --device "$DEVICE" --sizes "$SIZES" --strategies fsdp --compile \
    --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"
