"""zstd request bodies through the HTTP door (docs/http-api.md): client/config turns the SDK's
proto_compress_fwdbwd on, so tinker 0.38.0 sends every forward_backward zstd-compressed
(test_http.py's bitwise comparison with gRPC runs over it); here a compressed body gives the
same numbers as the plain one, and bad or oversized compressed bodies are refused at once with
a JSON body and queue nothing."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb
from lathe.v1 import types_pb2 as types

zstd = pytest.importorskip("zstandard", reason="zstandard (a dependency of tinker) is not installed")
tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 (requirements-dev.txt) is not installed")

KEY = "tml-lathe-http-zstd-key"
MAX_REQUEST_BYTES = 4 << 20


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("http_zstd")), KEY,
                      coordinator_args=["--max_request_bytes", str(MAX_REQUEST_BYTES)]) as door_and_url:
        yield door_and_url


def _result(url, request_id):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, reply = sc.http_json(url, "/api/v1/retrieve_future", json.dumps({"request_id": request_id}).encode(),
                                     {"X-API-Key": KEY})
        assert status == 200, reply
        if reply.get("type") != "try_again":
            return reply
    raise AssertionError(f"{request_id} still pending")


def test_zstd_bodies_are_read_and_bad_ones_refused(door):
    d, url = door
    key = {"X-API-Key": KEY}
    assert sc.http_json(url, "/api/v1/client/config", b'{"sdk_version": "0.38.0"}', key)[1]["proto_compress_fwdbwd"]
    run = d.stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=4)), metadata=d.metadata(),
                           timeout=sc.RPC_TIMEOUT_S).run_id
    tokens, targets = sc.random_sequence(np.random.default_rng(5), 11)
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [int(t) for t in tokens]}]},
             "loss_fn_inputs": {"target_tokens": {"data": [int(t) for t in targets], "dtype": "int64",
                                                  "shape": [len(targets)]}}}

    def forward(seq):
        return json.dumps({"model_id": run, "seq_id": seq,
                           "forward_input": {"data": [datum], "loss_fn": "cross_entropy"}}).encode()

    zstd_json = {**key, "Content-Encoding": "zstd"}
    plain = sc.http_json(url, "/api/v1/forward", forward(1), key)
    packed = sc.http_json(url, "/api/v1/forward", zstd.ZstdCompressor().compress(forward(2)), zstd_json)
    assert plain[0] == packed[0] == 200, (plain, packed)
    a, b = _result(url, plain[1]["request_id"]), _result(url, packed[1]["request_id"])
    assert a["metrics"]["loss:sum"] == b["metrics"]["loss:sum"] and a["loss_fn_outputs"] == b["loss_fn_outputs"]
    # A stream without a declared size decompresses too.
    streamed = zstd.ZstdCompressor(write_content_size=False).compressobj()
    body = streamed.compress(forward(3)) + streamed.flush()
    assert sc.http_json(url, "/api/v1/forward", body, zstd_json)[0] == 200

    bomb = zstd.ZstdCompressor().compress(b" " * (MAX_REQUEST_BYTES + 1))
    assert len(bomb) < MAX_REQUEST_BYTES
    cases = [
        (b"not zstd at all", zstd_json, 422, "INVALID_ARGUMENT"),
        (zstd.ZstdCompressor().compress(forward(4))[:-5], zstd_json, 422, "INVALID_ARGUMENT"),  # cut short
        (b"", zstd_json, 422, "INVALID_ARGUMENT"),
        (bomb, zstd_json, 413, "RESOURCE_EXHAUSTED"),
        (forward(4), {**key, "Content-Encoding": "lz4"}, 415, "INVALID_ARGUMENT"),
    ]
    for body, headers, status, code in cases:
        got, reply = sc.http_json(url, "/api/v1/forward", body, headers)
        assert (got, reply["error"]["code"]) == (status, code), (body[:20], reply)
        assert reply["error"]["message"]
    # Nothing was queued: seq_id 4 is still free, and the deployment still serves.
    ok = sc.http_json(url, "/api/v1/forward", zstd.ZstdCompressor().compress(forward(4)), zstd_json)
    assert ok == (200, {"request_id": f"{run}/4", "model_id": run}), ok
    assert "loss:sum" in _result(url, f"{run}/4")["metrics"]
