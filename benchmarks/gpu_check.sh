#!/usr/bin/env bash
# The GPU checks as one prepared command, for a lent CUDA machine whose python3 already has
# torch, transformers, pytest and matplotlib (nothing is installed from a registry here).
#
#   bash benchmarks/gpu_check.sh OUT [STAGE...]
#
# STAGE (default: tests bf16): tests (tests/test_cuda.py: attention, module, torch.compile and
# LRA training on CUDA), bf16 (`nystromer bench speed --device cuda --dtype bfloat16`, the GPU
# section's command) or fp32 (the same in float32), at the lengths in $LENGTHS (default
# 1024,4096,16384,65536,131072) and the implementations in $IMPLS (default: all). DEVICE=cpu
# runs every stage on the CPU, which checks this script without a GPU.
#
# OUT receives at most 8 files (what the device tool brings back): check.log and
# gpu/<dtype>/speed.json per bench stage. Copy those to docs/bench/gpu/<dtype>/speed.json on the
# development machine and run `nystromer bench report --only gpu`. The peer nystrom-attention is
# measured when its wheel lies in .whl/ (`pip download nystrom-attention==0.0.14 --no-deps -d
# .whl`, ignored by git, named in the device tool's carry); without it, its rows say so.
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT [tests|bf16|fp32 ...]}
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests bf16)
py=${PYTHON:-python3}
lengths=${LENGTHS:-1024,4096,16384,65536,131072}
device=${DEVICE:-cuda}
impls=()
[ -z "${IMPLS:-}" ] || impls=(--impl "$IMPLS")
scratch=$(mktemp -d)
mkdir -p "$out"
log="$out/check.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export NYSTROMER_TEST_DEVICE=$device
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target "$scratch/site" .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:$scratch/site"
fi
status=0
{
    [ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$log"
for stage in "${stages[@]}"; do
    echo "=== $stage ($(date -u +%H:%M:%S))" | tee -a "$log"
    case $stage in
    tests)
        "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$log" ||
            status=1
        ;;
    bf16 | fp32)
        dtype=$([ "$stage" = bf16 ] && echo bfloat16 || echo float32)
        "$py" -m nystromer bench speed --device "$device" --dtype "$dtype" \
            --lengths "$lengths" "${impls[@]}" --out "$scratch/$dtype" 2>&1 | tee -a "$log" ||
            status=1
        mkdir -p "$out/gpu/$dtype"
        cp "$scratch/$dtype/speed.json" "$out/gpu/$dtype/" 2>>"$log" || status=1
        ;;
    *)
        echo "unknown stage $stage: expected tests, bf16 or fp32" | tee -a "$log"
        status=2
        ;;
    esac
done
echo "=== done ($(date -u +%H:%M:%S)), status $status" | tee -a "$log"
rm -rf "$scratch"
exit $status
