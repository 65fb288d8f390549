"""Replicas as separate jobs (dp_worker --replica_index): one mpirun job per replica, the
cross-replica gradient sums on Gloo groups formed through the coordinator. The numbers equal
those of the same replicas in one job; a killed replica leaves the membership and the
deployment goes on with the live replicas.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import service_client as sc
from service_client import Health, Retrieve, adam, datum, pb, types

LORA = dict(rank=8, seed=3)
LENGTHS = ((3, 17, 9, 40, 1, 25), (12, 5, 30, 2, 21, 8))


def _batches():
    rng = np.random.default_rng(7)
    return [[datum(*sc.random_sequence(rng, n)) for n in lengths] for lengths in LENGTHS]


def _train(d, run: str, seq: int = 1):
    """Two steps (forward_backward + optim_step each), a forward, then two seeded samples (one
    per replica: seq_id picks it): the results, and the next seq."""
    out = []
    for b in _batches():
        out.append(d.run_op(run, seq, **sc.fb_op(*b)))
        out.append(d.run_op(run, seq + 1, optim_step=adam(learning_rate=1e-2)))
        seq += 2
    out.append(d.run_op(run, seq, **sc.fb_op(*_batches()[0], forward=True)))
    prompt = types.ModelInput(chunks=[sc.token_chunk([5, 17, 3, 42, 8])])
    for k in (1, 2):
        out.append(d.run_op(run, seq + k, sample=pb.SampleOp(
            prompt=prompt, num_samples=2, params=pb.SamplingParams(max_tokens=6, seed=7, temperature=1.0))))
    return out, seq + 3


def _assert_equal(got, want, what, exact_metrics=True):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        if a.HasField("sample"):
            assert a.sample == b.sample, f"{what}: result {k} samples differ"
            continue
        if a.HasField("forward_backward"):
            for d, (x, y) in enumerate(zip(sc.logprobs(a.forward_backward), sc.logprobs(b.forward_backward))):
                assert np.array_equal(x, y), f"{what}: result {k} datum {d} logprobs differ by {np.max(np.abs(x - y))}"
            ma, mb = a.forward_backward.metrics, b.forward_backward.metrics
        else:
            ma, mb = a.optim_step.metrics, b.optim_step.metrics
        assert set(ma) == set(mb), f"{what}: result {k} metrics {dict(ma)} vs {dict(mb)}"
        for key in mb:
            if exact_metrics:
                assert ma[key] == mb[key], f"{what}: result {k} {key}: {ma[key]} vs {mb[key]}"
            else:
                assert ma[key] == pytest.approx(mb[key], rel=1e-12), f"{what}: result {k} {key}"


@pytest.mark.parametrize("ranks,tp", [(1, 1), (2, 2)], ids=["1rank", "tp2"])
def test_separate_jobs_equal_one_job(make_deployment, ranks, tp):
    one = make_deployment("onejob", replicas=2, ranks=2 * ranks, ep=1, tp=tp).start()
    run = sc.create_run(one.stub, **LORA)
    want, _ = _train(one, run)
    one.close()

    d = make_deployment("jobs", cls=sc.ReplicaJobs, replicas=2, ranks=ranks, tp=tp).start()
    assert d.health().state == Health.SERVING
    run = sc.create_run(d.stub, **LORA)
    got, _ = _train(d, run)
    # One rank per replica: every sum has two terms, in any order the same bits. With tp 2,
    # the gradient norm sums four ranks' squares in another order (the job's two, then
    # across) than one world's all-reduce: the same to the last bits or so, and it does
    # not enter the update (no clipping here).
    _assert_equal(got, want, f"{ranks} rank(s) per replica", exact_metrics=tp == 1)
    for i in range(2):
        with open(d.replica_log(i)) as f:
            assert "cross-replica group place0 of generation 1 formed" in f.read(), f"replica {i} formed no group"


def _close(got, want, what, split=()):
    """Results of the same ops on a run whose first step summed two replicas' gradients (two
    partial sums added) against one process summing them all: equal up to float32 rounding
    of that order, the tolerance of the service's parity tests. Results `split` over several
    replicas skip the MoE load metrics, which describe each replica's part of the batch."""
    for k, (a, b) in enumerate(zip(got, want)):
        if a.HasField("forward_backward"):
            for d, (x, y) in enumerate(zip(sc.logprobs(a.forward_backward), sc.logprobs(b.forward_backward))):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=f"{what}: result {k} datum {d}")
            ma, mb = a.forward_backward.metrics, b.forward_backward.metrics
        else:
            ma, mb = a.optim_step.metrics, b.optim_step.metrics
        for key in mb:
            if k in split and key.startswith("moe_"):
                continue
            assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-6), f"{what}: result {k} {key}"


