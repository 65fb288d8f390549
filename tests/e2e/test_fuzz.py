"""Randomly mutated requests against a live deployment: a few hundred valid requests of
every kind, each altered at the field level (numbers at their extremes, shapes, dtypes,
lengths, identifiers) or at the byte level (flipped, cut or inserted bytes), sent through
the raw wire. Whatever each one gets back — a refusal, a result, a failed operation — the
deployment must stay up, and a run nobody touched must take its next steps bitwise as a
control run does.
"""

from __future__ import annotations

import random
import time

import grpc
import numpy as np

import service_client as sc
from service_client import Health, Retrieve, adam, datum, pb, types

SEED = 20261130
MUTANTS = 300
LORA = dict(rank=4, seed=17)

INTS = [0, 1, -1, 2, 255, 256, 4095, 4096, 2**31 - 1, -2**31, 2**63 - 1, -2**63, 2**62, 2**58 + 1]
# Mild values keep many mutants valid, so they reach the replicas.
MILD_INTS = [0, 1, 2, 3, 5, 8, 64]
MILD_FLOATS = [0.0, 1e-3, 0.5, 1.0, 2.0, -1.0, 10.0]
FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 5e-324, 1e-38, 3e38, 3.5e38, 1e300, -1e308, float("inf"), float("-inf"),
          float("nan"), 1e39, 0.5]


def _valid_requests(run: str, rng: np.random.Generator) -> list[tuple[str, object]]:
    """(rpc, request) pairs that are valid for `run` (seq_ids left for the mutator)."""
    d = [datum(*sc.random_sequence(rng, n)) for n in (5, 9, 3)]
    rl = [datum(*sc.random_sequence(rng, 6), logprobs=np.full(6, -1.0, np.float32),
                advantages=np.linspace(-1, 1, 6).astype(np.float32))]
    prompt = types.ModelInput(chunks=[sc.token_chunk([1, 2, 3, 4])])
    submit = [
        pb.SubmitRequest(run_id=run, forward_backward=sc.batch(d)),
        pb.SubmitRequest(run_id=run, forward=sc.batch(d[:2])),
        pb.SubmitRequest(run_id=run, forward_backward=sc.batch(rl, "ppo", {"clip_low_threshold": 0.8})),
        pb.SubmitRequest(run_id=run, forward_backward=sc.batch(rl, "dro", {"beta": 0.05})),
        pb.SubmitRequest(run_id=run, forward_backward=sc.batch(rl, "cispo")),
        pb.SubmitRequest(run_id=run, optim_step=adam(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0)),
        pb.SubmitRequest(run_id=run, noop=pb.NoopOp()),
        pb.SubmitRequest(run_id=run, init=pb.InitOp(lora=types.LoraConfig(rank=4, alpha=8.0, seed=3))),
        pb.SubmitRequest(run_id=run, sample=pb.SampleOp(prompt=prompt, num_samples=2, params=pb.SamplingParams(
            max_tokens=4, temperature=0.7, top_k=5, top_p=0.9, seed=1))),
        pb.SubmitRequest(run_id=run, compute_logprobs=pb.ComputeLogprobsOp(prompt=prompt)),
        pb.SubmitRequest(run_id=run, save_state=pb.SaveStateOp(name="fuzz", ttl_seconds=60)),
        pb.SubmitRequest(run_id=run, save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="fuzz-s")),
    ]
    other = [
        ("Retrieve", pb.RetrieveRequest(op_id=f"{run}/1", wait_ms=10)),
        ("GetInfo", pb.GetInfoRequest(run_id=run)),
        ("CreateRun", pb.CreateRunRequest(lora=types.LoraConfig(rank=4, alpha=16.0))),
        ("ListCheckpoints", pb.ListCheckpointsRequest(run_id=run)),
        ("GetCheckpointFiles", pb.GetCheckpointFilesRequest(checkpoint_id=f"lathe://{run}/weights/fuzz",
                                                            page_size=2)),
        ("DeleteCheckpoint", pb.DeleteCheckpointRequest(checkpoint_id=f"lathe://{run}/weights/nope")),
    ]
    return [("Submit", r) for r in submit] + other


