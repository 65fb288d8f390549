"""Requests that are valid or nearly so but once took a deployment down or poisoned a run:
fewer datums than replicas, a loss that overflows float32, an update that would. Each must
leave every replica in step, and the run's next step bitwise what an untouched run gets.
Also what an operator meets: a paused coordinator, a run to delete, a refused model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import grpc
import numpy as np

import service_client as sc
from service_client import Retrieve, adam, datum, pb, types

LORA = dict(rank=8, seed=11)


def _await_unavailable(dep, timeout: float) -> pb.HealthResponse:
    """Health once it says UNAVAILABLE (whatever became of the workers); fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    health = dep.stub.Health(pb.HealthRequest(), timeout=sc.RPC_TIMEOUT_S)
    while health.state != sc.Health.UNAVAILABLE and time.monotonic() < deadline:
        time.sleep(0.2)
        health = dep.stub.Health(pb.HealthRequest(), timeout=sc.RPC_TIMEOUT_S)
    assert health.state == sc.Health.UNAVAILABLE, f"{health}\n{dep.log_tails()}"
    return health


def _run_ops(stub, run, ops, first_seq=1):
    """Submits ops in order; returns their Retrieve answers."""
    ids = [sc.submit(stub, run, first_seq + i, **op) for i, op in enumerate(ops)]
    return [sc.wait(stub, op_id) for op_id in ids]


def test_a_batch_smaller_than_the_replica_count_steps(deployment):
    """One datum, two replicas: the replica that got none still joins the gradient sum, so
    optim_step finishes at once (not after the collective timeout) and both replicas hold
    the same weights afterwards."""
    stub = deployment.stub
    run = sc.create_run(stub, **LORA)
    tokens, targets = sc.random_sequence(np.random.default_rng(5), 12)
    started = time.monotonic()
    answers = _run_ops(stub, run, [sc.fb_op(datum(tokens, targets)), {"optim_step": adam(learning_rate=1e-2)}])
    elapsed = time.monotonic() - started
    assert [a.state for a in answers] == [Retrieve.DONE] * 2, answers
    assert elapsed < deployment.collective_timeout_s / 2, f"the step took {elapsed:.1f} s"
    assert answers[1].result.optim_step.metrics["grad_norm:mean"] > 0
    # The same datum twice in one forward: one copy runs on each replica.
    fwd = sc.result(stub, sc.submit(stub, run, 3, **sc.fb_op(datum(tokens, targets), datum(tokens, targets),
                                                              forward=True)))
    a, b = sc.logprobs(fwd.forward_backward)
    np.testing.assert_array_equal(a, b, err_msg="the replicas' weights differ after the step")


def test_a_loss_that_overflows_fails_alone_and_the_run_goes_on(deployment):
    """float32 weights near the float32 maximum make the loss infinite: that forward_backward
    fails (USER, INVALID_ARGUMENT, naming the datum) on every replica, adds nothing, and the
    run's later steps equal a run that never saw it."""
    stub = deployment.stub
    rng = np.random.default_rng(9)
    data = [datum(*sc.random_sequence(rng, n)) for n in (7, 12, 4)]
    good = [sc.fb_op(*data), {"optim_step": adam(learning_rate=1e-2)}, sc.fb_op(*data[:2]),
            {"optim_step": adam(learning_rate=1e-2)}]
    clean = sc.create_run(stub, **LORA)
    want = [a.result for a in _run_ops(stub, clean, good)]

    run = sc.create_run(stub, **LORA)
    n = 12
    tokens, targets = sc.random_sequence(rng, n)
    overflow = datum(tokens, targets, weights=np.full(n, 3e38, np.float32))
    got = _run_ops(stub, run, [good[0], sc.fb_op(data[0], overflow)] + good[1:])
    bad = got.pop(1)
    assert bad.state == Retrieve.FAILED, bad
    assert bad.error.category == pb.OpError.USER and "the loss is" in bad.error.message, bad.error
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.state == Retrieve.DONE, (i, g.error)
        assert g.result == w, f"op {i} differs from the run that saw no overflowing batch"


