"""The HTTP door (http/, docs/http-api.md) driven by the real Tinker SDK (``tinker`` 0.38.0):
the same operations give bit-identical losses over HTTP and over gRPC, and malformed HTTP
requests get a clear status with a JSON body and queue nothing."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb
from lathe.v1 import types_pb2 as types

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 (requirements-dev.txt) is not installed")

KEY = "tml-lathe-http-test-key"  # the SDK requires the tml- prefix
LR = 1e-2


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    """A deployment with API keys on and the HTTP door on a free port: (deployment, base_url)."""
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("http")), KEY, max_runs=6) as door_and_url:
        yield door_and_url


def _sequences():
    rng = np.random.default_rng(7)
    return [sc.random_sequence(rng, n) for n in (9, 5, 12)]


def _tinker_datum(tokens, targets):
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints([int(t) for t in tokens]),
        loss_fn_inputs={"target_tokens": tinker.types.TensorData.from_numpy(np.asarray(targets, np.int64)),
                        "weights": tinker.types.TensorData.from_numpy(np.ones(len(targets), np.float32))})


def _over_http(url: str, base_model: str):
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=base_model, rank=8, seed=3).result()
    data = [_tinker_datum(t, y) for t, y in _sequences()]
    first = training.forward_backward(data, "cross_entropy").result()
    training.optim_step(tinker.types.AdamParams(learning_rate=LR)).result()
    second = training.forward_backward(data, "cross_entropy").result()
    forward = training.forward(data, "cross_entropy").result()  # the protobuf's forward_only
    client.close("success").result()  # sessions/{id}/finish
    return [(fb.metrics["loss:sum"], [np.asarray(o["logprobs"].to_numpy(), np.float32) for o in fb.loss_fn_outputs])
            for fb in (first, second, forward)]


def _over_grpc(d: sc.Deployment):
    stub, md = d.stub, d.metadata()
    created = stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=8, seed=3)), metadata=md,
                             timeout=sc.RPC_TIMEOUT_S)
    run = created.run_id
    data = [sc.datum(t, y, weights=np.ones(len(y), np.float32)) for t, y in _sequences()]
    # The SDK's AdamParams defaults, sent explicitly.
    adam = sc.adam(learning_rate=LR, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0)
    ops = [stub.Submit(pb.SubmitRequest(run_id=run, seq_id=seq, **op), metadata=md, timeout=sc.RPC_TIMEOUT_S).op_id
           for seq, op in ((1, sc.fb_op(*data)), (2, {"optim_step": adam}), (3, sc.fb_op(*data)))]
    out = []
    for op_id in (ops[0], ops[2]):
        r = _wait(stub, md, op_id)
        assert r.state == sc.Retrieve.DONE, r.error
        fb = r.result.forward_backward
        out.append((fb.metrics["loss:sum"], [np.asarray(l, np.float32) for l in sc.logprobs(fb)]))
    return out


def _wait(stub, md, op_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = stub.Retrieve(pb.RetrieveRequest(op_id=op_id, wait_ms=5000), metadata=md, timeout=15)
        if r.state != sc.Retrieve.PENDING:
            return r
    raise AssertionError(f"{op_id} still pending")


def test_tinker_sdk_trains_like_grpc(door):
    d, url = door
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    http, grpc_ = _over_http(url, base_model), _over_grpc(d)
    assert len(http) == 3 and len(grpc_) == 2
    # forward after the second forward_backward: the same weights, so the same numbers.
    grpc_.append(grpc_[1])
    for (loss_h, lp_h), (loss_g, lp_g) in zip(http, grpc_):
        assert loss_h == loss_g  # bitwise: the same ops on the same ledger and replicas
        assert len(lp_h) == len(lp_g) == 3
        for a, b in zip(lp_h, lp_g):
            assert a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert http[1][0] < http[0][0]  # the step trained


def _post(url: str, path: str, body: bytes, headers: dict | None = None):
    return sc.http_json(url, path, body, headers)


def test_malformed_requests_get_json_errors_and_queue_nothing(door):
    d, url = door
    stub, md = d.stub, d.metadata()
    run = stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=4)), metadata=md,
                         timeout=sc.RPC_TIMEOUT_S).run_id
    key = {"X-API-Key": KEY}
    step = json.dumps({"model_id": run, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}).encode()
    cases = [
        ("/api/v1/optim_step", step, {}, 401, "UNAUTHENTICATED"),                          # no key
        ("/api/v1/optim_step", step, {"X-API-Key": "tml-wrong"}, 401, "UNAUTHENTICATED"),  # wrong key
        ("/api/v1/optim_step", b'{"model_id": "' + run.encode(), key, 422, "INVALID_ARGUMENT"),  # bad JSON
        ("/api/v1/optim_step", b'{"model_id": 5}', key, 422, "INVALID_ARGUMENT"),        # wrong shape
        ("/api/v1/no_such_route", step, key, 404, "NOT_FOUND"),
        ("/api/v1/optim_step",
         json.dumps({"model_id": run, "seq_id": 2, "adam_params": {"learning_rate": -1}}).encode(),
         key, 422, "INVALID_ARGUMENT"),                    # refused by validation: a noop takes seq_id 2
        ("/api/v1/forward_backward", b"\xff\xff\xff", {**key, "Content-Type": "application/x-protobuf"}, 422,
         "INVALID_ARGUMENT"),
        ("/api/v1/retrieve_future", json.dumps({"request_id": f"{run}/77"}).encode(), key, 404, "NOT_FOUND"),
        # Numbers outside their field's type are refused, never wrapped or cast.
        ("/api/v1/optim_step", json.dumps({"model_id": run, "seq_id": 1e300, "adam_params": {}}).encode(), key,
         422, "INVALID_ARGUMENT"),
        ("/api/v1/optim_step", json.dumps({"model_id": run, "seq_id": 2**64 - 1, "adam_params": {}}).encode(), key,
         422, "INVALID_ARGUMENT"),
        ("/api/v1/create_model", json.dumps({"lora_config": {"rank": 2**32 + 4}}).encode(), key,
         422, "INVALID_ARGUMENT"),
        ("/api/v1/create_sampling_session",
         json.dumps({"model_path": "tinker://../sampler_weights/x"}).encode(), key, 422, "INVALID_ARGUMENT"),
    ]
    for path, body, headers, status, code in cases:
        got, reply = _post(url, path, body, headers)
        assert (got, reply["error"]["code"]) == (status, code), (path, body[:40], reply)
        assert reply["error"]["message"], reply
    assert _post(url, "/api/v1/sessions/session-1/finish", b'{"reason": {"type": "success"}}', key) == (200, {})
    # Nothing took seq_id 1 (keys, parsing and the field types are checked before a seq_id is read).
    with pytest.raises(sc.grpc.RpcError) as unknown:
        stub.Retrieve(pb.RetrieveRequest(op_id=f"{run}/1"), metadata=md, timeout=sc.RPC_TIMEOUT_S)
    assert unknown.value.code() == sc.grpc.StatusCode.NOT_FOUND
    op = stub.Submit(pb.SubmitRequest(run_id=run, seq_id=1, noop=pb.NoopOp()), metadata=md, timeout=sc.RPC_TIMEOUT_S)
    assert _wait(stub, md, op.op_id).state == sc.Retrieve.DONE
    # The refused optim_step's seq_id 2 was filled with a noop, so the run's order goes on.
    assert _wait(stub, md, f"{run}/2").state == sc.Retrieve.DONE
    # A retried submit is the same operation (the ledger's idempotency, through the door).
    retry = json.dumps({"model_id": run, "seq_id": 3, "adam_params": {"learning_rate": 1e-3}}).encode()
    first, second = _post(url, "/api/v1/optim_step", retry, key), _post(url, "/api/v1/optim_step", retry, key)
    assert first == second and first[0] == 200 and first[1]["request_id"] == f"{run}/3"


def test_an_sdk_call_refused_for_its_input_fails_fast_and_the_client_goes_on(door):
    """The SDK has taken the refused call's seq_id: the door fills it with a noop, so the
    client's next call runs at once instead of waiting out the gap timeout."""
    d, url = door
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=base_model, rank=4).result()
    data = [_tinker_datum(t, y) for t, y in _sequences()]
    bad = [_tinker_datum([1, 2, 3], [2, 3, 2**40])]  # a target far beyond any vocabulary
    started = time.monotonic()
    with pytest.raises(Exception) as refused:
        training.forward_backward(bad, "cross_entropy").result()
    assert time.monotonic() - started < 10, "a refused call must fail at once"
    assert "target" in str(refused.value).lower() or "vocab" in str(refused.value).lower(), refused.value
    with pytest.raises(Exception):
        training.optim_step(tinker.types.AdamParams(learning_rate=1e39)).result()  # beyond float32
    started = time.monotonic()
    fb = training.forward_backward(data, "cross_entropy").result(timeout=60)
    training.optim_step(tinker.types.AdamParams(learning_rate=LR)).result(timeout=60)
    assert time.monotonic() - started < 60 and np.isfinite(fb.metrics["loss:sum"])
    client.close("success").result()


