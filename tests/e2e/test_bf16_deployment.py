"""A deployment started with ``dp_worker --dtype bfloat16``: every rank says so in its start
log, training and sampling-free evaluation give the in-process bf16 runtime's results (to
bf16's tolerance: the deployment shards the experts), and an unknown dtype stops the
workers with an error naming it."""

from __future__ import annotations

import json

import numpy as np

import service_client as sc
from service_client import adam, batch, datum

# docs/runtime.md, "Precision": bf16 logprobs per token, loss relative.
BF16_LOGPROB_ATOL = 0.05
BF16_LOSS_RTOL = 0.01


def test_bfloat16_deployment_matches_the_in_process_bf16_runtime(make_deployment, harness):
    d = make_deployment("bf16", replicas=1, ranks=2, ep=2, dtype="bfloat16").start()
    with open(d.workers_log) as f:
        log = f.read()
    assert log.count("computing in bfloat16") == 2, log[-3000:]
    rng = np.random.default_rng(5)
    train = [sc.random_sequence(rng, n) for n in (9, 14, 5)]
    held = [sc.random_sequence(rng, n) for n in (8, 11)]

    def js(seqs):
        return [{"tokens": [int(t) for t in a], "loss_fn_inputs": {"target_tokens": [int(t) for t in b]}}
                for a, b in seqs]

    run = sc.create_run(d.stub, rank=8, seed=3)
    got = [d.run_op(run, 1, forward_backward=batch([datum(a, b) for a, b in train])),
           d.run_op(run, 2, optim_step=adam(learning_rate=1e-2)),
           d.run_op(run, 3, forward=batch([datum(a, b) for a, b in held]))]
    meta, want = harness({"lora": {"rank": 8, "seed": 3}, "dtype": "bfloat16",
                          "ops": [{"op": "forward_backward", "data": js(train)},
                                  {"op": "optim_step", "adam": {"learning_rate": 1e-2}},
                                  {"op": "forward", "data": js(held)}]})
    info = d.stub.GetInfo(sc.pb.GetInfoRequest(run_id=run), timeout=sc.RPC_TIMEOUT_S)
    assert info.dtype == "bfloat16", info
    for i in (0, 2):
        out = got[i].forward_backward
        for j, o in enumerate(out.loss_fn_outputs):
            diff = np.max(np.abs(sc.tensor_array(o.tensors["logprobs"]) - want[f"op{i}.datum{j}.logprobs"]))
            assert diff <= BF16_LOGPROB_ATOL, f"op {i} datum {j}: logprobs differ by {diff}"
        w = json.loads(meta[f"op{i}.metrics"])["loss:sum"]
        assert abs(out.metrics["loss:sum"] - w) <= BF16_LOSS_RTOL * abs(w), (out.metrics["loss:sum"], w)


def test_an_unknown_dtype_stops_the_workers_naming_it(make_deployment):
    d = make_deployment("bad_dtype", replicas=1, ranks=2, ep=2, dtype="float16").start(wait_serving=False)
    assert d.wait_workers(60) not in (None, 0)
    with open(d.workers_log) as f:
        log = f.read()
    assert "--dtype" in log and "'float16'" in log, log[-3000:]