def test_an_update_that_would_overflow_is_refused(deployment):
    """A learning rate at the float32 maximum passes validation, but the step it would take
    overflows the weights: optim_step fails (USER, FAILED_PRECONDITION) and the run keeps its
    weights; the next ordinary step equals that of a run that never sent it."""
    stub = deployment.stub
    rng = np.random.default_rng(4)
    data = [datum(*sc.random_sequence(rng, n)) for n in (9, 5)]
    clean = sc.create_run(stub, **LORA)
    want = [a.result for a in _run_ops(stub, clean, [sc.fb_op(*data), {"optim_step": adam(learning_rate=1e-2)}])]
    run = sc.create_run(stub, **LORA)
    got = _run_ops(stub, run, [sc.fb_op(*data), {"optim_step": adam(learning_rate=3e38, beta1=0.99)},
                               sc.fb_op(*data), {"optim_step": adam(learning_rate=1e-2)}])
    refused = got[1]
    assert refused.state == Retrieve.FAILED, refused
    assert refused.error.category == pb.OpError.USER and "optim_step refused" in refused.error.message, \
        refused.error
    assert got[2].state == got[3].state == Retrieve.DONE, (got[2].error, got[3].error)
    assert got[2].result == want[0] and got[3].result == want[1], "the refused step changed the run"
    assert stub.GetInfo(pb.GetInfoRequest(run_id=run), timeout=sc.RPC_TIMEOUT_S).step == 1


def test_a_paused_coordinator_keeps_its_replicas(make_deployment):
    """SIGSTOP for twice the heartbeat timeout: on SIGCONT the coordinator counts the pause as
    its own silence, keeps both replicas, and the deployment serves a step."""
    dep = make_deployment("paused").start()
    run = sc.create_run(dep.stub, **LORA)
    os.kill(dep.coordinator.pid, signal.SIGSTOP)
    try:
        time.sleep(7)  # the fixture's heartbeat timeout is 3 s
    finally:
        os.kill(dep.coordinator.pid, signal.SIGCONT)
    time.sleep(1)
    health = dep.stub.Health(pb.HealthRequest(), timeout=sc.RPC_TIMEOUT_S)
    assert health.state == sc.Health.SERVING, f"{health}\n{dep.log_tails()}"
    tokens, targets = sc.random_sequence(np.random.default_rng(2), 6)
    answers = _run_ops(dep.stub, run, [sc.fb_op(datum(tokens, targets)), {"optim_step": adam(learning_rate=1e-2)}])
    assert [a.state for a in answers] == [Retrieve.DONE] * 2, answers


def test_a_deleted_run_frees_its_slot(make_deployment):
    """delete_run runs after the run's earlier operations, releases the run on every replica
    and frees its --max_runs slot; the run's later seq_ids are NOT_FOUND, its results stay."""
    dep = make_deployment("delete", max_runs=1).start()
    stub = dep.stub
    run = sc.create_run(stub, **LORA)
    tokens, targets = sc.random_sequence(np.random.default_rng(3), 8)
    fb = sc.submit(stub, run, 1, **sc.fb_op(datum(tokens, targets)))
    assert sc.rpc_error(stub.CreateRun, pb.CreateRunRequest(lora=types.LoraConfig(rank=4))) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    deleted = sc.submit(stub, run, 2, delete_run=pb.DeleteRunOp())
    assert sc.rpc_error(stub.Submit, pb.SubmitRequest(run_id=run, seq_id=3, noop=pb.NoopOp())) == \
        grpc.StatusCode.NOT_FOUND
    assert sc.result(stub, deleted).HasField("delete_run")
    assert sc.wait(stub, fb).state == Retrieve.DONE
    assert sc.submit(stub, run, 2, delete_run=pb.DeleteRunOp()) == deleted  # a retry
    assert sc.rpc_error(stub.GetInfo, pb.GetInfoRequest(run_id=run)) == grpc.StatusCode.NOT_FOUND
    other = sc.create_run(stub, rank=4, seed=1)
    answers = _run_ops(stub, other, [sc.fb_op(datum(tokens, targets)), {"optim_step": adam(learning_rate=1e-2)}])
    assert [a.state for a in answers] == [Retrieve.DONE] * 2, answers


