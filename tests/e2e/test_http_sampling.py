"""Sampling through the HTTP door (docs/http-api.md) with the real Tinker SDK (``tinker`` 0.38.0):
save_weights_and_get_sampling_client and create_sampling_client(model_path=...) sample the
same tokens and logprobs, bit for bit, as the same sample ops over gRPC on the same published
weights, and bad sampling parameters fail at once."""
from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 (requirements-dev.txt) is not installed")

KEY = "tml-lathe-http-sampling-key"
PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    """A deployment with API keys on and the HTTP door on a free port: (deployment, base_url)."""
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("http_sampling")), KEY) as door_and_url:
        yield door_and_url


def _bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


def _grpc_sample(d, run: str, seq: int, model_path: str, n: int, **params) -> pb.SampleResult:
    prompt = sc.types.ModelInput(chunks=[sc.token_chunk(PROMPT)])
    op = pb.SampleOp(prompt=prompt, num_samples=n, model_path=model_path, params=pb.SamplingParams(**params))
    return d.run_op(run, seq, sample=op).sample


def _same(http, grpc_result: pb.SampleResult):
    assert len(http.sequences) == len(grpc_result.sequences)
    for h, g in zip(http.sequences, grpc_result.sequences):
        tokens = list(struct.unpack(f"<{len(g.tokens) // 4}i", g.tokens))
        assert list(h.tokens) == tokens
        assert np.array_equal(_bits(h.logprobs), np.frombuffer(g.logprobs, "<f4").view(np.uint32))
        assert h.stop_reason == ("stop" if g.stop_reason == pb.STOP else "length")


def test_sdk_samples_like_grpc(door):
    d, url = door
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=base_model, rank=8, seed=3).result()
    run = training.model_id
    rng = np.random.default_rng(7)
    tokens, targets = sc.random_sequence(rng, 12)
    datum = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints([int(t) for t in tokens]),
        loss_fn_inputs={"target_tokens": tinker.types.TensorData.from_numpy(np.asarray(targets, np.int64))})
    training.forward_backward([datum], "cross_entropy").result()       # seq 1
    training.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()  # seq 2
    sampler = training.save_weights_and_get_sampling_client().result()  # seq 3, ephemeral
    prompt = tinker.types.ModelInput.from_ints(PROMPT)
    SP = tinker.types.SamplingParams
    greedy = sampler.sample(prompt, 2, SP(max_tokens=8, temperature=0.0)).result()
    seeded = sampler.sample(prompt, 3, SP(max_tokens=8, temperature=1.0, seed=11)).result()
    assert all(len(s.sequence_id) > 0 for s in seeded.sequences)
    assert len({s.sequence_id for s in seeded.sequences}) == 3
    first = greedy.sequences[0].tokens[0]
    stopped = sampler.sample(prompt, 1, SP(max_tokens=8, temperature=0.0, stop=[first])).result()
    assert list(stopped.sequences[0].tokens) == [first] and stopped.sequences[0].stop_reason == "stop"
    logprobs = sampler.compute_logprobs(prompt).result()
    topk = sampler.sample(prompt, 1, SP(max_tokens=1, temperature=0.0), include_prompt_logprobs=True,
                          topk_prompt_logprobs=3).result()
    path = training.save_weights_for_sampler("named").result().path    # seq 4
    assert path == f"tinker://{run}/sampler_weights/named"
    named = client.create_sampling_client(model_path=path).result()
    named_out = named.sample(prompt, 2, SP(max_tokens=6, temperature=1.0, seed=5, top_k=20, top_p=0.9)).result()

    # The same requests over gRPC, on the weights the SDK's sessions read.
    ephemeral = f"lathe://{run}/sampler_weights/ephemeral-3"
    _same(greedy, _grpc_sample(d, run, 5, ephemeral, 2, max_tokens=8, temperature=0.0))
    _same(seeded, _grpc_sample(d, run, 6, ephemeral, 3, max_tokens=8, temperature=1.0, seed=11))
    _same(named_out, _grpc_sample(d, run, 7, f"lathe://{run}/sampler_weights/named", 2, max_tokens=6,
                                  temperature=1.0, seed=5, top_k=20, top_p=0.9))
    prompt_op = pb.ComputeLogprobsOp(prompt=sc.types.ModelInput(chunks=[sc.token_chunk(PROMPT)]), model_path=ephemeral)
    expected = np.frombuffer(d.run_op(run, 8, compute_logprobs=prompt_op).compute_logprobs.logprobs, "<f4")
    assert logprobs[0] is None and np.isnan(expected[0])
    assert np.array_equal(_bits(logprobs[1:]), expected[1:].view(np.uint32))
    topk_op = pb.SampleOp(prompt=sc.types.ModelInput(chunks=[sc.token_chunk(PROMPT)]), num_samples=1,
                          model_path=ephemeral, include_prompt_logprobs=True, topk_prompt_logprobs=3,
                          params=pb.SamplingParams(max_tokens=1, temperature=0.0))
    want = d.run_op(run, 9, sample=topk_op).sample
    _same(topk, want)
    assert np.array_equal(_bits(topk.prompt_logprobs_np), np.frombuffer(want.prompt_logprobs, "<f4").view(np.uint32))
    got_topk = topk.topk_prompt_logprobs_np
    assert got_topk.token_ids.shape == (len(PROMPT), 3)
    assert np.array_equal(got_topk.token_ids.ravel(), np.frombuffer(want.topk_prompt_logprobs.token_ids, "<i4"))
    assert np.array_equal(_bits(got_topk.logprobs.ravel()),
                          np.frombuffer(want.topk_prompt_logprobs.logprobs, "<f4").view(np.uint32))
    assert topk.topk_prompt_logprobs[0] is None and len(topk.topk_prompt_logprobs[1]) == 3
    # The samples of one seeded request differ from each other.
    assert len({tuple(s.tokens) for s in seeded.sequences}) > 1
    client.close("success").result()


