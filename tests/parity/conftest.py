"""Fixtures for the lathe <-> transformers/peft parity suite.

* ``tiny_models``: the tiny checkpoints of make_tiny_models.py (KINDS, HYBRID_KINDS, MLA_KINDS, DSA_KINDS), built
  once per session.
* ``harness``: runs ``lathe_harness`` on a request and returns a ``HarnessResult``.

The binary is ``$LATHE_HARNESS`` if set, else ``$LATHE_BUILD_DIR/tests/lathe_harness``
(``LATHE_BUILD_DIR`` defaults to /work/main/build).  When it is missing, a test skips at the
moment it first calls the harness, i.e. after its reference-side computations ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_tiny_models  # noqa: E402

torch.set_num_threads(2)

HARNESS_TIMEOUT_S = float(os.environ.get("LATHE_HARNESS_TIMEOUT", "300"))
EXIT_REFUSED = 3


def pytest_configure(config):
    # peft probes a deprecated transformers property on every get_peft_model call
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    config.addinivalue_line("markers", "gpu: needs a CUDA device and the CUDA build (LATHE_CUDA=1); skipped elsewhere")


def harness_path() -> str:
    explicit = os.environ.get("LATHE_HARNESS")
    if explicit:
        return explicit
    build = os.environ.get("LATHE_BUILD_DIR", "/work/main/build")
    return os.path.join(build, "tests", "lathe_harness")


@dataclass
class HarnessResult:
    rc: int
    stdout: str
    stderr: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def metrics(self, op: int) -> dict:
        raw = self.meta.get(f"op{op}.metrics")
        assert raw is not None, f"no op{op}.metrics in metadata; keys: {sorted(self.meta)}"
        return json.loads(raw)

    def error(self, op: int) -> str | None:
        return self.meta.get(f"op{op}.error")

    def logprobs(self, op: int, datum: int) -> torch.Tensor:
        return self._get(f"op{op}.datum{datum}.logprobs")

    def elementwise_loss(self, op: int, datum: int) -> torch.Tensor:
        return self._get(f"op{op}.datum{datum}.elementwise_loss")

    def group(self, prefix: str, kind: str) -> dict[str, torch.Tensor]:
        """kind is 'grad' or 'param'; prefix is a dump prefix or 'init'."""
        head = f"{prefix}.{kind}."
        out = {k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)}
        assert out, f"no tensors '{head}*' in harness output; have e.g. {sorted(self.tensors)[:8]}"
        return out

    def grads(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.group(prefix, "grad")

    def params(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.group(prefix, "param")

    def _get(self, key: str) -> torch.Tensor:
        assert key in self.tensors, f"missing tensor {key}; have e.g. {sorted(self.tensors)[:8]}"
        return self.tensors[key]


def _run_harness(model_dir: str, request: dict, workdir: str, expect_rc: int | None = 0) -> HarnessResult:
    exe = harness_path()
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        pytest.skip(f"lathe_harness not built (looked for {exe}; set LATHE_BUILD_DIR or LATHE_HARNESS)")
    os.makedirs(workdir, exist_ok=True)
    n = len([f for f in os.listdir(workdir) if f.startswith("req")])
    req_path = os.path.join(workdir, f"req{n}.json")
    out_path = os.path.join(workdir, f"out{n}.safetensors")
    with open(req_path, "w") as f:
        json.dump(request, f, allow_nan=False)
    proc = subprocess.run([exe, "--model", model_dir, "--request", req_path, "--out", out_path],
                          capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S)
    res = HarnessResult(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
    if expect_rc is not None and proc.returncode != expect_rc:
        pytest.fail(f"lathe_harness exited {proc.returncode}, expected {expect_rc}\n"
                    f"request: {req_path}\nstderr:\n{proc.stderr[-4000:]}")
    if proc.returncode == 0:
        from safetensors import safe_open

        assert os.path.exists(out_path), f"harness exited 0 but wrote no {out_path}"
        with safe_open(out_path, "pt") as f:
            res.meta = dict(f.metadata() or {})
            res.tensors = {k: f.get_tensor(k) for k in f.keys()}
        bad = {k: v.dtype for k, v in res.tensors.items() if v.dtype != torch.float32}
        assert not bad, f"harness outputs must be F32: {bad}"
    return res


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for kind in (make_tiny_models.KINDS + make_tiny_models.HYBRID_KINDS + make_tiny_models.MLA_KINDS
                 + make_tiny_models.DSA_KINDS):
        out = str(root / kind)
        make_tiny_models.make_model(kind, out, seed=0)
        dirs[kind] = out
    return dirs


@pytest.fixture
def harness(tmp_path):
    """``harness(model_dir, request, expect_rc=0) -> HarnessResult``.

    ``expect_rc=None`` accepts any exit status (the caller inspects ``rc``/``stderr``)."""
    def run(model_dir: str, request: dict, expect_rc: int | None = 0) -> HarnessResult:
        return _run_harness(model_dir, request, str(tmp_path / "harness"), expect_rc)

    return run
