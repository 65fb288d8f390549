"""Qwen3.5 hybrids (Gated DeltaNet + gated attention) sharded under mpirun.

``parallel_parity_mpi --model DIR`` runs the tiny ``qwen3_5`` / ``qwen3_5_moe`` models of
make_tiny_models.py sharded (tp, ep, replicas, cp, recompute, bf16) against the
single-process runtime on every rank, LoRA and full fine-tuning: logprobs, losses, grad
norms and every parameter shard after clipped Adam steps, at the harness's tolerances.
With cp the harness adds a 1,536-token sequence packed with short ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_tiny_models  # noqa: E402

# (kind, name, ranks, flags)
LAYOUTS = [
    ("qwen3_5", "tp2", 2, ["--tp", "2"]),
    ("qwen3_5", "replicas2", 2, ["--replicas", "2"]),
    ("qwen3_5", "tp2_recompute", 2, ["--tp", "2", "--recompute", "1", "--logprob_chunk_tokens", "5"]),
    ("qwen3_5_moe", "ep2", 2, ["--ep", "2"]),
    ("qwen3_5_moe", "replicas2_ep2_recompute", 4, ["--replicas", "2", "--ep", "2", "--recompute", "1"]),
]
# Layouts that run but miss the harness's tolerances today (strict: an
# unexpected pass fails, so the list is kept current). Worst errors measured
# (fp32 tolerances 1e-5 abs logprob, 1e-5 rel loss and parameters):
# - cp 2: logprobs of the packed long sequence after four steps 1.3e-5, and
#   the same at --long 300 and 1024 (not growing with the recurrence); with
#   that step run first (weights still equal) it passes (8.6e-6) and a later
#   short step's small loss misses instead (rel 2.4e-5).
# - tp 2 x cp 2: 1.4e-5; tp 2 alone on the same 1,536-token sequence (full
#   fine-tuning, equal weights) is 3.8e-5 off, so that part is tp's.
# - tp 2, tp 2 x ep 2 (MoE): one routed expert's LoRA A element whose
#   gradient is at float noise level (-7e-7 against a 1.6 maximum, the two tp
#   ranks' parts +-0.11) lands 4e-6 apart after Adam (param rel 3.4e-5).
# - bf16 tp 2: logprobs 0.2 against 0.1; replicas 2 (no model sharding,
#   only another packing) already misses (logprobs 0.06, loss rel 0.025).
KNOWN_FAILING = [
    ("qwen3_5", "cp2", 2, ["--cp", "2"]),
    ("qwen3_5", "tp2_cp2", 4, ["--tp", "2", "--cp", "2"]),
    ("qwen3_5", "tp2_bf16", 2, ["--tp", "2", "--bf16", "1"]),
    ("qwen3_5_moe", "tp2", 2, ["--tp", "2"]),
    ("qwen3_5_moe", "tp2_ep2", 4, ["--tp", "2", "--ep", "2"]),
]
CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in LAYOUTS] + [
    pytest.param(*c, id=f"{c[0]}-{c[1]}", marks=pytest.mark.xfail(strict=True, reason="over tolerance"))
    for c in KNOWN_FAILING]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def hybrid_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    dirs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in make_tiny_models.HYBRID_KINDS:
            dirs[kind] = str(root / kind)
            make_tiny_models.make_model(kind, dirs[kind], seed=0)
    return dirs


def _binary() -> str:
    build = os.environ.get("LATHE_BUILD_DIR", "/work/main/build")
    exe = os.path.join(build, "tests", "parallel", "parallel_parity_mpi")
    if not os.path.exists(exe):
        pytest.skip(f"parallel_parity_mpi not built (looked for {exe}; set LATHE_BUILD_DIR)")
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not on PATH")
    return exe


@pytest.mark.parametrize("kind,name,ranks,flags", CASES)
def test_sharded_matches_one_process(hybrid_models, kind, name, ranks, flags):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    cmd = ["mpirun", "--oversubscribe", "-np", str(ranks), _binary(), "--model", hybrid_models[kind], *flags]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert " 0 failures" in run.stdout, run.stdout[-4000:]
    print(name, run.stdout.strip().splitlines()[-1])