def test_save_state_and_sampler_weights_over_http(door):
    d, url = door
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=base_model, rank=4).result()
    run = training.model_id
    assert training.save_state("s1").result().path == f"tinker://{run}/weights/s1"
    assert training.save_weights_for_sampler("p1").result().path == f"tinker://{run}/sampler_weights/p1"
    listed = d.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run), metadata=d.metadata(),
                                    timeout=sc.RPC_TIMEOUT_S).checkpoints
    assert {c.id for c in listed} >= {f"lathe://{run}/weights/s1", f"lathe://{run}/sampler_weights/p1"}
    # The ephemeral form (save_weights_and_get_sampling_client) is a save under a name made from its seq_id.
    got = _post(url, "/api/v1/save_weights_for_sampler",
                json.dumps({"model_id": run, "seq_id": 3, "sampling_session_seq_id": 0}).encode(), {"X-API-Key": KEY})
    assert got == (200, {"request_id": f"{run}/3", "model_id": run}), got
    # A name lathe refuses fails at once with the validation's message.
    with pytest.raises(Exception, match="save_state.name"):
        training.save_state("../escape").result()
    # A refused save_weights_for_sampler gives its seq_id to a noop, so the client's next call
    # runs at once instead of waiting out the gap timeout.
    with pytest.raises(Exception, match="name"):
        training.save_weights_for_sampler("../escape").result(timeout=30)
    assert training.save_state("s2").result(timeout=60).path == f"tinker://{run}/weights/s2"
    client.close("success").result()