def test_rl_loop_interleaves_sampling_and_training(door):
    """Samples take none of the run's seq_ids: the training client keeps counting its own while its
    sampling clients sample, and an importance_sampling step on the sampled logprobs trains."""
    d, url = door
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=base_model, rank=4, seed=1).result()
    prompt = tinker.types.ModelInput.from_ints(PROMPT)
    losses = []
    for step in range(2):
        sampler = training.save_weights_and_get_sampling_client().result()
        params = [tinker.types.SamplingParams(max_tokens=5, temperature=1.0, seed=step * 10 + i) for i in range(3)]
        futures = [sampler.sample(prompt, 2, p) for p in params]  # in flight together
        data = []
        for f in futures:
            for seq in f.result().sequences:
                tokens = PROMPT + list(seq.tokens)
                n = len(tokens) - 1
                logprobs = np.zeros(n, np.float32)
                logprobs[len(PROMPT) - 1:] = seq.logprobs
                advantages = np.zeros(n, np.float32)
                advantages[len(PROMPT) - 1:] = 1.0
                data.append(tinker.types.Datum(
                    model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": tinker.types.TensorData.from_numpy(np.asarray(tokens[1:], np.int64)),
                        "logprobs": tinker.types.TensorData.from_numpy(logprobs),
                        "advantages": tinker.types.TensorData.from_numpy(advantages)}))
        fb = training.forward_backward(data, "importance_sampling").result()
        losses.append(fb.metrics["loss:sum"])
        training.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
    assert all(np.isfinite(losses))
    info = d.stub.GetInfo(pb.GetInfoRequest(run_id=training.model_id), metadata=d.metadata(), timeout=sc.RPC_TIMEOUT_S)
    assert info.step == 2
    client.close("success").result()
    d.stub.Submit(pb.SubmitRequest(run_id=training.model_id, seq_id=7, delete_run=pb.DeleteRunOp()),
                  metadata=d.metadata(), timeout=sc.RPC_TIMEOUT_S)


