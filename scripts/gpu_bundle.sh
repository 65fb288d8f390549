#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs from the CUDA build (build-cuda/) into
# gpu-bundle/, for a GPU machine that has CUDA, PyTorch 2.11 (cu130) and NCCL
# but no Debian packages (no Open MPI, gRPC, protobuf or abseil) and no
# network: the test and bench binaries, every shared library they load that
# is neither libtorch's, CUDA's, NCCL's nor the C runtime's, and Open MPI's
# plugins and help texts. libtorch and NCCL come from that machine's torch
# wheel (gpu_check.sh puts them on LD_LIBRARY_PATH), so the torch version
# must match requirements-cuda.txt's; the bundle records it.
#
#   LATHE_CUDA=1 bash scripts/build.sh && bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${LATHE_BUILD_DIR:-build-cuda}
OUT=gpu-bundle
BINS=(tests/gpu/runtime_gpu_test tests/gpu/nccl_context_mpi tests/parallel/nccl_communicator_mpi
      tests/lathe_harness bench/allreduce_bench bench/train_bench)
TARGETS=(runtime_gpu_test nccl_context_mpi nccl_communicator_mpi lathe_harness allreduce_bench train_bench)
if [ ! -f "$BUILD/build.ninja" ]; then
  echo "[gpu_bundle] $BUILD is not configured: run LATHE_CUDA=1 bash scripts/build.sh first" >&2
  exit 1
fi
cmake --build "$BUILD" -j "${LATHE_JOBS:-$(nproc)}" --target "${TARGETS[@]}"
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib"
for b in "${BINS[@]}"; do cp "$BUILD/$b" "$OUT/bin/"; done
# Libraries the machine provides itself: the C runtime, CUDA's driver and
# runtime, NCCL and libtorch (from its torch wheel).
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libgcc_s|libstdc\+\+|libcuda\.|libcudart|libnccl|libnvidia|libnvrtc|libnvToolsExt|libcublas|libcudnn|libcufft|libcurand|libcusolver|libcusparse|libcupti|libnvJitLink|libtorch|libc10|libshm|libgomp|libnvshmem|libcufile|libutil\.)'
# Open MPI's plugins load at run time: their dependencies travel too.
command -v ompi_info >/dev/null || { echo "[gpu_bundle] ompi_info not found (Open MPI)" >&2; exit 1; }
OMPI_PLUGINS=$(ompi_info --path pkglibdir | sed 's/^[^:]*: *//')
OMPI_HELP=$(ompi_info --path pkgdatadir | sed 's/^[^:]*: *//')
[ -f "$OMPI_PLUGINS/mca_shmem_mmap.so" ] || { echo "[gpu_bundle] no Open MPI plugins in $OMPI_PLUGINS" >&2; exit 1; }
declare -A seen=()
for f in "$OUT"/bin/* "$OMPI_PLUGINS"/*.so; do
  while read -r name path; do
    [[ "$name" =~ $skip ]] && continue
    [ -n "$path" ] && [ -f "$path" ] || continue
    if [ -z "${seen[$name]:-}" ]; then
      seen[$name]=1
      cp -L "$path" "$OUT/lib/$name"
    fi
  done < <(ldd "$f" 2>/dev/null | awk '/=> \// {print $1, $3}')
done
# Open MPI, relocated with OPAL_PREFIX=$OUT/ompi: its plugins where its
# libdir puts them (gpu_check.sh also names them), its help texts under share.
rel=${OMPI_PLUGINS#/usr/}
mkdir -p "$OUT/ompi/$(dirname "$rel")" "$OUT/ompi/share"
cp -r "$OMPI_PLUGINS" "$OUT/ompi/$rel"
cp -r "$OMPI_HELP" "$OUT/ompi/share/"
echo "$rel" > "$OUT/ompi/plugins_dir"
.venv-cuda/bin/python -c 'import torch; print(torch.__version__)' > "$OUT/torch_version"
strip --strip-unneeded "$OUT"/bin/* "$OUT"/lib/* 2>/dev/null || true
echo "[gpu_bundle] $(du -sh "$OUT" | cut -f1) in $OUT (torch $(cat "$OUT/torch_version")); carry it with the tree"
