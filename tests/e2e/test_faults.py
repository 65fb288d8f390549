"""End-to-end tests of how a deployment fails and stops: a killed, frozen or stalled rank,
API keys, SIGTERM to the coordinator or to the ranks, and the standard health service.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest

import service_client as sc
from service_client import Health, Retrieve, adam, datum, pb, types

Code = grpc.StatusCode
LORA = dict(rank=8, seed=3)
_fb = sc.fb_op
_good = sc.good_datum


# --------------------------------------------------------------------------------------
# 4. a dead rank fails what is unfinished, and the coordinator keeps answering
# --------------------------------------------------------------------------------------

def _state(stub, op_id):
    return stub.Retrieve(pb.RetrieveRequest(op_id=op_id), timeout=sc.RPC_TIMEOUT_S).state


def test_killed_rank_fails_operations_with_unavailable(make_deployment):
    d = make_deployment("kill").start()
    stub = d.stub
    run = sc.create_run(stub, **LORA)
    rng = np.random.default_rng(3)
    big = _fb(*[datum(*sc.random_sequence(rng, 4096)) for _ in range(8)])  # ~3 s on this machine
    in_flight = sc.submit(stub, run, 1, **big)
    queued = sc.submit(stub, run, 2, optim_step=adam())
    buffered = sc.submit(stub, run, 4, **_fb(_good()))  # waits for seq 3, which never comes
    time.sleep(0.3)

    pids = d.worker_pids()
    assert sorted(pids) == [0, 1, 2, 3], f"dp_worker ranks found: {pids}"
    assert _state(stub, in_flight) == Retrieve.PENDING, "the big op finished before the kill: make it bigger"
    killed_at = time.monotonic()
    os.kill(pids[3], signal.SIGKILL)

    limit = 3.0 + 7.0  # heartbeat timeout + margin
    for name, op_id in (("in flight", in_flight), ("queued", queued), ("buffered", buffered)):
        r = sc.wait(stub, op_id, timeout=limit + 5)
        elapsed = time.monotonic() - killed_at
        assert r.state == Retrieve.FAILED, f"{name} op: {Retrieve.State.Name(r.state)}"
        assert r.error.code == Code.UNAVAILABLE.value[0], f"{name} op: {r.error}"
        assert r.error.category == pb.OpError.SERVER, f"{name} op: {r.error}"
        assert elapsed < limit, f"{name} op failed {elapsed:.1f} s after the kill"

    h = d.health()
    assert h.state == Health.UNAVAILABLE, h
    assert h.detail, "Health gives no reason for UNAVAILABLE"
    assert _grpc_health(d, b"\x08\x02") == b"\x08\x02", "grpc.health.v1 should say NOT_SERVING"
    for what, call, req in (("Submit", stub.Submit, pb.SubmitRequest(run_id=run, seq_id=3, **_fb(_good()))),
                            ("CreateRun", stub.CreateRun, pb.CreateRunRequest())):
        assert sc.rpc_error(call, req) == Code.UNAVAILABLE, what
    assert stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=sc.RPC_TIMEOUT_S).vocab_size == sc.VOCAB
    # No rank is left behind waiting on the dead one.
    assert d.wait_workers(30) is not None, "the dp_worker job still runs 30 s after a rank died"


def test_silent_replica_leader_is_lost_after_heartbeat_timeout(make_deployment):
    """A frozen leader (SIGSTOP) keeps its stream open but stops its heartbeats."""
    d = make_deployment("frozen_leader").start()
    stub = d.stub
    run = sc.create_run(stub, **LORA)
    leader = d.worker_pids()[2]  # replica 1's first rank
    os.kill(leader, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        op_id = sc.submit(stub, run, 1, **_fb(_good()))
        r = sc.wait(stub, op_id, timeout=20)
        elapsed = time.monotonic() - frozen_at
        assert r.state == Retrieve.FAILED and r.error.code == Code.UNAVAILABLE.value[0], r
        assert elapsed < 3.0 + 3.0, f"op failed {elapsed:.1f} s after the leader froze (heartbeat timeout 3 s)"
        assert d.health().state == Health.UNAVAILABLE
    finally:
        os.kill(leader, signal.SIGKILL)


def test_stalled_rank_fails_operation_and_leaves_cleanly(make_deployment):
    """A follower stalls (SIGSTOP) mid-operation for longer than --collective_timeout_s, then resumes."""
    d = make_deployment("stalled", collective_timeout_s=4).start()
    stub = d.stub
    run = sc.create_run(stub, **LORA)
    rng = np.random.default_rng(4)
    op_id = sc.submit(stub, run, 1, **_fb(*[datum(*sc.random_sequence(rng, 4096)) for _ in range(8)]))
    time.sleep(0.7)
    follower = d.worker_pids()[3]
    assert _state(stub, op_id) == Retrieve.PENDING, "the big op finished before the stall: make it bigger"
    os.kill(follower, signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        r = sc.wait(stub, op_id, timeout=30)
        elapsed = time.monotonic() - stalled_at
    finally:
        os.kill(follower, signal.SIGCONT)
    assert r.state == Retrieve.FAILED and r.error.category == pb.OpError.SERVER, r
    assert elapsed < 4 + 6, f"op failed {elapsed:.1f} s after the stall (collective timeout 4 s)"
    # The broken replica leaves the job: the deployment turns UNAVAILABLE, no rank crashes.
    d.wait_health(Health.UNAVAILABLE, 10)
    rc = d.wait_workers(30)
    with open(d.workers_log, errors="replace") as f:
        log = f.read()
    assert "Process received signal" not in log, log[-4000:]
    assert rc is not None and rc != 0 and rc < 128, f"mpirun exited {rc}"
    assert r.error.code in (Code.DEADLINE_EXCEEDED.value[0], Code.UNAVAILABLE.value[0]), r.error


# --------------------------------------------------------------------------------------
# 5. API keys
# --------------------------------------------------------------------------------------

def test_api_keys(make_deployment):
    d = make_deployment("auth", coordinator_args=["--auth", "on"], coordinator_env={"LATHE_API_KEYS": "k0, k1"},
                        api_key="k1").start()
    stub = d.stub
    caps = pb.GetCapabilitiesRequest()
    for metadata in (None, (("authorization", "Bearer k2"),), (("authorization", "k1"),),
                     (("authorization", "Basic k1"),), (("authorization", "Bearer "),)):
        assert sc.rpc_error(stub.GetCapabilities, caps, metadata=metadata) == Code.UNAUTHENTICATED, metadata
    for metadata in ((("authorization", "Bearer k1"),), (("authorization", "Api-Key k1"),),
                     (("authorization", "Bearer k0"),)):
        assert stub.GetCapabilities(caps, metadata=metadata, timeout=sc.RPC_TIMEOUT_S).vocab_size == sc.VOCAB
    assert d.health().state == Health.SERVING  # open, and the workers registered with the worker token

    assert sc.rpc_error(stub.CreateRun, pb.CreateRunRequest()) == Code.UNAUTHENTICATED
    key = (("authorization", "Api-Key k1"),)
    created = stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=4)), metadata=key,
                             timeout=sc.RPC_TIMEOUT_S)
    assert sc.rpc_error(stub.Retrieve, pb.RetrieveRequest(op_id=created.init_op_id)) == Code.UNAUTHENTICATED
    assert sc.rpc_error(stub.Submit, pb.SubmitRequest(run_id=created.run_id, seq_id=1, noop=pb.NoopOp())) \
        == Code.UNAUTHENTICATED
    r = stub.Retrieve(pb.RetrieveRequest(op_id=created.init_op_id, wait_ms=30000), metadata=key, timeout=40)
    assert r.state == Retrieve.DONE, r


@pytest.mark.parametrize("token", ["wrong-token-0123456789", "k1"], ids=["wrong_token", "api_key"])
def test_worker_without_the_worker_token_is_refused(make_deployment, token):
    # A valid API key is no worker credential (the workers carry one as well).
    d = make_deployment("auth_wrong", coordinator_args=["--auth", "on"], coordinator_env={"LATHE_API_KEYS": "k1"},
                        worker_env={"LATHE_WORKER_TOKEN": token, "LATHE_API_KEY": "k1"}).start(wait_serving=False)
    rc = d.wait_workers(40)
    assert rc is not None, "dp_worker job with a wrong token still runs after 40 s"
    assert rc != 0, "dp_worker job with a wrong token exited 0"
    h = d.health()
    assert h.state == Health.STARTING and h.replicas_registered == 0, h
    with open(d.workers_log, errors="replace") as f:
        assert "UNAUTHENTICATED" in f.read()


# --------------------------------------------------------------------------------------
# 6. SIGTERM stops everything cleanly
# --------------------------------------------------------------------------------------

def test_sigterm_stops_coordinator_and_workers(make_deployment):
    d = make_deployment("sigterm").start()
    run = sc.create_run(d.stub, **LORA)
    sc.result(d.stub, sc.submit(d.stub, run, 1, **_fb(_good())))
    t0 = time.monotonic()
    assert d.stop_coordinator(10) == 0, "lathe_coordinator did not exit 0 within 10 s of SIGTERM"
    rc = d.wait_workers(10)
    assert rc == 0, f"mpirun exited {rc} ({time.monotonic() - t0:.1f} s after SIGTERM; None: still running)"
    with open(d.workers_log, errors="replace") as f:
        log = f.read()
    assert "dp_worker:" not in log, log[-3000:]


def test_sigterm_to_the_ranks_deregisters_every_replica(make_deployment):
    """As slurm or Kubernetes stop a job: SIGTERM to every rank. Each leader finishes
    the operation in flight, stops its replica and deregisters; every rank exits 0."""
    d = make_deployment("sigterm_ranks").start()
    run = sc.create_run(d.stub, **LORA)
    in_flight = sc.submit(d.stub, run, 1, **_fb(_good()))
    for pid in d.worker_pids().values():
        os.kill(pid, signal.SIGTERM)
    r = sc.wait(d.stub, in_flight, timeout=20)
    assert r.state in (Retrieve.DONE, Retrieve.FAILED), r  # finished, or failed as the replicas left
    assert d.wait_workers(20) == 0, "mpirun did not exit 0 within 20 s of SIGTERM to its ranks"
    assert d.health().state == Health.UNAVAILABLE
    with open(d.coordinator_log, errors="replace") as f:
        log = f.read()
    for replica in (0, 1):
        assert f"replica {replica}: deregistered: stopped by signal" in log, log[-3000:]


# --------------------------------------------------------------------------------------
# 7. the standard health service
# --------------------------------------------------------------------------------------

def _grpc_health(d, want: bytes, timeout: float = 3.0) -> bytes:
    """grpc.health.v1 Check's raw answer, polled until it is `want` (the coordinator
    updates it on its housekeeping tick) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    got = sc.health_check_bytes(d.channel)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = sc.health_check_bytes(d.channel)
    return got


def test_grpc_health_v1_serving(deployment):
    assert _grpc_health(deployment, b"\x08\x01") == b"\x08\x01"  # status: SERVING
    h = deployment.health()
    assert (h.state, h.replicas_registered, h.replicas_expected) == (Health.SERVING, 2, 2)
    caps = deployment.stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=sc.RPC_TIMEOUT_S)
    assert (caps.layout.replicas, caps.layout.ep, caps.architecture) == (2, 2, "Qwen3MoeForCausalLM")
    assert (caps.vocab_size, caps.max_seq_len) == (sc.VOCAB, sc.MAX_SEQ_LEN)