def _mutate_fields(msg, rnd: random.Random, depth: int = 0, mild: bool = False) -> None:
    """Changes one scalar, repeated or bytes field somewhere in `msg` (in place); `mild`
    keeps identifiers and lengths and picks plausible numbers."""
    fields = [f for f in msg.DESCRIPTOR.fields if not (mild and f.name in ("run_id", "seq_id"))]
    rnd.shuffle(fields)
    for f in fields:
        if f.message_type is not None and not f.is_repeated:
            if msg.HasField(f.name) and depth < 6 and rnd.random() < 0.7:
                _mutate_fields(getattr(msg, f.name), rnd, depth + 1, mild)
                return
            continue
        if f.message_type is not None:  # repeated messages and maps
            items = getattr(msg, f.name)
            if f.message_type.GetOptions().map_entry:
                if len(items) and rnd.random() < 0.8:
                    key = rnd.choice(list(items))
                    value = items[key]
                    if hasattr(value, "DESCRIPTOR"):
                        _mutate_fields(value, rnd, depth + 1, mild)
                    else:
                        items[key] = rnd.choice(MILD_FLOATS if mild else FLOATS)
                    return
                continue
            if len(items) and rnd.random() < 0.5:
                choice = rnd.random()
                if choice < 0.6:
                    _mutate_fields(items[rnd.randrange(len(items))], rnd, depth + 1, mild)
                elif choice < 0.8 and not mild:
                    del items[rnd.randrange(len(items))]
                else:
                    items.add().CopyFrom(items[0])
                return
            continue
        if mild and f.type in (f.TYPE_STRING, f.TYPE_BYTES):
            continue
        _set_scalar(msg, f, rnd, mild)
        return


def _set_scalar(msg, f, rnd: random.Random, mild: bool) -> None:
    t = f.type
    ints, floats = (MILD_INTS, MILD_FLOATS) if mild else (INTS, FLOATS)
    if f.is_repeated:
        items = getattr(msg, f.name)
        if t in (f.TYPE_INT64, f.TYPE_INT32, f.TYPE_UINT32, f.TYPE_UINT64, f.TYPE_SINT64):
            items.append(_fit(rnd.choice(ints), t))
        return
    try:
        if t in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
            setattr(msg, f.name, rnd.choice(floats))
        elif t == f.TYPE_BOOL:
            setattr(msg, f.name, not getattr(msg, f.name))
        elif t == f.TYPE_STRING:
            setattr(msg, f.name, rnd.choice(["", "..", "../../etc", "x" * 70000, "run-\u00e9\u0000", "a/b/c",
                                             getattr(msg, f.name) + "/.."]))
        elif t == f.TYPE_BYTES:
            data = bytearray(getattr(msg, f.name))
            choice = rnd.random()
            if choice < 0.4 and data:
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
            elif choice < 0.7:
                data = data[: rnd.randrange(len(data) + 1)]
            else:
                data += bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 3, 4, 8])))
            setattr(msg, f.name, bytes(data))
        elif t == f.TYPE_ENUM:
            setattr(msg, f.name, rnd.choice([0, 1, 2, 3, 5, 99]))
        else:
            setattr(msg, f.name, _fit(rnd.choice(ints), t))
    except (ValueError, TypeError):
        pass


def _fit(v: int, t) -> int:
    """v wrapped into the field's integer type, as a hostile encoder would send it."""
    from google.protobuf.descriptor import FieldDescriptor as F
    bits = {F.TYPE_INT32: 32, F.TYPE_UINT32: 32, F.TYPE_SINT32: 32}.get(t, 64)
    unsigned = t in (F.TYPE_UINT32, F.TYPE_UINT64)
    v &= (1 << bits) - 1
    if not unsigned and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


