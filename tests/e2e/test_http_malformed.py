"""A hostile client against the HTTP door (http/, docs/http-api.md) of a live deployment with
API keys on: malformed JSON and protobuf, numbers outside their types, bodies over the limit
(by Content-Length, by a lying one, chunked), unknown routes and methods, odd bytes in names
and paths, bad keys, unknown ids, compressed bodies. Each gets a status the Tinker SDK does not
retry (docs/http-api.md, "Errors") and a JSON error body naming the problem; none queues
anything (checked over gRPC), and the deployment keeps serving. test_http.py holds the first
few cases; these are the rest. The SDK itself fails fast on bad input."""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse

import numpy as np
import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb
from lathe.v1 import types_pb2 as types

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 (requirements-dev.txt) is not installed")

KEY = "tml-lathe-http-malformed-key"
MAX_BODY = 64 << 10  # --max_request_bytes of the deployment below
SOCKET_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("http_malformed")), KEY,
                      coordinator_args=["--max_request_bytes", str(MAX_BODY)], max_runs=14) as door_and_url:
        yield door_and_url


# --------------------------------------------------------------------------------------
# raw HTTP: what urllib and http.client would refuse to send
# --------------------------------------------------------------------------------------

def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP/1.1 response read from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before a response; got {data[:200]!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def raw(url: str, request: bytes, *, half_close: bool = False, send_after: bytes = b""):
    """Sends `request` as is on a fresh connection; (status, headers, JSON body or raw bytes)."""
    parsed = urllib.parse.urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            sock.sendall(request)
            if send_after:
                sock.sendall(send_after)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the door may answer and close before all of it is sent
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        status, headers, body = _read_response(sock)
    try:
        return status, headers, json.loads(body)
    except ValueError:
        return status, headers, body


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict | None = None, *,
                  content_length: int | None = None) -> bytes:
    hdrs = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if content_length is not None:
        hdrs["Content-Length"] = str(content_length)
    elif "Transfer-Encoding" not in hdrs and (body or method in ("POST", "PUT")):
        hdrs.setdefault("Content-Length", str(len(body)))
    head = f"{method} ".encode() + (path if isinstance(path, bytes) else path.encode()) + b" HTTP/1.1\r\n"
    for k, v in hdrs.items():
        head += k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
    return head + b"\r\n" + body


def chunked(body: bytes, size: int = 4096) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------

