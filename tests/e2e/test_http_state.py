"""Checkpoints and state through the HTTP door (docs/http-api.md) with the real Tinker SDK
(``tinker`` 0.38.0): a training client made from a saved state (with or without its optimizer)
continues exactly as the original client does, load_state into a client restores it, and the
RestClient's management calls list, describe and delete what was saved."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 (requirements-dev.txt) is not installed")

KEY = "tml-lathe-http-state-key"
LR = 1e-2


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    """A deployment with API keys on and the HTTP door on a free port: (deployment, base_url)."""
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("http_state")), KEY,
                      max_runs=12) as door_and_url:
        yield door_and_url


def _base_model(d) -> str:
    return d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                  timeout=sc.RPC_TIMEOUT_S).base_models[0]


def _data(seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for n in (9, 5, 12):
        tokens, targets = sc.random_sequence(rng, n)
        out.append(tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints([int(t) for t in tokens]),
            loss_fn_inputs={"target_tokens": tinker.types.TensorData.from_numpy(np.asarray(targets, np.int64))}))
    return out


def _numbers(fb):
    """(loss:sum, the logprobs of every datum) as bits, for bitwise comparison."""
    return (np.float64(fb.metrics["loss:sum"]).view(np.uint64).item(),
            [np.asarray(o["logprobs"].to_numpy(), np.float32).view(np.uint32).tolist() for o in fb.loss_fn_outputs])


def _step(client, data):
    """forward_backward, optim_step, then forward on the stepped weights: their numbers."""
    fb = client.forward_backward(data, "cross_entropy").result()
    client.optim_step(tinker.types.AdamParams(learning_rate=LR)).result()
    return _numbers(fb), _numbers(client.forward(data, "cross_entropy").result())


def test_training_client_from_state_continues_bitwise(door):
    d, url = door
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    session = client.holder.get_session_id()
    original = client.create_lora_training_client(base_model=_base_model(d), rank=8, seed=3).result()
    assert original.model_id == f"{session}:train:0"  # the SDK's own scheme, for every client
    original.forward_backward(_data(1), "cross_entropy").result()
    original.optim_step(tinker.types.AdamParams(learning_rate=LR)).result()
    path = original.save_state("mid").result().path
    assert path == f"tinker://{session}:train:0/weights/mid"

    # A new client from the saved state, with its optimizer: its seq_ids count from 1 again.
    resumed = client.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id == f"{session}:train:1"
    assert resumed.get_info().lora_rank == 8  # the checkpoint's LoRA config
    data = _data(2)
    resumed_fb, resumed_after = _step(resumed, data)
    # The same, weights only: a fresh optimizer.
    fresh = client.create_training_client_from_state(path).result()
    assert fresh.model_id == f"{session}:train:2"
    fresh_fb, fresh_after = _step(fresh, data)
    # The original client continues from the same point itself.
    original_fb, original_after = _step(original, data)

    assert resumed_fb == original_fb and resumed_after == original_after  # bit for bit
    assert fresh_fb == original_fb  # the same weights before the step
    # Adam's first step (fresh moments, bias-corrected) moves the weights otherwise than its
    # second: the optimizer was restarted.
    assert fresh_after != original_after

    # load_state into an existing client: back to the saved point, then the same step again.
    assert original.load_state_with_optimizer(path).result().path == path
    assert _step(original, data) == (original_fb, original_after)
    original.load_state(path).result()
    assert _step(original, data) == (fresh_fb, fresh_after)
    client.close("success").result()


def test_load_weights_retries_and_refusals(door):
    d, url = door
    key = {"X-API-Key": KEY}
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    training = client.create_lora_training_client(base_model=_base_model(d), rank=4).result()
    path = training.save_state("r").result().path
    session = "session-retry"
    body = json.dumps({"session_id": session, "model_seq_id": 0, "path": path, "optimizer": True,
                       "type": "load_weights"}).encode()
    first = sc.http_json(url, "/api/v1/load_weights", body, key)
    assert first == (200, {"request_id": f"{session}:train:0/0", "model_id": f"{session}:train:0"}), first
    assert sc.http_json(url, "/api/v1/load_weights", body, key) == first  # a retry: the same run
    # Another request for a run id that exists is refused, and so is a run id of another form.
    other = json.dumps({"session_id": session, "model_seq_id": 0, "path": path, "optimizer": False}).encode()
    status, reply = sc.http_json(url, "/api/v1/load_weights", other, key)
    assert (status, reply["error"]["code"]) == (422, "ALREADY_EXISTS"), reply
    # create_model names its runs the same way, so its retries answer the same run too.
    create = json.dumps({"session_id": session, "model_seq_id": 1, "base_model": _base_model(d),
                         "lora_config": {"rank": 4}}).encode()
    made = sc.http_json(url, "/api/v1/create_model", create, key)
    assert made == (200, {"request_id": f"{session}:train:1/0", "model_id": f"{session}:train:1"}), made
    assert sc.http_json(url, "/api/v1/create_model", create, key) == made
    runs_before = len(client.create_rest_client().list_training_runs(limit=100).result().training_runs)
    cases = [
        {"session_id": session, "model_seq_id": 5, "path": "tinker://nope/weights/x", "optimizer": True},
        {"session_id": session, "model_seq_id": 5, "path": "lathe://a/weights/x", "optimizer": True},
        {"session_id": session, "model_seq_id": 5, "path": path.replace("/weights/", "/sampler_weights/"),
         "optimizer": False},
        {"session_id": "bad/id", "model_seq_id": 5, "path": path, "optimizer": False},
        {"session_id": session, "model_seq_id": "5", "path": path, "optimizer": False},
        {"path": path, "optimizer": False},
        {"model_id": training.model_id, "seq_id": 2, "path": "tinker://x/weights/../y", "optimizer": False},
    ]
    for case in cases:
        status, reply = sc.http_json(url, "/api/v1/load_weights", json.dumps(case).encode(), key)
        assert status == 422 and reply["error"]["message"], (case, status, reply)
    # Nothing was created by the refusals; the client's seq_id 2 (refused for its path) holds a
    # noop, so the load at seq_id 3 runs at once.
    rest = client.create_rest_client()
    assert len(rest.list_training_runs(limit=100).result().training_runs) == runs_before
    noop = d.stub.Retrieve(pb.RetrieveRequest(op_id=f"{training.model_id}/2"), metadata=d.metadata(),
                           timeout=sc.RPC_TIMEOUT_S)
    assert noop.state == sc.Retrieve.DONE and noop.result.WhichOneof("result") == "noop", noop
    load = json.dumps({"model_id": training.model_id, "seq_id": 3, "path": path, "optimizer": False}).encode()
    status, reply = sc.http_json(url, "/api/v1/load_weights", load, key)
    assert status == 200 and reply["request_id"] == f"{training.model_id}/3", reply
    loaded = sc.result(d.stub, reply["request_id"], 60, d.metadata())
    assert loaded.WhichOneof("result") == "load_state", loaded
    client.close("success").result()


def test_rest_client_lists_describes_and_deletes(door):
    d, url = door
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    session = client.holder.get_session_id()
    training = client.create_lora_training_client(base_model=_base_model(d), rank=4).result()
    run = training.model_id
    state = training.save_state("kept").result().path
    sampler = training.save_weights_for_sampler("gone").result().path
    rest = client.create_rest_client()

    got = rest.get_training_run(run).result()
    assert (got.training_run_id, got.base_model, got.is_lora, got.lora_rank) == (run, _base_model(d), True, 4)
    assert got.last_checkpoint.tinker_path == state and got.last_sampler_checkpoint.tinker_path == sampler
    assert got.last_request_time.timestamp() >= got.last_checkpoint.time.timestamp() - 1
    listed = rest.list_training_runs(limit=100).result()
    assert run in {r.training_run_id for r in listed.training_runs}
    assert listed.cursor.total_count == len(listed.training_runs)
    assert rest.list_training_runs(limit=1, offset=0).result().training_runs[0].training_run_id in {
        r.training_run_id for r in listed.training_runs}

    checkpoints = {c.checkpoint_id: c for c in rest.list_checkpoints(run).result().checkpoints}
    assert set(checkpoints) == {"weights/kept", "sampler_weights/gone"}
    assert checkpoints["weights/kept"].checkpoint_type == "training"
    assert checkpoints["weights/kept"].tinker_path == state and checkpoints["weights/kept"].size_bytes > 0
    assert checkpoints["sampler_weights/gone"].checkpoint_type == "sampler"
    assert state in {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}

    info = rest.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == (_base_model(d), True, 4)

    assert run in rest.get_session(session).result().training_run_ids
    assert session in rest.list_sessions(limit=100).result().sessions

    rest.delete_checkpoint_from_tinker_path(sampler).result()
    rest.delete_checkpoint(run, "weights/kept").result()
    assert rest.list_checkpoints(run).result().checkpoints == []
    # What does not exist fails at once (404), not after retries.
    for call in (lambda: rest.get_training_run("no-such-run").result(),
                 lambda: rest.delete_checkpoint(run, "weights/kept").result(),
                 lambda: rest.get_weights_info_by_tinker_path(state).result()):
        with pytest.raises(Exception, match="404"):
            call()
    status, reply = sc.http_json(url, "/api/v1/training_runs?limit=-1", None, {"X-API-Key": KEY})
    assert (status, reply["error"]["code"]) == (422, "INVALID_ARGUMENT"), reply
    client.close("success").result()


PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]


def _grpc_base_sample(d, run: str, seq: int, n: int, **params) -> pb.SampleResult:
    md = d.metadata()
    op = pb.SampleOp(prompt=sc.types.ModelInput(chunks=[sc.token_chunk(PROMPT)]), num_samples=n, base=True,
                     params=pb.SamplingParams(**params))
    op_id = d.stub.Submit(pb.SubmitRequest(run_id=run, seq_id=seq, sample=op), metadata=md,
                          timeout=sc.RPC_TIMEOUT_S).op_id
    r = d.stub.Retrieve(pb.RetrieveRequest(op_id=op_id, wait_ms=30000), metadata=md, timeout=40)
    assert r.state == sc.Retrieve.DONE, r.error
    return r.result.sample


def _same_samples(http, grpc_result: pb.SampleResult):
    assert len(http.sequences) == len(grpc_result.sequences) > 0
    for h, g in zip(http.sequences, grpc_result.sequences):
        assert list(h.tokens) == np.frombuffer(g.tokens, "<i4").tolist()
        assert np.array_equal(np.asarray(h.logprobs, np.float32).view(np.uint32),
                              np.frombuffer(g.logprobs, "<f4").view(np.uint32))


def _base_sampler(client, base_model):
    sampler = client.create_sampling_client(base_model=base_model)
    return sampler.result() if hasattr(sampler, "result") else sampler


def test_base_model_sampling_client_samples_the_base_model(tmp_path, build_dir, tiny_model):
    with sc.http_door(build_dir, tiny_model, str(tmp_path), KEY) as (d, url):
        base_model = _base_model(d)
        SP = tinker.types.SamplingParams
        prompt = tinker.types.ModelInput.from_ints(PROMPT)
        # No run yet: the door makes one for the session (the smallest adapter) to sample through.
        alone = tinker.ServiceClient(base_url=url, api_key=KEY)
        sampler = _base_sampler(alone, base_model)
        greedy_alone = sampler.sample(prompt, 2, SP(max_tokens=8, temperature=0.0)).result()
        seeded_alone = sampler.sample(prompt, 3, SP(max_tokens=8, temperature=1.0, seed=11)).result()
        runs = alone.create_rest_client().list_training_runs().result().training_runs
        assert [r.training_run_id for r in runs] == [f"{alone.holder.get_session_id()}:base"]

        # A run made over gRPC and trained away from the base model: its base samples are the reference.
        md = d.metadata()
        ref = d.stub.CreateRun(pb.CreateRunRequest(lora=sc.types.LoraConfig(rank=4, seed=9)), metadata=md,
                               timeout=sc.RPC_TIMEOUT_S).run_id
        tokens, targets = sc.random_sequence(np.random.default_rng(3), 10)
        for seq, op in ((1, sc.fb_op(sc.datum(tokens, targets))), (2, {"optim_step": sc.adam(learning_rate=1e-1)})):
            d.stub.Submit(pb.SubmitRequest(run_id=ref, seq_id=seq, **op), metadata=md, timeout=sc.RPC_TIMEOUT_S)
        greedy_want = _grpc_base_sample(d, ref, 3, 2, max_tokens=8, temperature=0.0)
        seeded_want = _grpc_base_sample(d, ref, 4, 3, max_tokens=8, temperature=1.0, seed=11)
        _same_samples(greedy_alone, greedy_want)
        _same_samples(seeded_alone, seeded_want)

        # A session with a trained client of its own samples the base model through it.
        with_run = tinker.ServiceClient(base_url=url, api_key=KEY)
        training = with_run.create_lora_training_client(base_model=base_model, rank=8, seed=1).result()
        training.forward_backward(_data(4), "cross_entropy").result()
        training.optim_step(tinker.types.AdamParams(learning_rate=1e-1)).result()
        sampler = _base_sampler(with_run, base_model)
        _same_samples(sampler.sample(prompt, 2, SP(max_tokens=8, temperature=0.0)).result(), greedy_want)
        _same_samples(sampler.sample(prompt, 3, SP(max_tokens=8, temperature=1.0, seed=11)).result(), seeded_want)
        # What was sampled is not the trained adapter: its own weights answer otherwise.
        trained = training.save_weights_and_get_sampling_client().result()
        trained_out = trained.sample(prompt, 2, SP(max_tokens=8, temperature=0.0)).result()
        assert not np.array_equal(np.asarray(trained_out.sequences[0].logprobs, np.float32),
                                  np.asarray(greedy_alone.sequences[0].logprobs, np.float32))
        # Another base model than the deployment's is refused at once.
        status, reply = sc.http_json(url, "/api/v1/create_sampling_session",
                                     json.dumps({"session_id": "s", "sampling_session_seq_id": 0,
                                                 "base_model": "no/such-model"}).encode(), {"X-API-Key": KEY})
        assert (status, reply["error"]["code"]) == (422, "INVALID_ARGUMENT"), reply
        alone.close("success").result()
        with_run.close("success").result()


def test_silent_sessions_end_and_their_heartbeat_is_gone(tmp_path, build_dir, tiny_model):
    key = {"X-API-Key": KEY}

    def heartbeat(session):
        return sc.http_json(url, "/api/v1/session_heartbeat",
                            json.dumps({"session_id": session, "type": "session_heartbeat"}).encode(), key)

    def new_session():
        status, reply = sc.http_json(url, "/api/v1/create_session", b'{"tags": [], "type": "create_session"}', key)
        assert status == 200, reply
        return reply["session_id"]

    with sc.http_door(build_dir, tiny_model, str(tmp_path), KEY,
                      coordinator_args=["--http_session_timeout", "1500ms"]) as (d, url):
        live, silent, finished = new_session(), new_session(), new_session()
        for _ in range(4):  # heard from often enough: stays
            time.sleep(0.6)
            assert heartbeat(live) == (200, {"type": "session_heartbeat"})
        assert sc.http_json(url, f"/api/v1/sessions/{finished}/finish",
                            b'{"reason": {"type": "success"}, "detail": null}', key) == (200, {})
        for gone in (silent, finished, "session-never-made"):
            status, reply = heartbeat(gone)
            assert (status, reply["error"]["code"]) == (410, "NOT_FOUND") and "ended" in reply["error"]["message"]
        assert heartbeat(live)[0] == 200
        # The SDK takes 410 as the end of its heartbeat loop and keeps working.
        client = tinker.ServiceClient(base_url=url, api_key=KEY)
        training = client.create_lora_training_client(base_model=_base_model(d), rank=4).result()
        time.sleep(2.0)
        assert heartbeat(client.holder.get_session_id())[0] == 410
        assert training.forward_backward(_data(5), "cross_entropy").result().metrics["loss:sum"] > 0
        client.close("success").result()


def test_an_ended_sessions_ephemeral_sampler_weights_are_removed(door):
    """save_weights_and_get_sampling_client's weights live as long as the session that made
    them: once it finishes they are removed; its named checkpoints and other sessions' stay."""
    d, url = door
    stub, md = d.stub, d.metadata()

    def sampler_checkpoints(run):
        listed = stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run), metadata=md, timeout=sc.RPC_TIMEOUT_S)
        return sorted(c.id.rsplit("/", 1)[1] for c in listed.checkpoints if c.type == "sampler")

    ending, staying = (tinker.ServiceClient(base_url=url, api_key=KEY) for _ in range(2))
    runs = []
    for client in (ending, staying):
        training = client.create_lora_training_client(base_model=_base_model(d), rank=4).result()
        sampler = training.save_weights_and_get_sampling_client().result()
        prompt = tinker.types.ModelInput.from_ints([1, 2, 3])
        assert sampler.sample(prompt, 1, tinker.types.SamplingParams(max_tokens=2)).result().sequences
        training.save_weights_for_sampler("named").result()
        runs.append(training.model_id)
    assert [len(sampler_checkpoints(r)) for r in runs] == [2, 2]  # ephemeral-<seq_id> and named
    ending.close("success").result()
    assert sampler_checkpoints(runs[0]) == ["named"]
    assert len(sampler_checkpoints(runs[1])) == 2
    staying.close("success").result()
    assert sampler_checkpoints(runs[1]) == ["named"]


