"""The HTTP door with tinker 0.24.1, the last Tinker SDK that speaks JSON only (JSON
forward_backward / forward bodies and results): the same flow as test_http.py's gives the same
losses, logprobs and samples, bit for bit, as the same operations over gRPC. The SDK runs in its
own venv (.venv-tinker024, made by scripts/setup.sh), in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb
from lathe.v1 import types_pb2 as types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(ROOT, ".venv-tinker024", "bin", "python")
KEY = "tml-lathe-http-tinker024-key"
LR = 1e-2
PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]

pytestmark = pytest.mark.skipif(
    not os.access(PYTHON, os.X_OK),
    reason="tinker 0.24.1 needs .venv-tinker024: run scripts/setup.sh (it installs requirements-tinker024.txt there)")


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("http024")), KEY) as door_and_url:
        yield door_and_url


def _sequences():
    rng = np.random.default_rng(7)
    return [[[int(t) for t in tokens], [int(y) for y in targets]]
            for tokens, targets in (sc.random_sequence(rng, n) for n in (9, 5, 12))]


def _wait(d, op_id: str) -> pb.OpResult:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = d.stub.Retrieve(pb.RetrieveRequest(op_id=op_id, wait_ms=5000), metadata=d.metadata(), timeout=15)
        if r.state != sc.Retrieve.PENDING:
            assert r.state == sc.Retrieve.DONE, r.error
            return r.result
    raise AssertionError(f"{op_id} still pending")


def _over_grpc(d):
    """forward_backward, optim_step, forward_backward, publish, greedy sample: the reference numbers."""
    stub, md = d.stub, d.metadata()
    run = stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=8, seed=3)), metadata=md,
                         timeout=sc.RPC_TIMEOUT_S).run_id
    data = [sc.datum(t, y, weights=np.ones(len(y), np.float32)) for t, y in _sequences()]
    adam = sc.adam(learning_rate=LR, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0)
    sample = pb.SampleOp(prompt=sc.types.ModelInput(chunks=[sc.token_chunk(PROMPT)]), num_samples=2,
                         model_path=f"lathe://{run}/sampler_weights/p",
                         params=pb.SamplingParams(max_tokens=8, temperature=0.0))
    ops = [(1, sc.fb_op(*data)), (2, {"optim_step": adam}), (3, sc.fb_op(*data)),
           (4, {"save_weights_for_sampler": pb.SaveWeightsForSamplerOp(name="p")})]
    ids = [stub.Submit(pb.SubmitRequest(run_id=run, seq_id=seq, **op), metadata=md, timeout=sc.RPC_TIMEOUT_S).op_id
           for seq, op in ops]
    _wait(d, ids[3])  # a sample names published weights only once they are on disk
    ids.append(stub.Submit(pb.SubmitRequest(run_id=run, seq_id=5, sample=sample), metadata=md,
                           timeout=sc.RPC_TIMEOUT_S).op_id)
    fbs = []
    for op_id in (ids[0], ids[2]):
        fb = _wait(d, op_id).forward_backward
        fbs.append({"loss": fb.metrics["loss:sum"],
                    "logprobs": [np.asarray(l, np.float32).view(np.uint32).tolist() for l in sc.logprobs(fb)]})
    samples = [{"tokens": np.frombuffer(s.tokens, "<i4").tolist(), "logprobs": np.frombuffer(s.logprobs, "<u4").tolist()}
               for s in _wait(d, ids[4]).sample.sequences]
    return fbs, samples


def test_tinker_024_json_sdk_trains_samples_and_resumes_like_grpc(door):
    d, url = door
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    env = {**os.environ, "TINKER_TELEMETRY": "0"}
    done = subprocess.run([PYTHON, os.path.join(ROOT, "tests", "e2e", "tinker024_flow.py"), url, KEY, base_model,
                           json.dumps(_sequences()), json.dumps(LR), json.dumps(PROMPT)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    http = json.loads(done.stdout.strip().splitlines()[-1])
    fbs, samples = _over_grpc(d)
    run = http["model_id"]
    assert http["path"] == f"tinker://{run}/weights/state"
    # Losses and logprobs: bitwise. forward after the second forward_backward sees the same weights.
    assert http["fb"] == [fbs[0], fbs[1], fbs[1]]
    assert http["fb"][1]["loss"] < http["fb"][0]["loss"]  # the step trained
    assert http["samples"] == samples
    # 0.24.1 resumes with weights_info, create_model and load_state_with_optimizer: the new client
    # holds the saved weights, so its forward_backward is the original's second, bit for bit.
    assert http["resumed_model_id"] != run
    assert http["resumed"] == fbs[1]