def _j(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def wire(tmp_path_factory):
    """The door's protobuf messages (http/tinker_wire.proto) as Python classes."""
    import importlib
    import subprocess
    import sys
    out = str(tmp_path_factory.mktemp("wire"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "http", f"--python_out={out}",
                    "tinker_wire.proto"], cwd=_repo(), check=True, timeout=60)
    sys.path.insert(0, out)
    try:
        return importlib.import_module("tinker_wire_pb2")
    finally:
        sys.path.remove(out)


def _repo() -> str:
    import os
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fb_proto(wire, run: str, seq_id: int) -> bytes:
    """A Tinker ForwardBackwardRequest as SDK 0.38 sends it: one datum, cross_entropy."""
    tokens, targets = sc.random_sequence(np.random.default_rng(3), 8)
    request = wire.ForwardBackwardRequest(model_id=run, seq_id=seq_id, loss_fn="cross_entropy")
    d = request.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dense, t.dtype = np.asarray(targets, "<i8").tobytes(), wire.DTYPE_INT64
    t.shape.append(len(targets))
    w = d.loss_fn_inputs["weights"]
    w.dense, w.dtype = np.ones(len(targets), "<f4").tobytes(), wire.DTYPE_FLOAT32
    w.shape.append(len(targets))
    return request.SerializeToString()


def _cases(run: str, other_run: str, key: dict, fb_proto: bytes):
    """(name, request bytes, want status, want error code, word the message must contain)."""
    json_key = {**key, "Content-Type": "application/json"}
    proto_key = {**key, "Content-Type": "application/x-protobuf"}

    def post(path, body, headers=None, **kw):
        return request_bytes("POST", path, body, json_key if headers is None else headers, **kw)

    def step(**fields):
        return post("/api/v1/optim_step",
                    _j({"model_id": run, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}, **fields}))

    big = b"x" * (MAX_BODY + 1)
    return [
        # -- JSON of the wrong shape or type
        ("array body", post("/api/v1/optim_step", b"[1, 2]"), 422, "INVALID_ARGUMENT", "object"),
        ("string body", post("/api/v1/optim_step", b'"optim_step"'), 422, "INVALID_ARGUMENT", "object"),
        ("null body", post("/api/v1/get_info", b"null"), 422, "INVALID_ARGUMENT", "object"),
        ("empty body", post("/api/v1/optim_step", b""), 422, "INVALID_ARGUMENT", "JSON"),
        ("NaN literal", post("/api/v1/optim_step", b'{"model_id": "r", "seq_id": NaN}'), 422, "INVALID_ARGUMENT",
         "JSON"),
        ("exponent past double", post("/api/v1/optim_step", b'{"model_id": "r", "seq_id": 1, '
                                      b'"adam_params": {"learning_rate": 1e400}}'), 422, "INVALID_ARGUMENT", "1e400"),
        ("seq_id 2^63", step(seq_id=2**63), 422, "INVALID_ARGUMENT", "seq_id"),
        ("seq_id -1", step(seq_id=-1), 422, "INVALID_ARGUMENT", "seq_id"),
        ("seq_id 0", step(seq_id=0), 422, "INVALID_ARGUMENT", "seq_id"),
        ("seq_id as a string", step(seq_id="1"), 422, "INVALID_ARGUMENT", "seq_id"),
        ("seq_id fractional", step(seq_id=1.5), 422, "INVALID_ARGUMENT", "seq_id"),
        ("learning_rate past float32", step(adam_params={"learning_rate": 1e39}), 422, "INVALID_ARGUMENT",
         "learning_rate"),
        ("learning_rate null (the SDK's NaN)", step(adam_params={"learning_rate": None}), 422, "INVALID_ARGUMENT",
         "learning_rate"),
        ("learning_rate as a string", step(adam_params={"learning_rate": "fast"}), 422, "INVALID_ARGUMENT",
         "learning_rate"),
        ("adam_params an array", step(adam_params=[1e-3]), 422, "INVALID_ARGUMENT", "adam"),
        ("model_id null", step(model_id=None), 422, "INVALID_ARGUMENT", "model_id"),
        ("nested 30k deep", post("/api/v1/optim_step", b"[" * 30000 + b"]" * 30000), 422, "INVALID_ARGUMENT",
         "deeper than 64"),
        ("an object nested 65 deep", post("/api/v1/optim_step", b'{"a":' * 65 + b"1" + b"}" * 65), 422,
         "INVALID_ARGUMENT", "deeper than 64"),
        ("non-UTF-8 in a JSON string", post("/api/v1/get_info", b'{"model_id": "\xff\xfe"}'), 422,
         "INVALID_ARGUMENT", "UTF-8"),
        # -- Content-Type and protobuf
        ("JSON sent as protobuf", post("/api/v1/forward_backward", _j({"model_id": run, "seq_id": 1}), proto_key),
         422, "INVALID_ARGUMENT", "ForwardBackwardRequest"),
        ("protobuf sent as JSON", post("/api/v1/forward_backward", fb_proto, json_key), 422, "INVALID_ARGUMENT",
         "JSON"),
        ("protobuf sent as text/plain", post("/api/v1/forward_backward", fb_proto,
                                             {**key, "Content-Type": "text/plain"}), 422, "INVALID_ARGUMENT", "JSON"),
        ("truncated protobuf", post("/api/v1/forward_backward", fb_proto[:len(fb_proto) // 2], proto_key), 422,
         "INVALID_ARGUMENT", "ForwardBackwardRequest"),
        ("protobuf field of the wrong wire type", post("/api/v1/forward_backward", b"\x0d\x01\x02\x03\x04" * 3,
                                                       proto_key), 422, "INVALID_ARGUMENT", "run_id"),
        ("empty protobuf", post("/api/v1/forward_backward", b"", proto_key), 422, "INVALID_ARGUMENT", "run_id"),
        # -- sizes
        ("body over --max_request_bytes", post("/api/v1/optim_step", big), 413, "RESOURCE_EXHAUSTED",
         "max_request_bytes"),
        ("Content-Length over the limit, no body", post("/api/v1/forward_backward", b"", proto_key,
                                                       content_length=1 << 40), 413, "RESOURCE_EXHAUSTED",
         "max_request_bytes"),
        ("chunked body over the limit",
         request_bytes("POST", "/api/v1/optim_step", chunked(big), {**json_key, "Transfer-Encoding": "chunked"}),
         411, "INVALID_ARGUMENT", "Content-Length"),
        ("no Content-Length", post("/api/v1/optim_step", b"{}").replace(b"Content-Length: 2\r\n", b""), 411,
         "INVALID_ARGUMENT", "Content-Length"),
        ("Content-Length not a number", post("/api/v1/optim_step", b"{}", {**json_key, "Content-Length": "lots"}),
         400, "INVALID_ARGUMENT", "Content-Length"),
        ("Content-Length past int64", post("/api/v1/optim_step", b"{}",
                                           {**json_key, "Content-Length": "9" * 30}), 413, "RESOURCE_EXHAUSTED",
         "max_request_bytes"),
        # -- routes and methods
        ("GET on a POST route", request_bytes("GET", "/api/v1/optim_step", headers=key), 404, "NOT_FOUND",
         "optim_step"),
        ("PUT", request_bytes("PUT", "/api/v1/optim_step", step_body(run), json_key), 404, "NOT_FOUND", "PUT"),
        ("DELETE", request_bytes("DELETE", f"/api/v1/training_runs/{run}", headers=key), 404, "NOT_FOUND",
         "DELETE"),
        ("unknown method", request_bytes("BREW", "/api/v1/healthz", headers=key), 400, "INVALID_ARGUMENT", "HTTP"),
        ("dot-dot in the path", request_bytes("GET", "/api/v1/../v1/samplers/../../healthz", headers=key), 404,
         "NOT_FOUND", "route"),
        ("%2e%2e in the path", request_bytes("GET", "/api/v1/samplers/%2e%2e%2fhealthz", headers=key), 404,
         "NOT_FOUND", "route"),
        ("NUL in the path", request_bytes("POST", "/api/v1/sessions/a%00b/finish", b"{}", json_key), 404,
         "NOT_FOUND", "\\x00"),
        ("non-UTF-8 in the path", request_bytes("GET", b"/api/v1/samplers/\xff\xfe", headers=key), 404,
         "NOT_FOUND", "route"),
        ("%ff in the path", request_bytes("GET", "/api/v1/samplers/%ff%fe", headers=key), 404, "NOT_FOUND", "route"),
        ("10 kB path", request_bytes("GET", "/api/v1/samplers/" + "a" * 10000, headers=key), 414,
         "INVALID_ARGUMENT", "URI"),
        # -- names and ids
        ("NUL in model_id", post("/api/v1/get_info", _j({"model_id": run + "\u0000"})), 422, "INVALID_ARGUMENT",
         "byte 0"),
        ("dot-dot model_id", post("/api/v1/get_info", _j({"model_id": "../" + run})), 422, "INVALID_ARGUMENT",
         "run_id"),
        ("slash in model_id", step(model_id=f"{run}/1"), 422, "INVALID_ARGUMENT", "run_id"),
        ("10 kB model_id", step(model_id="r" * 10000), 422, "INVALID_ARGUMENT", "run_id"),
        ("unknown model_id", post("/api/v1/get_info", _j({"model_id": "run-doesnotexist"})), 404, "NOT_FOUND",
         "run-doesnotexist"),
        ("request_id without a seq_id", post("/api/v1/retrieve_future", _j({"request_id": run})), 404, "NOT_FOUND",
         run),
        ("request_id of another run", post("/api/v1/retrieve_future", _j({"request_id": f"{other_run}/9"})), 404,
         "NOT_FOUND", other_run),
        ("unknown sampling_session_id",
         post("/api/v1/asample", _j({"sampling_session_id": "sampler-nope", "seq_id": 0, "num_samples": 1,
                                     "prompt": {"chunks": []}, "sampling_params": {}})), 404, "NOT_FOUND",
         "sampler-nope"),
        ("unknown sampler", request_bytes("GET", "/api/v1/samplers/sampler-nope", headers=key), 404, "NOT_FOUND",
         "sampler-nope"),
        ("save_weights named with a tinker:// path",
         post("/api/v1/save_weights", _j({"model_id": run, "seq_id": 1, "path": f"tinker://{other_run}/weights/x"})),
         422, "INVALID_ARGUMENT", "name"),
        ("save_weights named ../x", post("/api/v1/save_weights", _j({"model_id": run, "seq_id": 1, "path": "../x"})),
         422, "INVALID_ARGUMENT", "name"),
        ("save_weights named with a NUL",
         post("/api/v1/save_weights", _j({"model_id": run, "seq_id": 1, "path": "a\u0000b"})), 422,
         "INVALID_ARGUMENT", "name"),
        ("sampling session on a training checkpoint",
         post("/api/v1/create_sampling_session", _j({"model_path": f"tinker://{run}/weights/x"})), 422,
         "INVALID_ARGUMENT", "sampler_weights"),
        ("sampling session on a %2e%2e path",
         post("/api/v1/create_sampling_session", _j({"model_path": f"tinker://{run}/sampler_weights/%2e%2e"})), 422,
         "INVALID_ARGUMENT", "model_path"),
        # -- keys
        ("empty X-API-Key", step_req(run, {"X-API-Key": ""}), 401, "UNAUTHENTICATED", "key"),
        ("wrong Bearer", step_req(run, {"Authorization": "Bearer tml-nope"}), 401, "UNAUTHENTICATED", "key"),
        ("empty Bearer", step_req(run, {"Authorization": "Bearer "}), 401, "UNAUTHENTICATED", "key"),
        ("Basic credentials", step_req(run, {"Authorization": "Basic dXNlcjpwYXNz"}), 401, "UNAUTHENTICATED", "key"),
        ("key with odd bytes", step_req(run, {"X-API-Key": b"tml-\xff\x01"}), 401, "UNAUTHENTICATED", "key"),
        ("right key in the wrong header", step_req(run, {"X-Api-Token": KEY}), 401, "UNAUTHENTICATED", "key"),
        # -- encodings the door does not speak
        ("gzip JSON", post("/api/v1/optim_step", b"\x1f\x8b\x08\x00garbage", {**json_key, "Content-Encoding": "gzip"}),
         415, "INVALID_ARGUMENT", "Content-Encoding"),
        ("brotli JSON", post("/api/v1/optim_step", step_body(run), {**json_key, "Content-Encoding": "br"}), 415,
         "INVALID_ARGUMENT", "Content-Encoding"),
        ("protobuf marked zstd, not compressed",
         post("/api/v1/forward_backward", fb_proto, {**proto_key, "Content-Encoding": "zstd"}), 422,
         "INVALID_ARGUMENT", "zstd"),
        ("zstd on a JSON route", post("/api/v1/optim_step", step_body(run), {**json_key, "Content-Encoding": "zstd"}),
         415, "INVALID_ARGUMENT", "zstd"),
    ]


def step_body(run: str) -> bytes:
    return _j({"model_id": run, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}})


def step_req(run: str, headers: dict) -> bytes:
    return request_bytes("POST", "/api/v1/optim_step", step_body(run), {"Content-Type": "application/json", **headers})


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------

def _run(d) -> str:
    created = d.stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=4, seed=1)), metadata=d.metadata(),
                               timeout=sc.RPC_TIMEOUT_S)
    r = _wait(d, created.init_op_id)
    assert r.state == sc.Retrieve.DONE, r.error
    return created.run_id


