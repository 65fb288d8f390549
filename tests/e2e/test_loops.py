"""Baseten Loops' HTTP API on the HTTP door (docs/http-api.md, "Loops"), driven by the real
``baseten-loops`` 0.32.0 SDK. The SDK needs Python >= 3.12, so it runs in ``.venv-loops``
(scripts/setup.sh) as a subprocess script that prints its results as JSON; this module compares
them, bit for bit, with the same operations over gRPC. The control plane (/v1/loops/...) is
exercised with plain HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb

KEY = "loops-lathe-test-key"
PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]
SDK_TIMEOUT_S = 300
LOOPS_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        ".venv-loops", "bin", "python")


@pytest.fixture(scope="module")
def loops_python():
    if not os.access(LOOPS_PY, os.X_OK):
        pytest.skip(".venv-loops is missing: scripts/setup.sh makes it when a Python >= 3.12 exists")
    return LOOPS_PY


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    """A deployment with API keys on and the HTTP door: (deployment, base_url, base_model)."""
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("loops")), KEY) as (d, url):
        base_model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=d.metadata(),
                                            timeout=sc.RPC_TIMEOUT_S).base_models[0]
        yield d, url, base_model


def _sdk(python: str, tmp_path, script: str, args: dict, env: dict | None = None) -> dict:
    """Runs `script` (its `args` in ARGS) with the Loops SDK; the JSON its last line prints."""
    path = tmp_path / "script.py"
    path.write_text("import json, sys\nARGS = json.loads(sys.argv[1])\n" + textwrap.dedent(script))
    proc = subprocess.run([python, str(path), json.dumps(args)], capture_output=True, text=True,
                          timeout=SDK_TIMEOUT_S, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"the SDK script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bits(values) -> list[int]:
    return np.asarray([np.nan if v is None else v for v in values], np.float32).view(np.uint32).tolist()


def _sequence(n: int, seed: int):
    tokens, targets = sc.random_sequence(np.random.default_rng(seed), n)
    return [int(t) for t in tokens], [int(t) for t in targets]


TRAIN = """
import threading, time
from baseten.loops import TrainingClient, Datum, ModelInput, TensorData, AdamParams, SamplingParams
from baseten.loops.sampling_client import LocalDeployment, SamplingClient

url, key, model = ARGS["url"], ARGS["key"], ARGS["model"]
trainer, sampler_url = url + "/loops/local", url + "/loops/local/sampler"
tc = TrainingClient(trainer, lora_rank=8, base_model=model, api_key=key, run_id="my-loops-run",
                    paired_sampling_deployment=LocalDeployment(sampler_url))
def datum(seq):
    tokens, targets = seq
    return Datum(model_input=ModelInput.from_ints(tokens),
                 loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])})
def fb(seq):
    out = tc.forward_backward([datum(seq)], "cross_entropy").result()
    return {"loss": out.loss, "metrics": out.metrics, "logprobs": out.loss_fn_outputs[0]["logprobs"].data}
def seqs(result):
    return [{"tokens": list(s.tokens), "logprobs": list(s.logprobs), "stop": s.stop_reason} for s in result.sequences]
out = {"fb1": fb(ARGS["a"])}                                            # seq 2
tc.optim_step(AdamParams(learning_rate=1e-2)).result()                  # 3
out["pv1"] = tc.policy_version
out["saved"] = tc.save_state("s1").result().path                        # 4
out["fb2"] = fb(ARGS["b"])                                              # 5
tc.optim_step(AdamParams(learning_rate=1e-2)).result()                  # 6
out["pv2"] = tc.policy_version
out["loaded_step"] = tc.load_state_with_optimizer(out["saved"]).result().step   # 7
out["pv_loaded"] = tc.policy_version
sampler = tc.save_weights_and_get_sampling_client("p1")                 # 8
out["p1"] = seqs(sampler.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=2,
                                sampling_params=SamplingParams(max_tokens=6, temperature=0.0)))
r = sampler.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=1,
                   sampling_params=SamplingParams(max_tokens=1, temperature=0.0), include_prompt_logprobs=True)