def _state(stub, op_id):
    return stub.Retrieve(pb.RetrieveRequest(op_id=op_id), timeout=sc.RPC_TIMEOUT_S).state


@pytest.mark.parametrize("ranks,tp", [(1, 1), (2, 2)], ids=["1rank", "tp2"])
def test_killed_replica_leaves_and_the_survivor_trains_on(make_deployment, ranks, tp):
    a, b = _batches()
    opt = dict(optim_step=adam(learning_rate=1e-2))
    one = make_deployment("reference", replicas=1, ranks=ranks, ep=1, tp=tp).start()
    run = sc.create_run(one.stub, **LORA)
    want = [one.run_op(run, 1, **sc.fb_op(*a)), one.run_op(run, 2, **opt), one.run_op(run, 3, **sc.fb_op(*b)),
            one.run_op(run, 4, **opt), one.run_op(run, 5, **sc.fb_op(*a, forward=True))]
    one.close()

    d = make_deployment("kill", cls=sc.ReplicaJobs, replicas=2, ranks=ranks, tp=tp, collective_timeout_s=20).start()
    stub = d.stub
    run = sc.create_run(stub, **LORA)
    got = [d.run_op(run, 1, **sc.fb_op(*a)), d.run_op(run, 2, **opt)]
    d.run_op(run, 3, **sc.fb_op(*a))  # gradients of a step the replica's loss will cut short
    rng = np.random.default_rng(3)
    big = sc.fb_op(*[datum(*sc.random_sequence(rng, 4096)) for _ in range(8)])
    in_flight = sc.submit(stub, run, 4, **big)
    time.sleep(0.3)
    pids = d.replica_pids(1)
    assert sorted(pids) == list(range(ranks)), f"replica 1's ranks: {pids}"
    assert _state(stub, in_flight) == Retrieve.PENDING, "the big op finished before the kill: make it bigger"
    killed_at = time.monotonic()
    os.kill(pids[ranks - 1], signal.SIGKILL)  # its last rank; mpirun ends the others

    r = sc.wait(stub, in_flight, timeout=30)
    assert r.state == Retrieve.FAILED, Retrieve.State.Name(r.state)
    assert r.error.code == sc.grpc.StatusCode.UNAVAILABLE.value[0], r.error
    assert r.error.category == pb.OpError.SERVER, r.error
    assert time.monotonic() - killed_at < 10, "the op in flight did not fail within 10 s of the kill"
    h = d.health()
    assert h.state == Health.SERVING, h
    assert "replica 1 left" in h.detail and "1 of 2 replicas" in h.detail, h.detail
    assert d.wait_job(1, 30) is not None, "replica 1's mpirun still runs 30 s after its rank died"

    # The step the loss cut short cannot complete: its gradients lacked replica 1's part.
    r = sc.wait(stub, sc.submit(stub, run, 5, **opt), timeout=60)
    assert r.state == Retrieve.FAILED and r.error.code == sc.grpc.StatusCode.ABORTED.value[0], r
    assert "forward_backward again" in r.error.message, r.error

    # The survivor trains on with the whole batch: the numbers are one replica's.
    got += [d.run_op(run, 6, **sc.fb_op(*b)), d.run_op(run, 7, **opt), d.run_op(run, 8, **sc.fb_op(*a, forward=True))]
    _close(got, want, "after replica 1 left", split=(0,))
    assert d.jobs[0].poll() is None, "replica 0's job ended"
    with open(d.replica_log(0)) as f:
        assert "of generation 2 formed: replica 0 of 1" in f.read()