@pytest.mark.parametrize("params, word", [({"temperature": -1.0}, "temperature"), ({"max_tokens": 0}, "max_tokens")])
def test_bad_sampling_params_fail_at_once(door, params, word):
    d, url = door
    base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                        timeout=sc.RPC_TIMEOUT_S).base_models[0]
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=base_model, rank=4).result()
    path = training.save_weights_for_sampler("p").result().path
    sampler = client.create_sampling_client(model_path=path).result()
    started = time.monotonic()
    with pytest.raises(Exception, match=word):
        sampler.sample(tinker.types.ModelInput.from_ints(PROMPT), 1, tinker.types.SamplingParams(**params)).result()
    assert time.monotonic() - started < 20, "a permanent error was retried"
    client.close("success").result()
    d.stub.Submit(pb.SubmitRequest(run_id=training.model_id, seq_id=2, delete_run=pb.DeleteRunOp()),
                  metadata=d.metadata(), timeout=sc.RPC_TIMEOUT_S)


def _call(url: str, path: str, body: dict | None = None):
    """POST (with a body) or GET over plain HTTP with the key: (status, JSON reply)."""
    return sc.http_json(url, path, json.dumps(body).encode() if body is not None else None, {"X-API-Key": KEY})


def test_sampling_session_routes(door):
    d, url = door
    run = d.stub.CreateRun(pb.CreateRunRequest(lora=sc.types.LoraConfig(rank=4)), metadata=d.metadata(),
                           timeout=sc.RPC_TIMEOUT_S).run_id
    d.run_op(run, 1, save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="w"))
    create = {"session_id": "session-1", "sampling_session_seq_id": 0,
              "model_path": f"tinker://{run}/sampler_weights/w"}
    status, made = _call(url, "/api/v1/create_sampling_session", create)
    assert status == 200, made
    assert _call(url, "/api/v1/create_sampling_session", create) == (200, made)  # a retry: the same session
    sid = made["sampling_session_id"]
    status, info = _call(url, f"/api/v1/samplers/{sid}")
    assert status == 200 and info["sampler_id"] == sid and info["model_path"] == create["model_path"], info
    assert info["base_model"]
    sample = {"sampling_session_id": sid, "seq_id": 0, "num_samples": 2, "prompt": {"chunks": [{"tokens": PROMPT}]},
              "sampling_params": {"max_tokens": 2, "temperature": 0.0}}
    status, future = _call(url, "/api/v1/asample", sample)
    assert status == 200, future
    assert future["request_id"] == f"{run}/{sid}.1" and future["model_id"] == run
    assert future["sample_sequence_ids"] == [f"{run}/{sid}.1/0", f"{run}/{sid}.1/1"]
    assert _call(url, "/api/v1/asample", sample) == (200, future)  # a resubmit is the same op
    # Retrievable over gRPC like any op.
    r = d.stub.Retrieve(pb.RetrieveRequest(op_id=future["request_id"], wait_ms=20000), metadata=d.metadata(),
                        timeout=30)
    assert r.state == sc.Retrieve.DONE and len(r.result.sample.sequences) == 2, r
    cases = [
        ("/api/v1/asample", {**sample, "sampling_session_id": "sampler-0000000000000000"}, 404, "NOT_FOUND"),
        ("/api/v1/asample", {**sample, "sampling_params": {"stop": ["\n"]}}, 422, "INVALID_ARGUMENT"),
        ("/api/v1/asample", {**sample, "seq_id": 1, "num_samples": 0}, 422, "INVALID_ARGUMENT"),
        ("/api/v1/create_sampling_session", {"session_id": "session-1", "sampling_session_seq_id": 1,
                                             "base_model": "no/such-model"}, 422, "INVALID_ARGUMENT"),
        ("/api/v1/create_sampling_session", {**create, "model_path": f"lathe://{run}/weights/w"}, 422,
         "INVALID_ARGUMENT"),
    ]
    for path, body, status, code in cases:
        got, reply = _call(url, path, body)
        assert (got, reply["error"]["code"]) == (status, code), (path, body, reply)
    got, reply = _call(url, "/api/v1/samplers/sampler-0000000000000000")
    assert (got, reply["error"]["code"]) == (404, "NOT_FOUND")
    d.stub.Submit(pb.SubmitRequest(run_id=run, seq_id=2, delete_run=pb.DeleteRunOp()), metadata=d.metadata(),
                  timeout=sc.RPC_TIMEOUT_S)