out["p1_prompt_logprobs"], out["p1_version"] = r.prompt_logprobs, r.policy_version
# A client that wants version 2 waits while only version 1 is live.
gated = SamplingClient(base_model=model, deployment=LocalDeployment(sampler_url), api_key=key, min_policy_version=2)
box = {}
def sample_gated():
    res = gated.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=2,
                       sampling_params=SamplingParams(max_tokens=6, temperature=1.0, seed=9))
    box["done"], box["seqs"], box["version"] = time.monotonic(), seqs(res), res.policy_version
thread = threading.Thread(target=sample_gated)
thread.start()
time.sleep(15)
out["gated_early"] = "done" in box
out["fb3"] = fb(ARGS["b"])                                              # 9
tc.optim_step(AdamParams(learning_rate=1e-2)).result()                  # 10
published = time.monotonic()
s2 = tc.save_weights_and_get_sampling_client("p2")                      # 11
thread.join(120)
out["gated"], out["gated_version"] = box["seqs"], box["version"]
out["gated_after_publish"] = box["done"] >= published
out["p2"] = seqs(s2.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=2,
                           sampling_params=SamplingParams(max_tokens=6, temperature=1.0, seed=9)))
print(json.dumps(out))
"""


def test_training_client_matches_grpc(door, loops_python, tmp_path):
    d, url, model = door
    a, b = _sequence(12, 1), _sequence(10, 2)
    log = tmp_path / "requests.jsonl"
    got = _sdk(loops_python, tmp_path, TRAIN, {"url": url, "key": KEY, "model": model, "a": a, "b": b,
                                               "prompt": PROMPT}, {"LOOPS_REQUEST_LOG": str(log)})
    assert got["pv1"] == 1 and got["pv2"] == 2 and got["loaded_step"] == 1 and got["pv_loaded"] == 1
    assert got["saved"].startswith("bt://loops:run-") and got["saved"].endswith("/weights/s1")
    assert got["p1_version"] == 1 and got["gated_version"] == 2
    assert not got["gated_early"] and got["gated_after_publish"]
    # The sampler answered 408 while version 2 was not live.
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    requests = {e["seq"]: e for e in entries if e["kind"] == "request"}
    gated = [requests[e["seq"]]["headers"].get("x-min-policy-version") for e in entries
             if e["kind"] == "response" and e["status"] == 408 and requests[e["seq"]]["path"].endswith("/sample")]
    assert gated and set(gated) == {"2"}, "no 408 for the gated sample in the request log"

    # The same operations over gRPC on a run of the same rank.
    run = d.stub.CreateRun(pb.CreateRunRequest(lora=sc.types.LoraConfig(rank=8)), metadata=d.metadata(),
                           timeout=sc.RPC_TIMEOUT_S).run_id
    # The Loops SDK's AdamParams defaults (grad_clip_norm 1.0), as it sends them.
    adam = sc.adam(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=1.0)
    fb1 = d.run_op(run, 1, **sc.fb_op(sc.datum(*a))).forward_backward
    d.run_op(run, 2, optim_step=adam)
    d.run_op(run, 3, save_state=pb.SaveStateOp(name="s1"))
    fb2 = d.run_op(run, 4, **sc.fb_op(sc.datum(*b))).forward_backward
    d.run_op(run, 5, optim_step=adam)
    loaded = d.run_op(run, 6, load_state_with_optimizer=pb.LoadStateOp(path=f"lathe://{run}/weights/s1"))
    assert loaded.load_state.step == 1
    d.run_op(run, 7, save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="p1"))
    fb3 = d.run_op(run, 8, **sc.fb_op(sc.datum(*b))).forward_backward
    d.run_op(run, 9, optim_step=adam)
    d.run_op(run, 10, save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="p2"))
    for http, grpc_out in ((got["fb1"], fb1), (got["fb2"], fb2), (got["fb3"], fb3)):
        assert http["metrics"]["loss:sum"] == grpc_out.metrics["loss:sum"]
        assert http["loss"] == grpc_out.metrics["loss:sum"] / grpc_out.metrics["num_loss_tokens:sum"]
        assert _bits(http["logprobs"]) == _bits(sc.logprobs(grpc_out)[0])

    def sample(seq, name, n, prompt_logprobs=False, **params):
        op = pb.SampleOp(prompt=sc.types.ModelInput(chunks=[sc.token_chunk(PROMPT)]), num_samples=n,
                         model_path=f"lathe://{run}/sampler_weights/{name}", include_prompt_logprobs=prompt_logprobs,
                         params=pb.SamplingParams(**params))
        return d.run_op(run, seq, sample=op).sample

    def same(http, grpc_result):
        assert len(http) == len(grpc_result.sequences)
        for h, g in zip(http, grpc_result.sequences):
            assert h["tokens"] == np.frombuffer(g.tokens, "<i4").tolist()
            assert _bits(h["logprobs"]) == np.frombuffer(g.logprobs, "<f4").view(np.uint32).tolist()
            assert h["stop"] == ("stop" if g.stop_reason == pb.STOP else "length")

    same(got["p1"], sample(11, "p1", 2, max_tokens=6, temperature=0.0))
    with_prompt = sample(12, "p1", 1, True, max_tokens=1, temperature=0.0)
    assert got["p1_prompt_logprobs"][0] is None
    assert _bits(got["p1_prompt_logprobs"][1:]) == np.frombuffer(with_prompt.prompt_logprobs, "<f4")[1:].view(
        np.uint32).tolist()
    p2 = sample(13, "p2", 2, max_tokens=6, temperature=1.0, seed=9)
    same(got["gated"], p2)
    same(got["p2"], p2)


LOCAL = """
from baseten.loops import ServiceClient, Datum, ModelInput, TensorData, AdamParams, SamplingParams
url, model = ARGS["url"], ARGS["model"]
client = ServiceClient.local(trainer_url=url + "/loops/local", sampler_url=url + "/loops/local/sampler")
tc = client.create_lora_training_client(base_model=model, rank=4)
tokens, targets = ARGS["a"]
d = Datum(model_input=ModelInput.from_ints(tokens),
          loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])})