def _mutate_bytes(raw: bytes, rnd: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rnd.choice([1, 1, 2, 4])):
        choice = rnd.random()
        if choice < 0.5 and data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        elif choice < 0.7 and data:
            del data[rnd.randrange(len(data)):][: rnd.randrange(1, 9)]
        elif choice < 0.85:
            i = rnd.randrange(len(data) + 1)
            data[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 6)))
        else:
            data = data[: rnd.randrange(len(data) + 1)]
    return bytes(data)


def _raw_call(channel, rpc: str):
    stream = rpc == "DownloadCheckpointFile"
    factory = channel.unary_stream if stream else channel.unary_unary
    return factory(f"/lathe.v1.Lathe/{rpc}", request_serializer=lambda b: b, response_deserializer=lambda b: b)


def test_mutated_requests_leave_the_deployment_up_and_other_runs_untouched(make_deployment, tmp_path):
    root = str(tmp_path / "checkpoints")
    # Mutated seq_ids leave gaps: short gap timeouts let what waits behind them finish.
    dep = make_deployment("fuzz", max_runs=3, worker_args=["--checkpoint_root", root],
                          coordinator_args=["--checkpoint_root", root, "--gap_timeout_s", "3"]).start()
    stub = dep.stub
    rng = np.random.default_rng(SEED)
    data = [datum(*sc.random_sequence(rng, n)) for n in (11, 4, 8)]
    steps = [sc.fb_op(*data), {"optim_step": adam(learning_rate=1e-2)}] * 2
    control = sc.create_run(stub, **LORA)
    untouched = sc.create_run(stub, **LORA)
    victim = sc.create_run(stub, **LORA)
    want = [sc.result(stub, sc.submit(stub, control, i + 1, **op)) for i, op in enumerate(steps)]
    got = [sc.result(stub, sc.submit(stub, untouched, i + 1, **op)) for i, op in enumerate(steps[:2])]

    rnd = random.Random(SEED)
    valid = _valid_requests(victim, rng)
    outcomes: dict[str, int] = {}
    op_ids = []
    next_seq = 1
    for i in range(MUTANTS):
        rpc, base = valid[rnd.randrange(len(valid))]
        msg = type(base)()
        msg.CopyFrom(base)
        if rpc == "Submit":
            msg.seq_id = next_seq
        mild = rnd.random() < 0.5
        for _ in range(rnd.choice([1, 1, 2, 3])):
            _mutate_fields(msg, rnd, mild=mild)
        raw = msg.SerializeToString()
        if not mild and rnd.random() < 0.3:
            raw = _mutate_bytes(raw, rnd)
        try:
            answer = _raw_call(dep.channel, rpc)(raw, timeout=sc.RPC_TIMEOUT_S)
            outcomes["OK"] = outcomes.get("OK", 0) + 1
            if rpc == "Submit":
                op_ids.append(pb.SubmitResponse.FromString(answer).op_id)
                next_seq += 1
        except grpc.RpcError as e:
            outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1
            assert e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), \
                f"mutant {i} ({rpc}): {e.code()} {e.details()[:300]}\n{dep.log_tails()}"
        assert dep.coordinator.poll() is None, f"the coordinator exited after mutant {i}\n{dep.log_tails()}"
    # Every accepted operation finishes, one way or the other.
    deadline = time.monotonic() + 300
    finished: dict[str, int] = {}
    for op_id in op_ids:
        r = sc.wait(stub, op_id, timeout=max(1.0, deadline - time.monotonic()))
        name = Retrieve.State.Name(r.state)
        finished[name] = finished.get(name, 0) + 1
    health = stub.Health(pb.HealthRequest(), timeout=sc.RPC_TIMEOUT_S)
    assert health.state == Health.SERVING, f"{health}\n{dep.log_tails()}"
    got += [sc.result(stub, sc.submit(stub, untouched, i + 3, **op)) for i, op in enumerate(steps[2:])]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"the untouched run's op {i + 1} differs from the control run's"
    print(f"{MUTANTS} mutants: {dict(sorted(outcomes.items()))}; {len(op_ids)} operations accepted: "
          f"{dict(sorted(finished.items()))}")