def test_a_refused_model_reaches_health_and_the_cli(make_deployment, tiny_model, tmp_path, build_dir):
    """Workers that refuse their model tell the coordinator: Health says UNAVAILABLE with the
    reason (naming the file once), and `lathe info --wait_s` prints it instead of waiting."""
    refused = tmp_path / "refused-model"
    shutil.copytree(tiny_model, refused)
    config = json.loads((refused / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (refused / "config.json").write_text(json.dumps(config))
    dep = make_deployment("refused")
    dep.model_dir = str(refused)
    dep.start(wait_serving=False)
    health = _await_unavailable(dep, 60)
    assert re.search(r"replica [01] refused to start", health.detail) and "hidden_act" in health.detail, \
        health.detail
    assert health.detail.count("config.json") == 1, health.detail
    cli = subprocess.run([os.path.join(build_dir, "client", "lathe"), "info", "--address", dep.address,
                          "--wait_s", "30"], capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0 and "hidden_act" in cli.stderr, cli


def test_a_failed_init_leaves_the_run_as_it_was(make_deployment, tiny_model, tmp_path):
    """init builds the new state beside the run's current one: when the build fails (here the
    model folder changed under the deployment), the run keeps its adapter, optimizer and
    step, and a later init that can succeed does."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    dep = make_deployment("reinit")
    dep.model_dir = str(model)
    dep.start()
    stub = dep.stub
    run = sc.create_run(stub, **LORA)
    tokens, targets = sc.random_sequence(np.random.default_rng(8), 10)
    probe = sc.fb_op(datum(tokens, targets), datum(tokens, targets), forward=True)
    answers = _run_ops(stub, run, [sc.fb_op(datum(tokens, targets)), {"optim_step": adam(learning_rate=1e-2)},
                                   probe])
    before = answers[2].result
    good_config = (model / "config.json").read_text()
    (model / "config.json").write_text(json.dumps({**json.loads(good_config), "hidden_act": "gelu"}))
    failed = sc.wait(stub, sc.submit(stub, run, 4, init=pb.InitOp(lora=types.LoraConfig(rank=4, seed=2))))
    assert failed.state == Retrieve.FAILED and "the run is unchanged" in failed.error.message, failed
    after = _run_ops(stub, run, [probe], first_seq=5)[0]
    assert after.state == Retrieve.DONE and after.result == before, "the failed init changed the run"
    info = stub.GetInfo(pb.GetInfoRequest(run_id=run), timeout=sc.RPC_TIMEOUT_S)
    assert info.lora.rank == LORA["rank"] and info.step == 1, info
    (model / "config.json").write_text(good_config)
    again = sc.result(stub, sc.submit(stub, run, 6, init=pb.InitOp(lora=types.LoraConfig(rank=4, seed=2))))
    assert again.init.lora.rank == 4 and again.init.step == 0


def test_replicas_stop_when_the_coordinator_stays_silent(make_deployment):
    """Liveness both ways: the coordinator sends heartbeats too, so replicas whose coordinator
    stays silent past --coordinator_timeout_s stop (instead of holding their devices forever),
    and the coordinator, once it runs again, reports the deployment UNAVAILABLE."""
    dep = make_deployment("silent", worker_args=["--coordinator_timeout_s", "3"]).start()
    os.kill(dep.coordinator.pid, signal.SIGSTOP)
    try:
        dep.workers.wait(timeout=60)
    finally:
        os.kill(dep.coordinator.pid, signal.SIGCONT)
    with open(dep.workers_log, errors="replace") as f:
        assert "the coordinator sent nothing for" in f.read(), dep.log_tails()
    _await_unavailable(dep, 30)