out = {"loss": tc.forward_backward([d], "cross_entropy").result().metrics["loss:sum"]}
tc.optim_step(AdamParams(learning_rate=1e-2)).result()
out["pv"] = tc.policy_version
tc.health()
import time
started = time.monotonic()
bad = Datum(model_input=ModelInput.from_ints([10 ** 8]),
            loss_fn_inputs={"target_tokens": TensorData(data=[1], dtype="int64", shape=[1])})
try:
    tc.forward_backward([bad], "cross_entropy").result()
    out["refused"] = None
except Exception as e:
    out["refused"] = str(e)
out["refused_s"] = time.monotonic() - started
out["after"] = tc.forward_backward([d], "cross_entropy").result().metrics["loss:sum"]
sc_ = client.create_sampling_client(base_model=model)
res = sc_.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=1,
                 sampling_params=SamplingParams(max_tokens=5, temperature=0.0))
out["tokens"], out["version"] = list(res.sequences[0].tokens), res.policy_version
out["models"] = sc_.discover_base_model_name()
print(json.dumps(out))
"""


def test_service_client_local(build_dir, tiny_model, tmp_path, loops_python):
    """ServiceClient.local() sends no key: a deployment without keys; two clients in a row each
    start a fresh run, and the base model samples like gRPC's base sampling."""
    root = str(tmp_path / "checkpoints")
    port_file = str(tmp_path / "http_port")
    d = sc.Deployment(build_dir, tiny_model, str(tmp_path / "deployment"), max_runs=2,
                      worker_args=["--checkpoint_root", root],
                      coordinator_args=["--http_port", "0", "--http_port_file", port_file, "--checkpoint_root", root])
    d.start()
    try:
        url = f"http://127.0.0.1:{int(open(port_file).read())}"
        model = d.stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=sc.RPC_TIMEOUT_S).base_models[0]
        a = _sequence(9, 4)
        args = {"url": url, "model": model, "a": a, "prompt": PROMPT}
        first = _sdk(loops_python, tmp_path, LOCAL, args)
        second = _sdk(loops_python, tmp_path, LOCAL, args)  # a fresh run: the same loss
        assert first["pv"] == 1 and first["version"] == 0 and first["models"] == model
        # A refused op fails at once (422, not retried) and the client trains on.
        assert "422" in first["refused"] and first["refused_s"] < 20, first
        assert first["after"] < first["loss"]
        first.pop("refused_s"), second.pop("refused_s")
        assert first == second
        # The base model samples as gRPC's base sampling does (on any run: the adapter is off).
        run = d.stub.CreateRun(pb.CreateRunRequest(lora=sc.types.LoraConfig(rank=4)), timeout=sc.RPC_TIMEOUT_S).run_id
        op = pb.SampleOp(prompt=sc.types.ModelInput(chunks=[sc.token_chunk(PROMPT)]), num_samples=1, base=True,
                         params=pb.SamplingParams(max_tokens=5, temperature=0.0))
        want = sc.result(d.stub, d.stub.Submit(pb.SubmitRequest(run_id=run, seq_id=1, sample=op),
                                               timeout=sc.RPC_TIMEOUT_S).op_id).sample
        assert first["tokens"] == np.frombuffer(want.sequences[0].tokens, "<i4").tolist()
    finally:
        d.close()


