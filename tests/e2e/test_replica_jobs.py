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
from service_client import Health, Retrieve, adam, datum, pb

LORA = dict(rank=8, seed=3)
LENGTHS = ((3, 17, 9, 40, 1, 25), (12, 5, 30, 2, 21, 8))


def _batches():
    rng = np.random.default_rng(7)
    return [[datum(*sc.random_sequence(rng, n)) for n in lengths] for lengths in LENGTHS]


def _train(d, run: str, seq: int = 1):
    """Two steps (forward_backward + optim_step each), then a forward: the results, and the next seq."""
    out = []
    for b in _batches():
        out.append(d.run_op(run, seq, **sc.fb_op(*b)))
        out.append(d.run_op(run, seq + 1, optim_step=adam(learning_rate=1e-2)))
        seq += 2
    out.append(d.run_op(run, seq, **sc.fb_op(*_batches()[0], forward=True)))
    return out, seq + 1


def _assert_equal(got, want, what, exact_metrics=True):
    for k, (a, b) in enumerate(zip(got, want)):
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