def test_create_run_from_a_checkpoint_over_grpc(door):
    """The same CreateRun over gRPC: a chosen run id, a checkpoint to start from, and what is refused."""
    d, _ = door
    stub, md = d.stub, d.metadata()

    def create(**fields):
        return stub.CreateRun(pb.CreateRunRequest(**fields), metadata=md, timeout=sc.RPC_TIMEOUT_S)

    def run_op(run, seq, **op):
        op_id = stub.Submit(pb.SubmitRequest(run_id=run, seq_id=seq, **op), metadata=md,
                            timeout=sc.RPC_TIMEOUT_S).op_id
        r = stub.Retrieve(pb.RetrieveRequest(op_id=op_id, wait_ms=30000), metadata=md, timeout=40)
        assert r.state == sc.Retrieve.DONE, r.error
        return r.result

    source = create(run_id="grpc:source", lora=sc.types.LoraConfig(rank=2, alpha=8, seed=4))
    assert source.run_id == "grpc:source" and source.init_op_id == "grpc:source/0"
    tokens, targets = sc.random_sequence(np.random.default_rng(11), 9)
    data = sc.fb_op(sc.datum(tokens, targets))
    run_op("grpc:source", 1, **data)
    run_op("grpc:source", 2, optim_step=sc.adam(learning_rate=1e-2))
    saved = run_op("grpc:source", 3, save_state=pb.SaveStateOp(name="s")).save_state.path
    assert saved == "lathe://grpc:source/weights/s"
    want = run_op("grpc:source", 4, forward=data["forward_backward"]).forward_backward.metrics["loss:sum"]

    copy = create(run_id="grpc:copy", load_path=saved, load_optimizer=True)
    init = stub.Retrieve(pb.RetrieveRequest(op_id=copy.init_op_id, wait_ms=30000), metadata=md, timeout=40)
    assert init.state == sc.Retrieve.DONE, init.error
    assert (init.result.init.loaded_from, init.result.init.step) == (saved, 1)
    assert (init.result.init.lora.rank, init.result.init.lora.alpha) == (2, 8)  # the checkpoint's config
    assert run_op("grpc:copy", 1, forward=data["forward_backward"]).forward_backward.metrics["loss:sum"] == want
    # A retry is the same run; another request for its id is refused, as are bad requests, creating nothing.
    assert create(run_id="grpc:copy", load_path=saved, load_optimizer=True) == copy
    refused = [
        dict(run_id="grpc:copy", load_path=saved),                                   # exists
        dict(run_id="grpc:source", lora=sc.types.LoraConfig(rank=2, alpha=8, seed=5)),  # exists, made otherwise
        dict(run_id=".hidden", lora=sc.types.LoraConfig(rank=2)),
        dict(run_id="a/b", lora=sc.types.LoraConfig(rank=2)),
        dict(run_id="x" * 129, lora=sc.types.LoraConfig(rank=2)),
        dict(load_path=saved, lora=sc.types.LoraConfig(rank=2)),                     # the checkpoint's config only
        dict(load_path="lathe://grpc:source/weights/nope"),
        dict(load_path="lathe://grpc:source/sampler_weights/s"),
    ]
    for fields in refused:
        with pytest.raises(Exception) as e:
            create(**fields)
        assert e.value.code().name in ("INVALID_ARGUMENT", "ALREADY_EXISTS"), (fields, e.value)
    # Re-initialising a run from a checkpoint (an init op with load_path) is the same load.
    again = run_op("grpc:copy", 2, init=pb.InitOp(load_path=saved)).init
    assert (again.loaded_from, again.step) == (saved, 0)  # without its optimizer: step 0
    assert run_op("grpc:copy", 3, forward=data["forward_backward"]).forward_backward.metrics["loss:sum"] == want
    # The same request again is a retry: the same run, even deleted (a run id is never reused).
    run_op("grpc:source", 5, delete_run=pb.DeleteRunOp())
    assert create(run_id="grpc:source", lora=sc.types.LoraConfig(rank=2, alpha=8, seed=4)) == source
    run_op("grpc:copy", 4, delete_run=pb.DeleteRunOp())