def _wait(d, op_id: str, timeout: float = 120.0) -> pb.RetrieveResponse:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = d.stub.Retrieve(pb.RetrieveRequest(op_id=op_id, wait_ms=5000), metadata=d.metadata(), timeout=15)
        if r.state != sc.Retrieve.PENDING:
            return r
    raise AssertionError(f"{op_id} still pending")


def _assert_nothing_queued(d, run: str) -> None:
    """The run's ledger holds its initialisation and at most a noop at seq_id 1 (the door fills
    the seq_id of an ordered operation refused for its content, docs/http-api.md "Errors"):
    the next seq_id runs a fresh operation, nothing sits past it, and no step was taken."""
    md = d.metadata()
    code = sc.rpc_error(d.stub.Retrieve, pb.RetrieveRequest(op_id=f"{run}/1"), metadata=md)
    if code is None:
        first = _wait(d, f"{run}/1")
        assert first.state == sc.Retrieve.DONE and first.result.WhichOneof("result") == "noop", first
        nxt = 2
    else:
        assert code.name == "NOT_FOUND", code
        nxt = 1
    for seq in (nxt + 1, nxt + 2, nxt + 3):
        code = sc.rpc_error(d.stub.Retrieve, pb.RetrieveRequest(op_id=f"{run}/{seq}"), metadata=md)
        assert code is not None and code.name == "NOT_FOUND", (seq, code)
    op = d.stub.Submit(pb.SubmitRequest(run_id=run, seq_id=nxt, noop=pb.NoopOp()), metadata=md,
                       timeout=sc.RPC_TIMEOUT_S)
    assert op.op_id == f"{run}/{nxt}" and _wait(d, op.op_id).state == sc.Retrieve.DONE
    info = d.stub.GetInfo(pb.GetInfoRequest(run_id=run), metadata=md, timeout=sc.RPC_TIMEOUT_S)
    assert info.step == 0, info


