"""End-to-end tests of a lathe deployment on loopback: lathe_coordinator serving lathe.v1 and
``mpirun -np 4 dp_worker`` (2 replicas x a group of 2 ranks, --ep 2) on the tiny Qwen3-MoE.

Each test asserts what a client sees: results (against the in-process runtime, or against
a second run given the same operations), status codes, and how the deployment behaves when
a rank dies, when keys are required and when it is stopped (test_faults.py).
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

import service_client as sc
from service_client import Retrieve, adam, batch, datum, pb, types

Code = grpc.StatusCode
LORA = dict(rank=8, seed=3)
PARITY_RTOL = PARITY_ATOL = 1e-5


def _cross_entropy_data(rng, lengths=(3, 17, 9, 40, 1, 25)):
    """(wire datums, harness JSON datums) of cross_entropy inputs; every other one weighted."""
    wire, js = [], []
    for i, n in enumerate(lengths):
        tokens, targets = sc.random_sequence(rng, n)
        inputs = {}
        if i % 2 == 1:
            inputs["weights"] = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=n)
        wire.append(datum(tokens, targets, **inputs))
        js.append(_json_datum(tokens, targets, inputs))
    return wire, js


def _importance_sampling_data(rng, lengths=(12, 5, 30, 2, 21, 8), ratio_mask=False):
    wire, js = [], []
    for n in lengths:
        tokens, targets = sc.random_sequence(rng, n)
        inputs = {"logprobs": rng.uniform(-6.0, -0.05, size=n).astype(np.float32),
                  "advantages": rng.normal(size=n).astype(np.float32)}
        if ratio_mask:  # gspo
            inputs["sequence_ratio_mask"] = (rng.uniform(size=n) < 0.7).astype(np.float32)
        wire.append(datum(tokens, targets, **inputs))
        js.append(_json_datum(tokens, targets, inputs))
    return wire, js


def _json_datum(tokens, targets, inputs):
    return {"tokens": [int(t) for t in tokens],
            "loss_fn_inputs": {"target_tokens": [int(t) for t in targets],
                               **{k: [float(x) for x in v] for k, v in inputs.items()}}}


def _assert_same(got: pb.OpResult, want: pb.OpResult, what: str) -> None:
    """Bitwise equality of two results, naming the first differences."""
    if got == want:
        return
    diffs = []
    if got.HasField("forward_backward") and want.HasField("forward_backward"):
        for d, (a, b) in enumerate(zip(sc.logprobs(got.forward_backward), sc.logprobs(want.forward_backward))):
            if a.shape != b.shape or not np.array_equal(a, b):
                delta = np.max(np.abs(a - b)) if a.shape == b.shape else f"shape {a.shape} vs {b.shape}"
                diffs.append(f"datum {d} logprobs differ ({delta})")
        metrics = (got.forward_backward.metrics, want.forward_backward.metrics)
    else:
        metrics = (got.optim_step.metrics, want.optim_step.metrics)
    diffs += [f"{k}: {metrics[0].get(k)} vs {v}" for k, v in metrics[1].items() if metrics[0].get(k) != v]
    raise AssertionError(f"{what}: {'; '.join(diffs) or 'results differ'}\ngot:  {got}\nwant: {want}"[:4000])


def _close(got, want, what):
    np.testing.assert_allclose(got, want, rtol=PARITY_RTOL, atol=PARITY_ATOL, err_msg=what)


# --------------------------------------------------------------------------------------
# 1. results equal the in-process runtime's
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_rank,lr", [(LORA["rank"], 1e-2), (0, 1e-3)], ids=["lora", "full"])
def test_operations_match_in_process_runtime(deployment, harness, lora_rank, lr):
    rng = np.random.default_rng(11)
    ce_wire, ce_json = _cross_entropy_data(rng)
    is_wire, is_json = _importance_sampling_data(rng)
    eval_wire, eval_json = _cross_entropy_data(rng, lengths=(7, 33, 4))
    gspo_wire, gspo_json = _importance_sampling_data(rng, lengths=(9, 17, 3), ratio_mask=True)
    gspo_cfg = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    ops = [
        ("forward_backward", batch(ce_wire), {"op": "forward_backward", "loss_fn": "cross_entropy", "data": ce_json}),
        ("optim_step", adam(learning_rate=lr), {"op": "optim_step", "adam": {"learning_rate": lr}}),
        ("forward_backward", batch(is_wire, "importance_sampling"),
         {"op": "forward_backward", "loss_fn": "importance_sampling", "data": is_json}),
        ("forward_backward", batch(gspo_wire, "gspo", gspo_cfg),
         {"op": "forward_backward", "loss_fn": "gspo", "loss_fn_config": gspo_cfg, "data": gspo_json}),
        ("optim_step", adam(learning_rate=lr), {"op": "optim_step", "adam": {"learning_rate": lr}}),
        ("forward", batch(eval_wire), {"op": "forward", "loss_fn": "cross_entropy", "data": eval_json}),
    ]
    stub = deployment.stub
    run = sc.create_run(stub, **dict(LORA, rank=lora_rank))
    op_ids = [sc.submit(stub, run, i + 1, **{kind: wire}) for i, (kind, wire, _) in enumerate(ops)]
    got = [sc.result(stub, op_id) for op_id in op_ids]
    meta, want = harness({"lora": {"rank": lora_rank, "seed": LORA["seed"]}, "ops": [j for _, _, j in ops]})

    for i, (kind, wire, _) in enumerate(ops):
        if kind == "optim_step":
            g = got[i].optim_step.metrics["grad_norm:mean"]
            w = json.loads(meta[f"op{i}.metrics"])["grad_norm:mean"]
            assert g > 0, f"op {i}: grad_norm {g}"
            _close(g, w, f"op {i} grad_norm:mean")
            continue
        out = got[i].forward_backward
        assert len(out.loss_fn_outputs) == len(wire.data), f"op {i}: {len(out.loss_fn_outputs)} outputs"
        for d, o in enumerate(out.loss_fn_outputs):
            for name in ("logprobs", "elementwise_loss"):
                _close(sc.tensor_array(o.tensors[name]), want[f"op{i}.datum{d}.{name}"], f"op {i} datum {d} {name}")
        _close(out.metrics["loss:sum"], json.loads(meta[f"op{i}.metrics"])["loss:sum"], f"op {i} loss:sum")

    info = stub.GetInfo(pb.GetInfoRequest(run_id=run), timeout=sc.RPC_TIMEOUT_S)
    assert info.step == 2 and info.lora.rank == lora_rank and info.dtype == "float32"


# --------------------------------------------------------------------------------------
# 2. seq_id order, retries and conflicts
# --------------------------------------------------------------------------------------

def _ordering_ops(rng):
    """fb chunk a, b, c, optim_step, forward on held-out data, by seq_id 1..5."""
    chunks = [batch([datum(*sc.random_sequence(rng, n)) for n in lengths])
              for lengths in ((6, 14), (9, 3, 20))]
    chunks.append(batch([datum(*sc.random_sequence(rng, 11), weights=rng.uniform(0, 1, 11).astype(np.float32))]))
    held_out = batch([datum(*sc.random_sequence(rng, n)) for n in (10, 4)])
    return {1: {"forward_backward": chunks[0]}, 2: {"forward_backward": chunks[1]},
            3: {"forward_backward": chunks[2]}, 4: {"optim_step": adam(learning_rate=5e-2)},
            5: {"forward": held_out}}


def test_out_of_order_submits_execute_in_seq_order(deployment):
    stub = deployment.stub
    ops = _ordering_ops(np.random.default_rng(5))

    # Reference: a fresh run of the same seed, everything in order, with a forward before training.
    ref = sc.create_run(stub, **LORA)
    before = sc.result(stub, sc.submit(stub, ref, 1, **ops[5])).forward_backward
    want = {seq: sc.result(stub, sc.submit(stub, ref, seq + 1, **op)) for seq, op in ops.items()}

    run = sc.create_run(stub, **LORA)
    id3 = sc.submit(stub, run, 3, **ops[3])
    id2 = sc.submit(stub, run, 2, **ops[2])
    pending = stub.Retrieve(pb.RetrieveRequest(op_id=id2, wait_ms=500), timeout=sc.RPC_TIMEOUT_S)
    assert pending.state == Retrieve.PENDING, "seq 2 ran before seq 1 was submitted"
    retry = pb.SubmitRequest(run_id=run, seq_id=3, **ops[3])
    raw = sc.reordered_bytes(retry)
    assert raw != retry.SerializeToString() and pb.SubmitRequest.FromString(raw) == retry
    assert sc.submit_bytes(deployment.channel, raw) == id3, "a retry (same op, other encoding) got another op id"
    assert sc.submit(stub, run, 3, **ops[3]) == id3, "a retried submit got another op id"
    id5 = sc.submit(stub, run, 5, **ops[5])
    id4 = sc.submit(stub, run, 4, **ops[4])
    id1 = sc.submit(stub, run, 1, **ops[1])
    got = {seq: sc.result(stub, op_id) for seq, op_id in zip((1, 2, 3, 4, 5), (id1, id2, id3, id4, id5))}

    for seq in (1, 2, 3, 4, 5):
        _assert_same(got[seq], want[seq], f"seq {seq} against the in-order run")
    after = sc.logprobs(got[5].forward_backward)
    assert any(not np.array_equal(a, b) for a, b in zip(after, sc.logprobs(before))), \
        "the forward after optim_step does not reflect the step"

    # Retries after completion return the original op and run nothing again.
    assert sc.submit(stub, run, 4, **ops[4]) == id4
    assert sc.submit(stub, run, 1, **ops[1]) == id1
    sc.result(stub, sc.submit(stub, run, 6, noop=pb.NoopOp()))  # every earlier op has run by now
    assert stub.GetInfo(pb.GetInfoRequest(run_id=run), timeout=sc.RPC_TIMEOUT_S).step == 1
    # The same seq_id with another payload is a conflict.
    for seq, other in ((1, ops[2]), (4, {"optim_step": adam(learning_rate=1e-3)}), (5, ops[1])):
        with pytest.raises(grpc.RpcError) as e:
            sc.submit(stub, run, seq, **other)
        assert e.value.code() == Code.ALREADY_EXISTS, f"seq {seq}: {e.value.code()} {e.value.details()}"
    assert stub.GetInfo(pb.GetInfoRequest(run_id=run), timeout=sc.RPC_TIMEOUT_S).step == 1


# --------------------------------------------------------------------------------------
# 3. malformed requests are refused at Submit and change nothing
# --------------------------------------------------------------------------------------

_fb = sc.fb_op
_good = sc.good_datum


def _with_input(key, t, n=5):
    d = _good(n)
    d.loss_fn_inputs[key].CopyFrom(t)
    return d


def _rl_inputs(n=5, **override):
    inputs = {"logprobs": np.full(n, -1.0, np.float32), "advantages": np.ones(n, np.float32)}
    inputs.update(override)
    return {k: v for k, v in inputs.items() if v is not None}


def _malformed_table():
    """(name, seq_id override or None, op fields) of requests that must get INVALID_ARGUMENT."""
    raw_tokens = types.Datum()
    raw_tokens.model_input.chunks.append(
        types.ModelInputChunk(encoded_text=types.EncodedTextChunk(tokens=b"\x01\x00\x00")))
    raw_tokens.loss_fn_inputs["target_tokens"].CopyFrom(sc.tensor(np.zeros(0, "<i8"), shape=[0]))
    no_targets = types.Datum()
    no_targets.model_input.chunks.append(sc.token_chunk([1, 2, 3]))
    empty_input = types.Datum()
    empty_input.loss_fn_inputs["target_tokens"].CopyFrom(sc.tensor(np.zeros(0, "<i8"), shape=[0]))
    long_tokens, long_targets = sc.random_sequence(np.random.default_rng(0), sc.MAX_SEQ_LEN + 1)
    i64 = lambda v: sc.tensor(np.asarray(v, "<i8"))  # noqa: E731
    rl = _good(**_rl_inputs())
    f64 = lambda v: sc.tensor(np.asarray(v, "<f8"))  # noqa: E731
    short_bytes = sc.tensor(np.ones(5, "<i8"), data=np.ones(4, "<i8").tobytes())
    nan_advantages = _good(**_rl_inputs(advantages=np.array([0, np.nan, 0, 0, 0], np.float32)))
    return [
        ("no operation", None, {}),
        ("seq_id 0", 0, _fb(_good())),
        ("seq_id -1", -1, _fb(_good())),
        ("empty batch", None, _fb()),
        ("unknown loss_fn", None, _fb(_good(), loss_fn="nll")),
        ("empty loss_fn", None, _fb(_good(), loss_fn="")),
        ("loss_fn_config unknown key", None, _fb(_good(), config={"beta": 1.0})),
        ("loss_fn_config NaN", None, _fb(rl, loss_fn="ppo", config={"clip_low_threshold": float("nan")})),
        ("loss_fn_config inf", None, _fb(rl, loss_fn="cispo", config={"clip_high_threshold": float("inf")})),
        ("token id = vocab", None, _fb(datum([1, sc.VOCAB, 2], [1, 2, 3]))),
        ("negative token id", None, _fb(datum([1, -1, 2], [1, 2, 3]))),
        ("target id = vocab", None, _fb(datum([1, 2, 3], [1, sc.VOCAB, 3]))),
        ("negative target id", None, _fb(datum([1, 2, 3], [1, -2, 3]))),
        ("target_tokens float32", None, _fb(_with_input("target_tokens", sc.tensor(np.ones(5, "<f4"))))),
        ("target_tokens dtype unset", None, _fb(_with_input("target_tokens", sc.tensor(np.ones(5, "<i8"), dtype=0)))),
        ("target_tokens too long", None, _fb(_with_input("target_tokens", i64(np.ones(6))))),
        ("target_tokens 3-d", None, _fb(_with_input("target_tokens", i64(np.ones((5, 1, 1)))))),
        ("target_tokens bytes short", None, _fb(_with_input("target_tokens", short_bytes))),
        ("missing target_tokens", None, _fb(no_targets)),
        ("unknown loss_fn_inputs key", None, _fb(_good(foo=np.ones(5, np.float32)))),
        ("NaN weights", None, _fb(_good(weights=np.array([1, 1, np.nan, 1, 1], np.float32)))),
        ("weights wrong length", None, _fb(_good(weights=np.ones(4, np.float32)))),
        ("weights int64", None, _fb(_with_input("weights", i64(np.ones(5))))),
        ("sequence longer than max_seq_len", None, _fb(datum(long_tokens, long_targets))),
        ("chunk bytes not a multiple of 4", None, _fb(raw_tokens)),
        ("empty model_input", None, _fb(empty_input)),
        ("second datum malformed", None, _fb(_good(), datum([1, 2, 3], [1, 2, 999]))),
        ("forward with unknown loss_fn", None, _fb(_good(), loss_fn="nll", forward=True)),
        ("forward with NaN advantages", None, _fb(nan_advantages, loss_fn="importance_sampling", forward=True)),
        ("importance_sampling without advantages", None,
         _fb(_good(**_rl_inputs(advantages=None)), loss_fn="importance_sampling")),
        ("importance_sampling without logprobs", None,
         _fb(_good(**_rl_inputs(logprobs=None)), loss_fn="importance_sampling")),
        ("adam learning_rate negative", None, {"optim_step": adam(learning_rate=-1e-3)}),
        ("adam learning_rate NaN", None, {"optim_step": adam(learning_rate=float("nan"))}),
        ("adam beta1 = 1", None, {"optim_step": adam(beta1=1.0)}),
        ("adam beta2 negative", None, {"optim_step": adam(beta2=-0.1)}),
        ("adam eps 0", None, {"optim_step": adam(eps=0.0)}),
        ("adam weight_decay negative", None, {"optim_step": adam(weight_decay=-0.1)}),
        ("adam grad_clip_norm NaN", None, {"optim_step": adam(grad_clip_norm=float("nan"))}),
        ("init negative LoRA rank", None, {"init": pb.InitOp(lora=types.LoraConfig(rank=-1))}),
        ("init LoRA alpha 0", None, {"init": pb.InitOp(lora=types.LoraConfig(rank=8, alpha=0.0))}),
        ("init LoRA trains nothing", None, {"init": pb.InitOp(lora=types.LoraConfig(
            rank=8, train_attn=False, train_mlp=False, train_unembed=False))}),
        # Values a double holds but the float32 computation cannot, and shapes whose
        # element count overflows int64.
        ("float64 weights 1e300", None, _fb(_good(weights=f64([1, 1e300, 1, 1, 1])))),
        ("float64 logprobs -1e300", None,
         _fb(_good(**_rl_inputs(logprobs=f64([-1, -1e300, -1, -1, -1]))), loss_fn="importance_sampling")),
        ("float64 advantages 1e300", None,
         _fb(_good(**_rl_inputs(advantages=f64([1, 1, 1e300, 1, 1]))), loss_fn="ppo")),
        ("dro beta -1e308", None, _fb(rl, loss_fn="dro", config={"beta": -1e308})),
        ("ppo clip_high_threshold 1e39", None, _fb(rl, loss_fn="ppo", config={"clip_high_threshold": 1e39})),
        ("target_tokens [5, 2^58+1] with 5 values", None,
         _fb(_with_input("target_tokens", sc.tensor(np.ones(5, "<i8"), shape=[5, 2**58 + 1])))),
        ("target_tokens [5, 2^62] with 5 values", None,
         _fb(_with_input("target_tokens", sc.tensor(np.ones(5, "<i8"), shape=[5, 2**62])))),
        ("target id INT64_MAX", None, _fb(datum([1, 2, 3], np.array([1, 2**63 - 1, 3], "<i8")))),
        ("adam learning_rate 1e308", None, {"optim_step": adam(learning_rate=1e308)}),
        ("adam weight_decay 1e308", None, {"optim_step": adam(weight_decay=1e308)}),
        ("adam eps 5e-324", None, {"optim_step": adam(eps=5e-324)}),
        ("adam learning_rate x weight_decay > 1", None, {"optim_step": adam(learning_rate=0.5, weight_decay=4.0)}),
        ("init LoRA alpha 1e308", None, {"init": pb.InitOp(lora=types.LoraConfig(rank=8, alpha=1e308))}),
        ("init LoRA rank INT32_MAX", None, {"init": pb.InitOp(lora=types.LoraConfig(rank=2**31 - 1))}),
        ("init LoRA rank above the hidden size", None, {"init": pb.InitOp(lora=types.LoraConfig(rank=65))}),
        ("sample temperature 1e-45", None, {"sample": pb.SampleOp(
            prompt=types.ModelInput(chunks=[sc.token_chunk([1, 2, 3])]), num_samples=1,
            params=pb.SamplingParams(max_tokens=4, temperature=1e-45))}),
    ]


def _send_malformed(stub, run, seq):
    """Sends the table with `seq` (the run's next seq_id) where no override; returns mismatches."""
    wrong = []
    for name, seq_override, op in _malformed_table():
        req = pb.SubmitRequest(run_id=run, seq_id=seq if seq_override is None else seq_override, **op)
        code = sc.rpc_error(stub.Submit, req)
        if code != Code.INVALID_ARGUMENT:
            wrong.append(f"{name}: {code}")
    code = sc.rpc_error(stub.Submit, pb.SubmitRequest(run_id="", seq_id=seq, **_fb(_good())))
    if code != Code.INVALID_ARGUMENT:
        wrong.append(f"empty run_id: {code}")
    return wrong


def test_malformed_requests_are_refused_and_change_nothing(deployment):
    stub = deployment.stub
    assert len(_malformed_table()) >= 20
    rng = np.random.default_rng(21)
    ops = {1: _fb(*[datum(*sc.random_sequence(rng, n)) for n in (8, 15, 3)]),
           2: {"optim_step": adam(learning_rate=1e-2)},
           3: _fb(*[datum(*sc.random_sequence(rng, n), **_rl_inputs(n)) for n in (6, 13)],
                  loss_fn="importance_sampling"),
           4: {"optim_step": adam(learning_rate=1e-2, grad_clip_norm=0.5)},
           5: _fb(*[datum(*sc.random_sequence(rng, n)) for n in (9, 4)], forward=True)}

    clean = sc.create_run(stub, **LORA)
    want = {seq: sc.result(stub, sc.submit(stub, clean, seq, **op)) for seq, op in ops.items()}

    run = sc.create_run(stub, **LORA)
    wrong, got = [], {}
    for seq, op in ops.items():
        wrong += [f"before seq {seq}: {w}" for w in _send_malformed(stub, run, seq)]
        got[seq] = sc.result(stub, sc.submit(stub, run, seq, **op))
    assert not wrong, "not INVALID_ARGUMENT:\n" + "\n".join(wrong)
    for seq in ops:
        _assert_same(got[seq], want[seq], f"seq {seq} against the run that saw no malformed requests")
    assert stub.GetInfo(pb.GetInfoRequest(run_id=run), timeout=sc.RPC_TIMEOUT_S).step == 2


def test_other_refusals(deployment):
    stub = deployment.stub
    run = sc.create_run(stub, **LORA)
    checks = {
        "unknown run_id": (stub.Submit, pb.SubmitRequest(run_id="run-nope", seq_id=1, **_fb(_good())), Code.NOT_FOUND),
        "GetInfo unknown run": (stub.GetInfo, pb.GetInfoRequest(run_id="run-nope"), Code.NOT_FOUND),
        "compute_logprobs of an unpublished version": (stub.Submit, pb.SubmitRequest(
            run_id=run, seq_id=1, compute_logprobs=pb.ComputeLogprobsOp(policy_version=1)), Code.INVALID_ARGUMENT),
        "sample topk_prompt_logprobs -1": (stub.Submit, pb.SubmitRequest(run_id=run, seq_id=1, sample=pb.SampleOp(
            num_samples=1, topk_prompt_logprobs=-1)), Code.INVALID_ARGUMENT),
        "Retrieve unknown op": (stub.Retrieve, pb.RetrieveRequest(op_id=f"{run}/99"), Code.NOT_FOUND),
        "Retrieve garbage op": (stub.Retrieve, pb.RetrieveRequest(op_id="nonsense"), Code.NOT_FOUND),
        # The window is --max_queued (1024) past the run's next expected seq_id (1).
        "seq_id INT64_MAX": (stub.Submit, pb.SubmitRequest(run_id=run, seq_id=2**63 - 1, noop=pb.NoopOp()),
                             Code.FAILED_PRECONDITION),
        "seq_id past the window": (stub.Submit, pb.SubmitRequest(run_id=run, seq_id=1 + 1024, noop=pb.NoopOp()),
                                   Code.FAILED_PRECONDITION),
        "Retrieve negative wait_ms": (stub.Retrieve, pb.RetrieveRequest(op_id=f"{run}/0", wait_ms=-1),
                                      Code.INVALID_ARGUMENT),
        "CreateRun other base model": (stub.CreateRun, pb.CreateRunRequest(base_model="other"), Code.INVALID_ARGUMENT),
        "CreateRun negative rank": (stub.CreateRun, pb.CreateRunRequest(lora=types.LoraConfig(rank=-2)),
                                    Code.INVALID_ARGUMENT),
        "CreateRun rank INT32_MAX": (stub.CreateRun, pb.CreateRunRequest(lora=types.LoraConfig(rank=2**31 - 1)),
                                     Code.INVALID_ARGUMENT),
        "CreateRun alpha 1e308": (stub.CreateRun, pb.CreateRunRequest(lora=types.LoraConfig(rank=8, alpha=1e308)),
                                  Code.INVALID_ARGUMENT),
    }
    got = {name: sc.rpc_error(call, req) for name, (call, req, _) in checks.items()}
    wrong = [f"{name}: {got[name]} (want {want})" for name, (_, _, want) in checks.items() if got[name] != want]
    assert not wrong, "\n".join(wrong)
    # Nothing was queued: seq 1 is still free.
    assert sc.wait(stub, sc.submit(stub, run, 1, noop=pb.NoopOp())).state == Retrieve.DONE


def test_oversized_identifiers_and_unparseable_requests_are_invalid_argument(deployment):
    stub = deployment.stub
    run = sc.create_run(stub, **LORA)
    huge = "r" * (1 << 20)
    calls = {
        "Submit run_id": (stub.Submit, pb.SubmitRequest(run_id=huge, seq_id=1, noop=pb.NoopOp())),
        "Submit load_state path": (stub.Submit, pb.SubmitRequest(run_id=run, seq_id=1, load_state=pb.LoadStateOp(
            path="lathe://" + huge))),
        "GetInfo run_id": (stub.GetInfo, pb.GetInfoRequest(run_id=huge)),
        "Retrieve op_id": (stub.Retrieve, pb.RetrieveRequest(op_id=huge)),
        "CreateRun base_model": (stub.CreateRun, pb.CreateRunRequest(base_model=huge)),
    }
    wrong = []
    for name, (call, req) in calls.items():
        try:
            call(req, timeout=sc.RPC_TIMEOUT_S)
            wrong.append(f"{name}: accepted")
        except grpc.RpcError as e:
            # A message echoing the whole input would exceed gRPC's metadata limit and
            # reach the client as RESOURCE_EXHAUSTED instead of the error.
            if e.code() != Code.INVALID_ARGUMENT or len(e.details()) > 2048:
                wrong.append(f"{name}: {e.code()} {e.details()[:200]!r} ({len(e.details())} bytes)")
    assert not wrong, "\n".join(wrong)

    # Bytes that are no SubmitRequest (a field tag whose varint never ends).
    for method in ("/lathe.v1.Lathe/Submit", "/lathe.v1.Lathe/GetInfo"):
        raw = deployment.channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff", timeout=sc.RPC_TIMEOUT_S)
        assert e.value.code() == Code.INVALID_ARGUMENT and method in e.value.details(), (method, e.value)
    raw = deployment.channel.unary_stream("/lathe.v1.Lathe/DownloadCheckpointFile")
    with pytest.raises(grpc.RpcError) as e:
        list(raw(b"\xff\xff\xff\xff", timeout=sc.RPC_TIMEOUT_S))
    assert e.value.code() == Code.INVALID_ARGUMENT, e.value
    # Nothing was queued: seq 1 is still free.
    assert sc.wait(stub, sc.submit(stub, run, 1, noop=pb.NoopOp())).state == Retrieve.DONE