def _wait_log(path: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if text in f.read():
                return
        time.sleep(0.1)
    raise AssertionError(f"{path} does not say {text!r} within {timeout:.0f} s")


def _checkpoint_tensors(root: str, run: str, name: str) -> dict:
    from safetensors.numpy import load_file

    folder = os.path.join(root, run, "weights", name)
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".safetensors"):
                for key, value in load_file(os.path.join(dirpath, f)).items():
                    out[f"{os.path.relpath(dirpath, folder)}/{f}:{key}"] = value
    assert out, f"no tensors under {folder}"
    return out


def test_restarted_replica_rejoins_with_the_runs_state(make_deployment, tmp_path):
    a, b = _batches()
    opt = dict(optim_step=adam(learning_rate=1e-2))
    root = str(tmp_path / "checkpoints")
    d = make_deployment("rejoin", cls=sc.ReplicaJobs, replicas=2, ranks=1, max_runs=2,
                        worker_args=["--checkpoint_root", root], coordinator_args=["--checkpoint_root", root]).start()
    stub = d.stub
    run = sc.create_run(stub, **LORA)
    other = sc.create_run(stub, rank=4, seed=9)
    d.run_op(run, 1, **sc.fb_op(*a))
    d.run_op(run, 2, **opt)
    d.run_op(other, 1, **sc.fb_op(*b))
    d.run_op(other, 2, **opt)

    os.kill(d.replica_pids(1)[0], signal.SIGKILL)
    assert d.wait_job(1, 30) is not None, "replica 1's job still runs 30 s after its rank died"
    deadline = time.monotonic() + 10
    while "replica 1 left" not in d.health().detail:
        assert time.monotonic() < deadline, d.health()
        time.sleep(0.1)
    # Replica 0 alone takes a step the new replica 1 must receive.
    d.run_op(run, 3, **sc.fb_op(*b))
    d.run_op(run, 4, **opt)

    d.start_replica(1)
    _wait_log(d.coordinator_log, "replica 1 registered again", 60)
    # The next operation admits it: it receives both runs, then takes its part of the batch.
    d.run_op(run, 5, **sc.fb_op(*a))
    _wait_log(d.coordinator_log, "replica(s) joined with the state of every run (2 runs)", 10)
    h = d.health()
    assert h.state == Health.SERVING and "left" not in h.detail, h
    d.run_op(run, 6, **opt)
    d.run_op(other, 3, **sc.fb_op(*a))
    d.run_op(other, 4, **opt)
    with open(d.replica_log(1)) as f:
        assert "of generation 3 formed: replica 1 of 2" in f.read()

    # Two equal datums go one to each replica: equal weights give equal logprobs.
    twin = _batches()[0][3]
    for r in (run, other):
        out = d.run_op(r, 7 if r == run else 5, **sc.fb_op(twin, twin, forward=True)).forward_backward
        x, y = sc.logprobs(out)
        assert np.array_equal(x, y), f"run {r}: the replicas' logprobs differ by {np.max(np.abs(x - y))}"

    # Byte for byte: the state replica 0 saves, then (replica 0 gone) the state replica 1 saves.
    d.run_op(run, 8, save_state=pb.SaveStateOp(name="from0"))
    os.kill(d.replica_pids(0)[0], signal.SIGKILL)
    assert d.wait_job(0, 30) is not None
    deadline = time.monotonic() + 10
    while "replica 0 left" not in d.health().detail:
        assert time.monotonic() < deadline, d.health()
        time.sleep(0.1)
    d.run_op(run, 9, save_state=pb.SaveStateOp(name="from1"))
    with open(d.replica_log(1)) as f:
        assert "replica 0 of 1" in f.read(), "replica 1 did not form the generation without replica 0"
    want, got = _checkpoint_tensors(root, run, "from0"), _checkpoint_tensors(root, run, "from1")
    assert sorted(got) == sorted(want)
    kinds = {key.split(":")[1].split("/")[0] for key in want}
    assert kinds == {"param", "exp_avg", "exp_avg_sq"}, f"saved: {kinds}"
    for key in want:
        assert got[key].tobytes() == want[key].tobytes(), f"{key} differs between the replicas"

    # Loading agrees over every replica: alone, then after replica 0 rejoined, on both.
    path = f"lathe://{run}/weights/from0"
    assert d.run_op(run, 10, load_state_with_optimizer=pb.LoadStateOp(path=path)).load_state.step == 3
    d.start_replica(0)
    _wait_log(d.coordinator_log, "replica 0 registered again", 60)
    d.run_op(run, 11, load_state_with_optimizer=pb.LoadStateOp(path=path))
    out = d.run_op(run, 12, **sc.fb_op(twin, twin, forward=True)).forward_backward
    x, y = sc.logprobs(out)
    assert np.array_equal(x, y), "the replicas' logprobs differ after the second rejoin and a load"


