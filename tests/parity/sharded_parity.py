"""parallel_parity_mpi from pytest: the sharded runtime under mpirun against the
single-process runtime on every rank (tests/parallel/parallel_parity_mpi_main.cc)."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings

import pytest

import make_tiny_models

TIMEOUT_S = 300


def binary() -> str:
    build = os.environ.get("LATHE_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
    exe = os.path.join(build, "tests", "parallel", "parallel_parity_mpi")
    if not os.path.exists(exe):
        pytest.skip(f"parallel_parity_mpi not built (looked for {exe}; set LATHE_BUILD_DIR)")
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not on PATH")
    return exe


def make_models(root, kinds) -> dict[str, str]:
    """{kind: folder} of the tiny models ``kinds`` written under ``root`` (seed 0)."""
    dirs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in kinds:
            dirs[kind] = str(root / kind)
            make_tiny_models.make_model(kind, dirs[kind], seed=0)
    return dirs


def run_raw(model_dir: str, ranks: int, flags) -> subprocess.CompletedProcess:
    """The harness on ``ranks`` ranks with ``flags``, whatever its outcome."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    cmd = ["mpirun", "--oversubscribe", "-np", str(ranks), binary(), "--model", model_dir, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def run(model_dir: str, ranks: int, flags, tol_scale: float | None = None) -> str:
    """Runs the harness on ``ranks`` ranks and returns its last line; fails the test on a
    non-zero exit or any failed comparison."""
    flags = list(flags) + (["--tol_scale", str(tol_scale)] if tol_scale is not None else [])
    proc = run_raw(model_dir, ranks, flags)
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert " 0 failures" in proc.stdout, proc.stdout[-4000:]
    return proc.stdout.strip().splitlines()[-1]
