"""A coordinator killed with kill -9 and started again with the same flags resumes its
runs from its journal: results stay retrievable by their op ids, retries and conflicts
answer as before, ops that were on the replicas when it died are recovered from the
answers the replica leaders kept (or run now if they never ran), none runs twice, and
the run continues exactly as a run on a fresh deployment that never crashed."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time

import grpc
import numpy as np
import pytest

import service_client as sc
from service_client import Retrieve, adam, batch, datum, pb, types

Code = grpc.StatusCode

LORA = types.LoraConfig(rank=8, seed=3)


def _ops(n: int) -> list[dict]:
    """n ops alternating forward_backward (fixed random batches) and optim_step."""
    rng = np.random.default_rng(11)
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append({"forward_backward": batch([datum(*sc.random_sequence(rng, k)) for k in (7, 12, 5)])})
        else:
            out.append({"optim_step": adam(learning_rate=5e-2)})
    return out


def _fresh_run(stub, run_id: str) -> str:
    created = stub.CreateRun(pb.CreateRunRequest(run_id=run_id, lora=LORA), timeout=sc.RPC_TIMEOUT_S)
    sc.result(stub, created.init_op_id)
    return created.init_op_id


def _step(stub, run_id: str) -> int:
    return stub.GetInfo(pb.GetInfoRequest(run_id=run_id), timeout=sc.RPC_TIMEOUT_S).step


def _loss(result: pb.OpResult) -> float:
    return result.forward_backward.metrics["loss:sum"]


def _http_result(port_file: str, request_id: str) -> dict:
    """The HTTP door's retrieve_future answer for `request_id`, polled (bounded) until ready."""
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the HTTP door wrote no port or kept answering try_again"
        try:
            with open(port_file) as f:
                port = f.read()
        except OSError:
            port = ""
        if port.endswith("\n"):
            status, reply = sc.http_json(f"http://127.0.0.1:{port.strip()}", "/api/v1/retrieve_future",
                                         json.dumps({"request_id": request_id}).encode())
            assert status == 200, reply
            if reply.get("type") != "try_again":
                return reply
        time.sleep(0.1)


def test_kill9_and_restart_resumes_runs_without_running_anything_twice(make_deployment, tmp_path):
    journal, http_port_file = str(tmp_path / "journal"), str(tmp_path / "http_port")
    d = make_deployment("restart", coordinator_args=["--journal_dir", journal, "--http_port", "0",
                                                     "--http_port_file", http_port_file],
                        worker_args=["--reconnect_timeout_s", "90"]).start()
    stub = d.stub
    run = "resume"
    init_op = _fresh_run(stub, run)
    ops = _ops(12)
    outcome: dict[int, pb.RetrieveResponse] = {}
    ids: dict[int, str] = {}

    # 1. Four ops finish; kill -9 while idle; everything is still there after the restart.
    for seq in range(1, 5):
        ids[seq] = sc.submit(stub, run, seq, **ops[seq - 1])
        outcome[seq] = sc.wait(stub, ids[seq])
        assert outcome[seq].state == Retrieve.DONE, outcome[seq].error
    d.kill_coordinator()
    assert os.path.getsize(os.path.join(journal, "journal.log")) > 0
    os.remove(http_port_file)
    d.restart_coordinator()
    stub = d.stub
    for seq in range(1, 5):
        again = sc.wait(stub, ids[seq])
        assert again.state == Retrieve.DONE and again.result == outcome[seq].result, f"seq {seq} changed"
    reply = _http_result(http_port_file, ids[3])  # the HTTP door finds it too
    assert abs(reply["metrics"]["loss:sum"] - _loss(outcome[3].result)) < 1e-6, reply
    assert _step(stub, run) == 2
    assert sc.submit(stub, run, 3, **ops[2]) == ids[3], "a retry after the restart got another op id"
    with pytest.raises(grpc.RpcError) as e:
        sc.submit(stub, run, 3, **ops[1])
    assert e.value.code() == Code.ALREADY_EXISTS, e.value.details()
    retried = stub.CreateRun(pb.CreateRunRequest(run_id=run, lora=LORA), timeout=sc.RPC_TIMEOUT_S)
    assert retried.init_op_id == init_op, "a retried CreateRun answered another init op"

    # 2. Six ops submitted at once; kill -9 while they run (some finished, some on the
    # replicas, some queued), restart: each ends DONE, or FAILED saying why, none twice.
    for seq in range(5, 11):
        ids[seq] = sc.submit(stub, run, seq, **ops[seq - 1])
    d.kill_coordinator()
    d.restart_coordinator()
    stub = d.stub
    for seq in range(5, 11):
        outcome[seq] = sc.wait(stub, ids[seq], timeout=120)
        if outcome[seq].state == Retrieve.FAILED:
            err = outcome[seq].error
            assert err.category == pb.OpError.SERVER and "restarted" in err.message, err

    for seq in range(5, 11):  # retries of ops that were out at the crash answer their ids
        assert sc.submit(stub, run, seq, **ops[seq - 1]) == ids[seq], f"seq {seq}: a retry got another op id"

    # 3. The run continues at the next seq_id.
    for seq in (11, 12):
        ids[seq] = sc.submit(stub, run, seq, **ops[seq - 1])
        outcome[seq] = sc.wait(stub, ids[seq])
        assert outcome[seq].state == Retrieve.DONE, outcome[seq].error
    done = [seq for seq in sorted(outcome) if outcome[seq].state == Retrieve.DONE]
    steps = sum(1 for seq in done if "optim_step" in ops[seq - 1])
    assert _step(stub, run) == steps, f"the run took {_step(stub, run)} steps, {steps} optim_steps succeeded"
    with open(d.coordinator_log, errors="replace") as f:
        log = f.read()
    assert "1 run(s) restored" in log, "the restart did not say what it restored"

    # 4. A fresh deployment that never crashed, given the ops that succeeded, computes the same.
    ref = make_deployment("reference").start()
    _fresh_run(ref.stub, run)
    for seq in done:
        got = sc.result(ref.stub, sc.submit(ref.stub, run, seq, **ops[seq - 1]))
        if "forward_backward" in ops[seq - 1]:
            want = _loss(outcome[seq].result)
            assert abs(_loss(got) - want) <= 1e-5 * max(1.0, abs(want)), \
                f"seq {seq}: loss {want} after the restarts, {_loss(got)} without them"
    assert _step(ref.stub, run) == steps