def test_replica_index_is_checked_and_placed(build_dir, tiny_model):
    worker = os.path.join(build_dir, "dp_worker", "dp_worker")

    def dry(np_, *flags):
        return sc.subprocess.run(["mpirun", "--oversubscribe", "-np", str(np_), worker, "--model", tiny_model,
                                  "--replicas", "2", "--dry_run", *flags], capture_output=True, text=True, timeout=60)

    ok = dry(2, "--replica_index", "1", "--tp", "2")
    assert ok.returncode == 0, ok.stderr
    places = sorted(l for l in ok.stdout.splitlines() if l.startswith("place "))
    assert len(places) == 2 and all("world_size=2 replica=1 " in p and "layout=1x1x2 tp=2" in p for p in places), places
    outside = dry(1, "--replica_index", "2")
    assert outside.returncode != 0 and "--replica_index 2 is outside the deployment's 2 replicas" in outside.stderr
    negative = dry(1, "--replica_index", "-3")
    assert negative.returncode != 0 and "--replica_index must be -1" in negative.stderr, negative.stderr
    # One job holds one replica: its ranks must be one node group of the layout.
    wrong = dry(3, "--replica_index", "0", "--devices_per_node", "2")
    assert wrong.returncode != 0 and "one replica per job" in wrong.stderr, wrong.stderr


def test_replica_jobs_survive_a_coordinator_restart(make_deployment, tmp_path):
    a, b = _batches()
    opt = dict(optim_step=adam(learning_rate=1e-2))
    ops = [sc.fb_op(*a), opt, sc.fb_op(*b), opt, sc.fb_op(*a, forward=True)]
    ref = make_deployment("steady", cls=sc.ReplicaJobs, replicas=2, ranks=1).start()
    run = sc.create_run(ref.stub, **LORA)
    want = [ref.run_op(run, i + 1, **o) for i, o in enumerate(ops)]
    ref.close()

    d = make_deployment("restarted", cls=sc.ReplicaJobs, replicas=2, ranks=1,
                        coordinator_args=["--journal_dir", str(tmp_path / "journal")],
                        worker_args=["--reconnect_timeout_s", "90"]).start()
    run = sc.create_run(d.stub, **LORA)
    got = [d.run_op(run, i + 1, **o) for i, o in enumerate(ops[:2])]
    d.kill_coordinator()
    d.restart_coordinator()
    got += [d.run_op(run, i + 3, **o) for i, o in enumerate(ops[2:])]
    _assert_equal(got, want, "across the coordinator restart")
    for i in range(2):
        with open(d.replica_log(i)) as f:
            assert f.read().count("place0 of generation 1 formed") == 2, f"replica {i} did not form its groups again"
