#!/usr/bin/env bash
# The GPU checks, run as is from the repository root of a machine with a GPU:
#   1. the gpu tests (ctest label gpu, pytest -m gpu),
#   2. the NCCL all-reduce bench (bus bandwidth as nccl-tests computes it),
#   3. the GPU training bench: a LoRA step's tokens/s and MFU, lathe against
#      transformers + peft, on Qwen3-8B- and Qwen3-30B-A3B-shaped models.
# It uses gpu-bundle/ (scripts/gpu_bundle.sh, made where lathe was built;
# libtorch and NCCL from this machine's torch wheel) or, without one, the
# CUDA build in build-cuda/. Anything missing stops it with the reason.
# About 5 minutes on one H200. Prints "gpu_check: ok" at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
PY=${LATHE_GPU_PYTHON:-python3}
command -v "$PY" >/dev/null || fail "no $PY (set LATHE_GPU_PYTHON to a Python with the CUDA torch wheel)"
"$PY" -c 'import torch' 2>/dev/null || fail "$PY cannot import torch"
# torch's version, its lib folder, the CUDA wheels' lib folders (NCCL, the
# CUDA runtime) and the GPUs it sees.
probe=$("$PY" -c '
import os, torch, nvidia
libs = [os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("nccl", "cu13")]
print(torch.__version__, os.path.join(os.path.dirname(torch.__file__), "lib"),
      ":".join(l for l in libs if os.path.isdir(l)) or "-",
      torch.cuda.device_count() if torch.cuda.is_available() else 0)') || fail "$PY could not describe its torch"
read -r TORCH_VERSION TORCH_LIB WHEEL_LIBS GPUS <<<"$probe"
[ "$WHEEL_LIBS" != - ] || fail "no nvidia-nccl-cu13 / CUDA runtime wheel next to torch $TORCH_VERSION"
[ "$GPUS" -gt 0 ] || fail "torch $TORCH_VERSION sees no CUDA device (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"
echo "gpu_check: torch $TORCH_VERSION, $GPUS GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

if [ -d gpu-bundle/bin ]; then
  BIN=gpu-bundle/bin
  want=$(cat gpu-bundle/torch_version)
  [ "${want%%+*}" = "${TORCH_VERSION%%+*}" ] ||
    fail "gpu-bundle was built against torch $want but this machine has $TORCH_VERSION (libtorch's ABI must match)"
  export OPAL_PREFIX=$PWD/gpu-bundle/ompi
  export OMPI_MCA_mca_base_component_path=$PWD/gpu-bundle/ompi/$(cat gpu-bundle/ompi/plugins_dir)
  export OMPI_MCA_mca_base_component_show_load_errors=0
  export LD_LIBRARY_PATH=$PWD/gpu-bundle/lib:$TORCH_LIB:$WHEEL_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  declare -A where=([runtime_gpu_test]=$BIN [nccl_context_mpi]=$BIN [nccl_communicator_mpi]=$BIN
                    [lathe_harness]=$BIN [allreduce_bench]=$BIN [train_bench]=$BIN)
  BUILD_FOR_BENCH=gpu-bundle
elif [ -f build-cuda/build.ninja ]; then
  BIN=build-cuda
  declare -A where=([runtime_gpu_test]=$BIN/tests/gpu [nccl_context_mpi]=$BIN/tests/gpu
                    [nccl_communicator_mpi]=$BIN/tests/parallel [lathe_harness]=$BIN/tests
                    [allreduce_bench]=$BIN/bench [train_bench]=$BIN/bench)
  BUILD_FOR_BENCH=build-cuda
else
  fail "neither gpu-bundle/ (bash scripts/gpu_bundle.sh where lathe was built) nor build-cuda/ (LATHE_CUDA=1 bash scripts/build.sh) is here"
fi
for b in "${!where[@]}"; do
  [ -x "${where[$b]}/$b" ] || fail "${where[$b]}/$b is missing"
done
# Open MPI as root, and a single process without mpirun (no launcher here).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_ess_singleton_isolated=1
if ldd "${where[train_bench]}/train_bench" | grep -q "not found"; then
  fail "unresolved libraries: $(ldd "${where[train_bench]}/train_bench" | grep 'not found' | tr -s ' ' | tr '\n' ';')"
fi

echo "== gpu tests"
set +e
"${where[runtime_gpu_test]}/runtime_gpu_test"
rc=$?
set -e
[ "$rc" -eq 77 ] && fail "runtime_gpu_test skipped on a machine with a GPU"
[ "$rc" -eq 0 ] || fail "runtime_gpu_test exited $rc"
# The NCCL backend's collectives on one rank (a singleton without mpirun).
timeout 120 "${where[nccl_communicator_mpi]}/nccl_communicator_mpi" || fail "nccl_communicator_mpi on one GPU"
if [ "$GPUS" -ge 2 ] && command -v mpirun >/dev/null; then
  timeout 120 mpirun --oversubscribe -np 2 "${where[nccl_context_mpi]}/nccl_context_mpi" ||
    fail "nccl_context_mpi over 2 GPUs"
else
  echo "SKIP nccl_context_mpi_np2: needs 2 GPUs and mpirun ($GPUS GPU(s), mpirun: $(command -v mpirun || echo none))"
fi
LATHE_HARNESS=$PWD/${where[lathe_harness]}/lathe_harness OMP_NUM_THREADS=4 \
  timeout 300 "$PY" -m pytest tests/parity/test_gpu.py -m gpu -q -p no:cacheprovider -x ||
  fail "pytest -m gpu"

echo "== NCCL all-reduce bench (busbw = algbw x 2(n-1)/n, as nccl-tests)"
if [ "$GPUS" -ge 2 ] && command -v mpirun >/dev/null; then
  timeout 180 mpirun --oversubscribe -np "$GPUS" "${where[allreduce_bench]}/allreduce_bench" --backend nccl --max_mib 1024
else
  echo "(one process: $GPUS GPU(s) or no mpirun; with n = 1 the bus bandwidth is 0 by definition)"
  timeout 180 "${where[allreduce_bench]}/allreduce_bench" --backend nccl --max_mib 1024
fi

echo "== GPU training bench (LoRA step: lathe vs transformers + peft, bf16, SDPA, gradient checkpointing)"
PYTHONUNBUFFERED=1 timeout 420 "$PY" bench/gpu_train.py --build-dir "$BUILD_FOR_BENCH" --device cuda ||
  fail "bench/gpu_train.py"
echo "gpu_check: ok"