def test_hostile_requests_get_clear_errors_queue_nothing_and_the_door_keeps_serving(door, wire):
    d, url = door
    run, other_run = _run(d), _run(d)
    key = {"X-API-Key": KEY}
    cases = _cases(run, other_run, key, fb_proto(wire, run, 1))
    assert len({name for name, *_ in cases}) == len(cases) >= 30
    failures = []
    for name, request, status, code, word in cases:
        started = time.monotonic()
        try:
            got, headers, body = raw(url, request)
        except (AssertionError, OSError) as e:
            failures.append(f"{name}: no answer ({e})")
            continue
        took = time.monotonic() - started
        problems = []
        if got != status:
            problems.append(f"status {got}, want {status}")
        if not isinstance(body, dict) or "error" not in body:
            problems.append(f"body is not a JSON error: {body!r:.200}")
        else:
            if body["error"].get("code") != code:
                problems.append(f"code {body['error'].get('code')}, want {code}")
            message = body["error"].get("message", "")
            if word.lower() not in message.lower():
                problems.append(f"message {message!r:.300} does not name {word!r}")
            if len(message) > 4096:
                problems.append(f"message of {len(message)} bytes")
            if not headers.get("content-type", "").startswith("application/json"):
                problems.append(f"Content-Type {headers.get('content-type')}")
        if took > 5:
            problems.append(f"answered after {took:.1f} s")
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)
    _assert_nothing_queued(d, run)
    _assert_nothing_queued(d, other_run)
    _assert_serving(d, url, wire)


