"""Fixtures of the end-to-end suite: a real lathe deployment on loopback.

* Python stubs of proto/lathe/v1 are generated into a temporary folder when this
  conftest is loaded (the test modules import them at collection).
* ``tiny_model``: a tiny Qwen3-MoE folder written once per session by ``lathe_sft``.
* ``deployment``: one coordinator + ``mpirun -np 4 dp_worker`` (2 replicas x 2 ranks,
  --ep 2) shared by the module; ``make_deployment`` builds fresh ones (destructive tests).
* ``harness``: runs ``lathe_harness`` (the in-process runtime) on a JSON request.

Binaries come from ``$LATHE_BUILD_DIR`` (default /work/main/build). When a test fails,
the tails of the deployment logs written during it are added to its report.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.environ.get("LATHE_BUILD_DIR", os.path.join(REPO, "build"))
HARNESS_TIMEOUT_S = 120

for _k, _v in {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_k, _v)


def _generate_stubs() -> str:
    out = tempfile.mkdtemp(prefix="lathe_e2e_stubs_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    protos = [os.path.join("proto", "lathe", "v1", f"{name}.proto") for name in ("types", "service", "replica")]
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={out}",
                           f"--grpc_python_out={out}", *protos],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"grpc_tools.protoc failed:\n{proc.stderr}")
    return out


sys.path.insert(0, _generate_stubs())
sys.path.insert(0, HERE)

import service_client as sc  # noqa: E402


def _binary(*parts: str) -> str:
    path = os.path.join(BUILD_DIR, *parts)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"{path} is not built (set LATHE_BUILD_DIR)")
    return path


@pytest.fixture(scope="session")
def build_dir() -> str:
    for parts in (("coordinator", "lathe_coordinator"), ("dp_worker", "dp_worker")):
        _binary(*parts)
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not on PATH")
    return BUILD_DIR


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, build_dir) -> str:
    out = str(tmp_path_factory.mktemp("model") / "tiny")
    proc = subprocess.run([_binary("runtime", "lathe_sft"), "--make_tiny_model", out],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"lathe_sft --make_tiny_model failed:\n{proc.stderr[-2000:]}"
    return out


@pytest.fixture
def make_deployment(tmp_path_factory, build_dir, tiny_model):
    """``make_deployment(name, model_dir=None, cls=None, **kwargs) -> Deployment`` (not
    started; the session's tiny model unless ``model_dir``; ``cls``: a Deployment class,
    e.g. ReplicaJobs); all are closed at teardown."""
    made: list[sc.Deployment] = []

    def make(name: str = "fresh", model_dir: str | None = None, cls=None, **kwargs) -> sc.Deployment:
        d = (cls or sc.Deployment)(build_dir, model_dir or tiny_model, str(tmp_path_factory.mktemp(name)), **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, build_dir, tiny_model):
    """The module's shared deployment: 2 replicas x 2 ranks, --ep 2, room for 8 runs."""
    d = sc.Deployment(build_dir, tiny_model, str(tmp_path_factory.mktemp("shared")), max_runs=8)
    d.start()
    yield d
    d.close()


@pytest.fixture
def harness(tmp_path, build_dir, tiny_model):
    """``harness(request) -> (metadata, tensors)``: lathe_harness on the tiny model
    (request format: tests/parity/conftest.py)."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    def run(request: dict):
        exe = _binary("tests", "lathe_harness")
        req_path, out_path = str(tmp_path / "harness.json"), str(tmp_path / "harness.safetensors")
        with open(req_path, "w") as f:
            json.dump(request, f, allow_nan=False)
        proc = subprocess.run([exe, "--model", tiny_model, "--request", req_path, "--out", out_path],
                              capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S)
        assert proc.returncode == 0, f"lathe_harness exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        with safe_open(out_path, "np") as f:
            meta = dict(f.metadata() or {})
        return meta, load_file(out_path)

    return run


# --------------------------------------------------------------------------------------
# failure reports: tails of the deployment logs written during the failing test
# --------------------------------------------------------------------------------------

def pytest_runtest_setup(item):
    item.user_properties.append(("e2e_started", time.time()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    started = dict(item.user_properties).get("e2e_started", 0)
    root = str(item.config._tmp_path_factory.getbasetemp()) if hasattr(item.config, "_tmp_path_factory") else None
    if root is None:
        return
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.endswith(".log") and os.path.getmtime(path) >= started:
                with open(path, errors="replace") as f:
                    tail = "".join(f.readlines()[-40:])
                rep.sections.append((f"log {path} (tail)", tail))