def _http(url: str, path: str, body=None, method=None, key: str | None = KEY):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Api-Key {key}"
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 method=method or ("POST" if body is not None else "GET"), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if r.headers.get("Content-Type") == "application/json" else raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_control_plane(door):
    d, url, model = door
    assert _http(url, "/v1/loops/capabilities", key=None)[0] == 401
    assert _http(url, "/v1/loops/capabilities", key="wrong")[0] == 401
    status, caps = _http(url, "/v1/loops/capabilities")
    assert status == 200 and caps["supported_models"][0]["model_name"] == model
    max_len = caps["supported_models"][0]["max_context_length"]
    assert max_len > 0
    status, session = _http(url, "/v1/loops/sessions", {})
    assert status == 200 and session["session"]["id"]
    sid = session["session"]["id"]
    assert _http(url, f"/v1/loops/sessions/{sid}") == (200, {"session": {"id": sid}})
    # Clear refusals.
    for body, word in (({"base_model": "nope/model"}, "nope/model"),
                       ({"base_model": model, "max_seq_len": max_len + 1}, "max_seq_len"),
                       ({"base_model": model, "replicas": 99}, "replicas"),
                       ({"base_model": model, "path": "bt://loops:x/weights/y"}, "path")):
        status, err = _http(url, "/v1/loops/runs", {"session_id": sid, **body})
        assert status == 422 and word in err["error"]["message"], (body, status, err)
    status, made = _http(url, "/v1/loops/trainers", {"session_id": sid, "base_model": model, "lora_rank": 4,
                                                     "replicas": 1, "max_seq_len": 64})
    assert status == 200, made
    run = made["run"]
    assert run["base_model"] == model and run["deployment_id"] and run["base_url"].endswith(f"/loops/runs/{run['id']}")
    base = run["base_url"]
    assert _http(url, f"/v1/loops/runs/{run['id']}")[1]["run"]["id"] == run["id"]
    status, dep = _http(url, f"/v1/loops/deployments/{run['deployment_id']}")
    assert status == 200 and dep["deployment"]["status"]["name"] == "ACTIVE"
    # The sampler's deployment status, as SamplingClient polls it.
    status, sampler_dep = _http(url, f"/v1/models/lathe/deployments/{run['deployment_id']}")
    assert (status, sampler_dep["status"]) == (200, "ACTIVE"), sampler_dep
    assert _http(url, "/v1/models/lathe/deployments/run-unknown")[0] == 404
    status, sampler = _http(url, "/v1/loops/samplers", {"session_id": sid, "run_id": run["id"]})
    assert status == 200 and sampler["sampler"]["base_url"] == base + "/sampler" and sampler["sampler"]["model_id"]
    path = base[len(url):]
    assert _http(url, path + "/health")[0] == 200

    # The run's trainer URL: init (its creation), a publication, checkpoints.
    def op(route, body, key):
        status, sub = _keyed(url, path + route, body, key)
        assert status == 202, sub
        for _ in range(10):
            status, got = _http(url, path + "/operations/" + urllib.parse.quote(sub["operation_id"], safe=""))
            if status != 408:
                assert status == 200 and got["status"] == "done", got
                return sub["operation_id"], got["result"]
        raise AssertionError("still pending")

    init_id, init = op("/init_trainer_server", {"lora_rank": 4, "base_model": model, "seq_id": 1, "run_id": None,
                                                "model": model}, "k1")
    assert init["lora_rank"] == 4 and init["step"] == 0
    again = _keyed(url, path + "/init_trainer_server", {"lora_rank": 4, "base_model": model, "seq_id": 1}, "k1")
    assert again == (202, {"operation_id": init_id, "schema_version": 1})  # a resubmit: the same operation
    save = {"name": "w", "ttl_seconds": None, "seq_id": 2, "run_id": run["id"]}
    save_id, saved = op("/save_state", save, "k2")
    assert saved["path"] == f"bt://loops:{run['id']}/weights/w"
    # A resubmit (same key, seq_id and body) is the same operation.
    assert _keyed(url, path + "/save_state", save, "k2") == (202, {"operation_id": save_id, "schema_version": 1})
    _, pub = op("/save_weights_for_sampler", {"name": "sw", "seq_id": 3, "bump_version": True}, "k3")
    assert pub == {"version": 0, "path": f"bt://loops:{run['id']}/sampler_weights/sw"}
    # The sampler serves the published version (0: no optim_step yet) next to the base model.
    status, models = _http(url, path + "/sampler/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [model, "default"], models
    assert models["data"][0]["max_model_len"] == max_len
    assert _http(url, path + "/sampler/trainers_policy_version") == (200, {"policy_version": 0})
    # create_sampling_client(model_path=...) validates the path first.
    valid = f"bt://loops:{run['id']}/weights/w"
    assert _http(url, "/v1/loops/checkpoints/validate", {"checkpoint_path": valid, "run_id": run["id"]}) == (
        200, {"valid": True})
    for bad in (valid + "-nope", f"lathe://{run['id']}/weights/w", 5, None):
        status, err = _http(url, "/v1/loops/checkpoints/validate", {"checkpoint_path": bad})
        assert status == 422 and err["error"]["message"], (bad, status, err)
    # Permanent errors at submit are 422, never 400/404 (the SDK retries those for an hour).
    status, err = _keyed(url, path + "/load_state", {"path": "s3://elsewhere", "seq_id": 4}, "k4")
    assert status == 422 and err["error"]["type"] == "BadRequestError", err
    status, err = _keyed(url, "/loops/runs/run-unknown/forward", {"data": [], "seq_id": 2}, "k5")
    assert status == 422, err
    assert _http(url, path + "/operations/" + urllib.parse.quote(f"{run['id']}/999", safe=""))[0] == 404

    status, listed = _http(url, f"/v1/loops/checkpoints?run_id={run['id']}")
    assert status == 200, listed
    by_target = {c["target"]: c for c in listed["checkpoints"]}
    assert set(by_target) == {"trainer", "sampler"}
    trainer_ckpt = by_target["trainer"]
    assert trainer_ckpt["checkpoint_id"] == "w" and trainer_ckpt["lora_adapter_config"] == {"r": 4}
    assert trainer_ckpt["sync_status"] == "COMPLETE" and trainer_ckpt["base_model"] == model
    q = urllib.parse.quote(f"bt://loops:{run['id']}/sampler_weights/sw", safe="")
    status, one = _http(url, f"/v1/loops/checkpoints?checkpoint_path={q}")
    assert status == 200 and [c["checkpoint_id"] for c in one["checkpoints"]] == ["sw"]
    status, every = _http(url, "/v1/loops/checkpoints?base_model=" + urllib.parse.quote(model, safe=""))
    assert status == 200 and {c["id"] for c in listed["checkpoints"]} <= {c["id"] for c in every["checkpoints"]}
    assert _http(url, "/v1/loops/checkpoints")[0] == 422
    cid = trainer_ckpt["id"]
    status, page = _http(url, f"/v1/loops/checkpoints/{cid}/files?page_size=1&page_token=0")
    assert status == 200 and len(page["presigned_urls"]) == 1 and page["next_page_token"] == 1, page
    total = page["total_count"]
    files = list(page["presigned_urls"])
    while page["next_page_token"] is not None:
        status, page = _http(url, f"/v1/loops/checkpoints/{cid}/files?page_size=1&page_token={page['next_page_token']}")
        files += page["presigned_urls"]
    assert len(files) == total and all(isinstance(f["node_rank"], int) for f in files)
    assert {f["node_rank"] for f in files} - {-1}, "no per-node_rank shard"
    f = files[0]
    biggest = max(files, key=lambda f: f["size_bytes"])
    status, data = _http(url, biggest["url"][len(url):])
    assert status == 200 and len(data) == biggest["size_bytes"] > 0
    assert _http(url, f"/v1/loops/checkpoints/{cid}/files/no-such-file")[0] == 404
    assert _http(url, f["url"][len(url):], key=None)[0] == 401
    status, _ = _http(url, f"/v1/loops/checkpoints/{cid}", method="DELETE")
    assert status == 200
    status, listed = _http(url, f"/v1/loops/checkpoints?run_id={run['id']}")
    assert [c["target"] for c in listed["checkpoints"]] == ["sampler"]

    # A second client on the run: its init_trainer_server (seq_id 1) re-initialises the run after
    # the ops so far (ledger seq_ids 1, 2 and the noop that took the refused load_state's 3), and
    # its seq_id n is ledger 3 + n.
    reinit_id, reinit = op("/init_trainer_server", {"lora_rank": 4, "base_model": model, "seq_id": 1}, "k6")
    assert reinit_id == f"{run['id']}/4" and reinit == {"step": 0, "lora_rank": 4}
    saved_id, _ = op("/save_state", {"name": "w2", "seq_id": 2}, "k7")
    assert saved_id == f"{run['id']}/5"
    status, version = _http(url, path + "/policy_version")
    assert status == 200 and version == {"policy_version": 0}
    # load_state (weights only) and forward: forward gives the loss forward_backward does on
    # the same weights.
    _, loaded = op("/load_state", {"path": f"bt://loops:{run['id']}/weights/w2", "seq_id": 3}, "k8")
    assert loaded == {"step": 0}
    tokens, targets = _sequence(9, 6)
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
             "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}}}
    body = {"data": [datum], "loss_fn": "cross_entropy", "loss_fn_config": None, "top_k_logprobs": 0}
    forward_id, forward = op("/forward", {**body, "seq_id": 4}, "k9")
    _, fb = op("/forward_backward", {**body, "seq_id": 5}, "k10")
    assert forward_id == f"{run['id']}/7"
    assert forward["metrics"]["loss:sum"] == fb["metrics"]["loss:sum"] and forward["loss"] == fb["loss"]
    assert forward["loss_fn_outputs"][0]["logprobs"] == fb["loss_fn_outputs"][0]["logprobs"]
    assert len(forward["loss_fn_outputs"][0]["logprobs"]["data"]) == len(targets)
    _, stepped = op("/optim_step", {"adam_params": {"learning_rate": 1e-2}, "seq_id": 6}, "k11")
    assert "metrics" in stepped
    assert _http(url, path + "/policy_version") == (200, {"policy_version": 1})
    # Nothing published since the re-init: the sampler samples the base model.
    status, done = _keyed(url, path + "/sampler/sample", {"prompt": PROMPT, "n": 2, "max_tokens": 3,
                                                          "temperature": 0.0, "logprobs": 0}, "k12")
    assert status == 200 and done["model"] == model and len(done["choices"]) == 2, done
    assert all(len(c["token_ids"]) == len(c["logprobs"]["token_logprobs"]) > 0 for c in done["choices"])
    d.stub.Submit(pb.SubmitRequest(run_id=run["id"], seq_id=10, delete_run=pb.DeleteRunOp()), metadata=d.metadata(),
                  timeout=sc.RPC_TIMEOUT_S)


def test_checkpoints_of_a_run_named_with_colons(door):
    """A run made over Tinker or gRPC may hold ':' in its id (<session>:train:<n>): its checkpoints'
    Loops ids ("<run>:<kind>:<name>") still page, download and delete."""
    d, url, _ = door
    run = d.stub.CreateRun(pb.CreateRunRequest(run_id="session-loops:train:0", lora=sc.types.LoraConfig(rank=2)),
                           metadata=d.metadata(), timeout=sc.RPC_TIMEOUT_S).run_id
    d.run_op(run, 1, save_state=pb.SaveStateOp(name="w"))
    status, listed = _http(url, "/v1/loops/checkpoints?run_id=" + urllib.parse.quote(run, safe=""))
    assert status == 200 and [c["id"] for c in listed["checkpoints"]] == [f"{run}:weights:w"], listed
    cid = listed["checkpoints"][0]["id"]
    assert listed["checkpoints"][0]["checkpoint_path"] == f"bt://loops:{run}/weights/w"
    status, page = _http(url, f"/v1/loops/checkpoints/{cid}/files")
    assert status == 200 and page["total_count"] == len(page["presigned_urls"]) > 0, page
    first = page["presigned_urls"][0]
    status, data = _http(url, first["url"][len(url):])
    assert status == 200 and len(data) == first["size_bytes"]
    assert _http(url, f"/v1/loops/checkpoints/{cid}", method="DELETE") == (200, {"id": cid, "deleted": True})
    assert _http(url, "/v1/loops/checkpoints?run_id=" + urllib.parse.quote(run, safe=""))[1]["checkpoints"] == []
    d.run_op(run, 2, delete_run=pb.DeleteRunOp())


def test_hostile_requests(door):
    """Bad Loops requests get a clear 422 (never the 400/404 the SDK would retry for an hour),
    queue nothing but a noop in the refused seq_id, and the trainer keeps serving."""
    d, url, model = door
    status, made = _http(url, "/v1/loops/runs", {"session_id": "s", "base_model": model, "lora_rank": 4})
    assert status == 200, made
    run = made["run"]["id"]
    path = f"/loops/runs/{run}"
    init = {"lora_rank": 4, "base_model": model, "seq_id": 1}
    assert _keyed(url, path + "/init_trainer_server", init, "h1")[0] == 202
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
             "loss_fn_inputs": {"target_tokens": {"data": PROMPT, "dtype": "int64", "shape": [len(PROMPT)]}},
             "routed_experts_ref": None}
    for route, body, word in (
            ("/forward_backward", {"data": [datum], "loss_fn": "nope", "seq_id": 2}, "nope"),
            ("/forward_backward", {"data": [datum], "loss_fn": "cross_entropy", "seq_id": -3}, "seq_id"),
            ("/forward_backward", {"data": "x", "seq_id": 2}, "shape"),
            ("/optim_step", {"adam_params": {"learning_rate": "fast"}, "seq_id": 2}, "learning_rate"),
            ("/load_state", {"path": f"lathe://{run}/weights/w", "seq_id": 2}, "bt://loops:"),
            ("/save_state", {"name": "../up", "seq_id": 2}, "name")):
        status, err = _keyed(url, path + route, body, "bad")
        assert status == 422 and err["error"]["type"] == "BadRequestError", (route, body, status, err)
        assert word in err["error"]["message"], (route, err)
    req = urllib.request.Request(url + path + "/optim_step", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Api-Key {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 422
    for headers, body, word in (({"X-Min-Policy-Version": "soon"}, {"prompt": PROMPT}, "X-Min-Policy-Version"),
                                ({}, {"prompt": PROMPT, "stop": ["\n"]}, "stop"),
                                ({}, {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
                                ({}, {"prompt": "text"}, "shape")):
        req = urllib.request.Request(url + path + "/sampler/sample", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Api-Key {KEY}", "Content-Type": "application/json",
                                              **headers})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        err = json.loads(e.value.read())
        assert e.value.code == 422 and word in err["error"]["message"], (body, err)
    # The SDK numbers on past a refused op: its seq_id 2 became a noop, so seq_id 3 runs.
    status, sub = _keyed(url, path + "/save_state", {"name": "ok", "seq_id": 3}, "h2")
    assert status == 202 and sub["operation_id"] == f"{run}/2", sub
    status, done = _http(url, path + "/operations/" + urllib.parse.quote(sub["operation_id"], safe=""))
    assert status == 200 and done["result"]["path"] == f"bt://loops:{run}/weights/ok", done
    d.stub.Submit(pb.SubmitRequest(run_id=run, seq_id=3, delete_run=pb.DeleteRunOp()), metadata=d.metadata(),
                  timeout=sc.RPC_TIMEOUT_S)


def _keyed(url: str, path: str, body, idempotency_key: str):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Api-Key {KEY}",
                                          "Idempotency-Key": idempotency_key})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


CONTROL = """
from baseten.loops import ServiceClient, Datum, ModelInput, TensorData, AdamParams, SamplingParams
url, key, model = ARGS["url"], ARGS["key"], ARGS["model"]
client = ServiceClient(api_key=key, base_url=url)
out = {"models": [m.model_name for m in client.get_server_capabilities().supported_models]}
tc = client.create_lora_training_client(base_model=model, rank=4)
tokens, targets = ARGS["a"]
d = Datum(model_input=ModelInput.from_ints(tokens),
          loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])})
tc.forward_backward([d], "cross_entropy").result()
tc.optim_step(AdamParams(learning_rate=1e-2)).result()
saved = tc.save_state("w1").result().path
sampler = tc.save_weights_and_get_sampling_client("p1")
res = sampler.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=1,
                     sampling_params=SamplingParams(max_tokens=4, temperature=0.0))
out.update(run=tc.run_id, saved=saved, tokens=list(res.sequences[0].tokens), version=res.policy_version,
           logprobs=list(res.sequences[0].logprobs))
# Version 2 goes live; a client pinned to p1's checkpoint still samples version 1's weights.
tc.forward_backward([d], "cross_entropy").result()
tc.optim_step(AdamParams(learning_rate=1e-2)).result()
live = tc.save_weights_and_get_sampling_client("p2")
res = live.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=1,
                  sampling_params=SamplingParams(max_tokens=4, temperature=0.0, seed=1))
out["live_logprobs"] = list(res.sequences[0].logprobs)
pinned = tc.create_sampling_client(model_path=f"bt://loops:{tc.run_id}/sampler_weights/p1")
res = pinned.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=1,
                    sampling_params=SamplingParams(max_tokens=4, temperature=0.0))
out["pinned_tokens"], out["pinned_logprobs"] = list(res.sequences[0].tokens), list(res.sequences[0].logprobs)
out["floor1_logprobs"] = list(sampler.sample(ModelInput.from_ints(ARGS["prompt"]), num_samples=1,
    sampling_params=SamplingParams(max_tokens=4, temperature=0.0)).sequences[0].logprobs)
checkpoints = tc.list_checkpoints()
out["checkpoints"] = sorted((c.checkpoint_id, c.target) for c in checkpoints)
files = client.get_checkpoint_archive_url([c for c in checkpoints if c.checkpoint_id == "w1"][0].id)
out["files"] = files.total_count
print(json.dumps(out))
"""


def test_sdk_control_plane(door, loops_python, tmp_path):
    """The SDK against the door as its control plane (ServiceClient(base_url=...)): sessions,
    trainers, the paired sampler, checkpoints."""
    d, url, model = door
    got = _sdk(loops_python, tmp_path, CONTROL, {"url": url, "key": KEY, "model": model, "a": _sequence(9, 4),
                                                 "prompt": PROMPT})
    assert got["models"] == [model] and got["version"] == 1 and len(got["tokens"]) == 4
    # Pinned to p1 while version 2 is live: version 1's numbers, not version 2's; a client with
    # floor 1 follows the live version.
    assert got["pinned_tokens"] == got["tokens"] and got["pinned_logprobs"] == got["logprobs"]
    assert got["pinned_logprobs"] != got["live_logprobs"] and got["floor1_logprobs"] == got["live_logprobs"]
    assert got["saved"] == f"bt://loops:{got['run']}/weights/w1"
    assert got["checkpoints"] == [["p1", "sampler"], ["p2", "sampler"], ["w1", "trainer"]] and got["files"] > 0
    d.stub.Submit(pb.SubmitRequest(run_id=got["run"], seq_id=8, delete_run=pb.DeleteRunOp()), metadata=d.metadata(),
                  timeout=sc.RPC_TIMEOUT_S)