def _assert_serving(d, url: str, wire) -> None:
    """healthz answers ok and a real forward_backward goes through the door."""
    status, reply = sc.http_json(url, "/api/v1/healthz")
    assert status == 200 and reply["status"] == "ok", (status, reply)
    run = _run(d)
    conn = http.client.HTTPConnection(urllib.parse.urlparse(url).netloc, timeout=SOCKET_TIMEOUT_S)
    conn.request("POST", "/api/v1/forward_backward", fb_proto(wire, run, 1),
                 {"X-API-Key": KEY, "Content-Type": "application/x-protobuf"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert json.loads(resp.read()) == {"request_id": f"{run}/1", "model_id": run}
    r = _wait(d, f"{run}/1")
    assert r.state == sc.Retrieve.DONE and r.result.forward_backward.metrics["loss:sum"] > 0, r


def test_a_lying_content_length_is_answered_and_the_connection_closed(door):
    """Fewer bytes than Content-Length says, then the client sends no more: the door answers
    400 once its read times out, and runs nothing."""
    d, url = door
    run = _run(d)
    body = step_body(run)
    started = time.monotonic()
    status, _, reply = raw(url, request_bytes("POST", "/api/v1/optim_step", body[:10],
                                              {"X-API-Key": KEY, "Content-Type": "application/json"},
                                              content_length=len(body)))
    assert status == 400 and reply["error"]["code"] == "INVALID_ARGUMENT", (status, reply)
    assert time.monotonic() - started < 10  # the door's read timeout (cpp-httplib's 5 s)
    # More bytes than Content-Length says: the rest is read as a next request, which is not HTTP.
    status, _, reply = raw(url, request_bytes("POST", "/api/v1/get_info", _j({"model_id": run}),
                                              {"X-API-Key": KEY, "Content-Type": "application/json",
                                               "Connection": "keep-alive"}) + b"\x00garbage\r\n\r\n")
    assert status == 200 and reply["model_id"] == run, reply
    _assert_nothing_queued(d, run)


def test_a_chunked_body_is_refused_at_once(door):
    """cpp-httplib reads a chunked body with no size limit, so the door refuses Transfer-Encoding
    before reading any of it (the SDK always sends a Content-Length)."""
    d, url = door
    run = _run(d)
    started = time.monotonic()
    status, headers, reply = raw(url, request_bytes("POST", "/api/v1/get_info", b"",
                                                    {"X-API-Key": KEY, "Content-Type": "application/json",
                                                     "Transfer-Encoding": "chunked", "Connection": "keep-alive"}),
                                 send_after=chunked(_j({"model_id": run}), 7))
    assert status == 411 and "Content-Length" in reply["error"]["message"], (status, reply)
    assert headers.get("connection") == "close" and time.monotonic() - started < 5


def test_sampling_on_a_missing_checkpoint_or_run_fails_at_once(door):
    """tinker:// paths naming a checkpoint that does not exist, or a run that does not: the
    session is made (paths are checked when first sampled), the sample is refused with 422."""
    d, url = door
    run = _run(d)
    for path in (f"tinker://{run}/sampler_weights/missing", "tinker://run-nope/sampler_weights/x"):
        status, reply = sc.http_json(url, "/api/v1/create_sampling_session",
                                     _j({"session_id": "s", "sampling_session_seq_id": 0, "model_path": path}),
                                     {"X-API-Key": KEY})
        assert status == 200, reply
        sample = {"sampling_session_id": reply["sampling_session_id"], "seq_id": 0, "num_samples": 1,
                  "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                  "sampling_params": {"max_tokens": 4}}
        status, reply = sc.http_json(url, "/api/v1/asample", _j(sample), {"X-API-Key": KEY})
        assert status == 422 and "no sampler weights" in reply["error"]["message"], (path, status, reply)
        for field, value in (("num_samples", 10**9), ("num_samples", 2**40)):
            status, reply = sc.http_json(url, "/api/v1/asample", _j({**sample, field: value}), {"X-API-Key": KEY})
            assert status == 422 and field in reply["error"]["message"], (field, value, status, reply)
    _assert_nothing_queued(d, run)


def test_huge_sampling_sizes_are_refused(door):
    """num_samples and max_tokens far past what a deployment serves: 422, naming the field."""
    d, url = door
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=_base_model(d), rank=4).result()
    sampling_path = training.save_weights_for_sampler("s").result().path
    status, reply = sc.http_json(url, "/api/v1/create_sampling_session",
                                 _j({"session_id": "s", "sampling_session_seq_id": 1, "model_path": sampling_path}),
                                 {"X-API-Key": KEY})
    assert status == 200, reply
    base = {"sampling_session_id": reply["sampling_session_id"], "seq_id": 0, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}, "sampling_params": {"max_tokens": 4}}
    for name, body, word in (
            ("num_samples", {**base, "num_samples": 10**9}, "num_samples"),
            ("num_samples int32+", {**base, "num_samples": 2**40}, "num_samples"),
            ("max_tokens", {**base, "sampling_params": {"max_tokens": 10**8}}, "max_tokens"),
            ("max_tokens int32+", {**base, "sampling_params": {"max_tokens": 2**40}}, "max_tokens"),
            ("negative seq_id", {**base, "seq_id": -5}, "seq_id"),
            ("prompt token past the vocabulary", {**base, "prompt": {"chunks": [{"type": "encoded_text",
                                                                                  "tokens": [10**6]}]}}, "token")):
        status, reply = sc.http_json(url, "/api/v1/asample", _j(body), {"X-API-Key": KEY})
        assert status == 422 and word in reply["error"]["message"], (name, status, reply)
    client.close("success").result()


def _base_model(d) -> str:
    return d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                  timeout=sc.RPC_TIMEOUT_S).base_models[0]