def test_lathe_train_continues_across_a_coordinator_restart(make_deployment, build_dir, tmp_path):
    """The C++ client rides out a kill -9 and restart: `lathe train` keeps two steps queued,
    retries its submits and polls through the restart, and ends with every step done once."""
    d = make_deployment("train_restart", coordinator_args=["--journal_dir", str(tmp_path / "journal")],
                        worker_args=["--reconnect_timeout_s", "90"]).start()
    data, out = tmp_path / "sft.jsonl", tmp_path / "train.out"
    rng = np.random.default_rng(0)
    with open(data, "w") as f:
        for _ in range(32):
            start, stride = int(rng.integers(0, sc.VOCAB)), int(rng.integers(1, 4))
            f.write(json.dumps({"tokens": [(start + i * stride) % sc.VOCAB for i in range(48)]}) + "\n")
    with open(out, "w") as log:
        proc = subprocess.Popen([os.path.join(build_dir, "client", "lathe"), "train", "--address", d.address,
                                 "--data", str(data), "--steps", "16", "--batch_size", "8", "--learning_rate", "1e-2"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not re.search(r"step +3/16", out.read_text()):
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "lathe train did not reach step 3 within 60 s\n" + out.read_text()
            time.sleep(0.05)
        d.kill_coordinator()
        d.restart_coordinator()
        proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = out.read_text()
    assert proc.returncode == 0, text
    steps = re.findall(r"step +(\d+)/16 ", text)
    assert [int(s) for s in steps] == list(range(1, 17)), text
    run_id = re.search(r"run (run-[0-9a-f]+)", text).group(1)
    assert _step(d.stub, run_id) == 16, "an optim_step ran twice or not at all"


def test_an_unusable_journal_dir_is_refused_at_start(build_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    journal = str(blocker / "journal")
    env = {**os.environ, **sc.SUBPROCESS_ENV, "LATHE_WORKER_TOKEN": secrets.token_hex(32)}
    proc = subprocess.run([os.path.join(build_dir, "coordinator", "lathe_coordinator"), "--listen", "127.0.0.1:0",
                           "--journal_dir", journal], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and f"cannot create journal folder {journal}" in proc.stderr, proc.stderr


def test_workers_stop_when_the_coordinator_does_not_come_back(make_deployment, tmp_path):
    d = make_deployment("gone", coordinator_args=["--journal_dir", str(tmp_path / "journal")],
                        worker_args=["--reconnect_timeout_s", "3"]).start()
    d.kill_coordinator()
    assert d.wait_workers(60) is not None, "the workers outlived --reconnect_timeout_s\n" + d.log_tails()
    with open(d.workers_log, errors="replace") as f:
        log = f.read()
    assert "redialing coordinator" in log and "did not come back within 3s (--reconnect_timeout_s)" in log, \
        d.log_tails()