def test_start_up_capabilities_and_info_routes(door):
    """The routes the SDK calls around its work: client config, telemetry, capabilities, get_info."""
    d, url = door
    key = {"X-API-Key": KEY}
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    assert _post(url, "/api/v1/client/config", b'{"sdk_version": "0.38.0"}', key) == (
        200, {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": True})
    assert _post(url, "/api/v1/client/dynamic_config", b"{}", key) == (
        200, {"refresh_interval_sec": 300, "sample_cancel_enabled": False})
    assert _post(url, "/api/v1/telemetry", b'{"events": [], "platform": "linux"}', key) == (
        200, {"status": "accepted"})
    status, caps = sc.http_json(url, "/api/v1/get_server_capabilities", None, key)
    assert status == 200, caps
    assert [m["model_name"] for m in caps["supported_models"]] == [base_model]
    assert caps["supported_models"][0]["max_context_length"] > 0
    assert sc.http_json(url, "/api/v1/get_server_capabilities")[0] == 401  # only healthz is open
    status, health = sc.http_json(url, "/api/v1/healthz")
    assert status == 200 and health["status"] == "ok", health
    # The SDK reads the same answer.
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    got = client.create_rest_client().get_server_capabilities().result(timeout=30)
    assert [m.model_name for m in got.supported_models] == [base_model]
    run = d.stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=4)), metadata=d.metadata(),
                           timeout=sc.RPC_TIMEOUT_S).run_id
    _wait(d.stub, d.metadata(), f"{run}/0")
    status, info = _post(url, "/api/v1/get_info", json.dumps({"model_id": run}).encode(), key)
    assert status == 200, info
    assert (info["model_id"], info["is_lora"], info["lora_rank"], info["model_name"], info["type"]) == (
        run, True, 4, base_model, "get_info")
    client.close("success").result()
    d.stub.Submit(pb.SubmitRequest(run_id=run, seq_id=1, delete_run=pb.DeleteRunOp()), metadata=d.metadata(),
                  timeout=sc.RPC_TIMEOUT_S)