def _datum(tokens, targets):
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints([int(t) for t in tokens]),
        loss_fn_inputs={"target_tokens": tinker.types.TensorData.from_numpy(np.asarray(targets, np.int64)),
                        "weights": tinker.types.TensorData.from_numpy(np.ones(len(targets), np.float32))})


def test_the_sdk_fails_fast_on_bad_input_and_the_client_goes_on(door):
    """Bad input through the unchanged SDK raises within seconds (never a retry loop), and the
    same training client trains afterwards (test_http.py has a far target and lr 1e39)."""
    d, url = door
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=_base_model(d), rank=4).result()
    tokens, targets = sc.random_sequence(np.random.default_rng(1), 6)
    beyond = np.array(targets)
    beyond[2] = sc.VOCAB + 7
    bad = {
        "target token just past the vocabulary": lambda: training.forward_backward(
            [_datum(tokens, beyond)], "cross_entropy").result(),
        "input token beyond the vocabulary": lambda: training.forward_backward(
            [_datum(np.full(6, 10**6), targets)], "cross_entropy").result(),
        # pydantic sends NaN and infinity as null; the door refuses null, never a default.
        "learning rate NaN": lambda: training.optim_step(tinker.types.AdamParams(learning_rate=float("nan"))).result(),
        "beta2 infinite": lambda: training.optim_step(tinker.types.AdamParams(beta2=float("inf"))).result(),
    }
    for name, call in bad.items():
        started = time.monotonic()
        try:
            result = call()
        except Exception as e:  # noqa: BLE001 (the SDK's errors have no common base but Exception)
            raised = e
        else:
            raise AssertionError(f"{name}: succeeded ({result})")
        took = time.monotonic() - started
        assert took < 10, f"{name}: failed only after {took:.1f} s ({raised!r})"
    started = time.monotonic()
    out = training.forward_backward([_datum(tokens, targets)], "cross_entropy").result(timeout=60)
    assert time.monotonic() - started < 30 and out.metrics["loss:sum"] > 0
    client.close("success").result()
