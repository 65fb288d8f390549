"""Checkpoints through the service: bit-exact resume across a restart of the whole
deployment, resharding to other layouts, refusals, and corrupt shards."""

from __future__ import annotations

import json
import os
import time

import grpc
import numpy as np

import service_client as sc
from checkpoint_run import Run, assemble, assert_bitwise_equal
from service_client import Retrieve, batch, datum, pb

Code = grpc.StatusCode
LORA = dict(rank=8, seed=5)


def _deploy(make_deployment, root, name, **kw):
    return make_deployment(name, max_runs=2, worker_args=["--checkpoint_root", root],
                           coordinator_args=["--checkpoint_root", root], **kw).start()


def _batches(steps):
    rng = np.random.default_rng(21)
    return [batch([datum(*sc.random_sequence(rng, n)) for n in (9, 17, 5, 30)]) for _ in range(steps)]


def _download_error(stub, checkpoint_id, name):
    """The status code DownloadCheckpointFile fails with (AssertionError when it succeeds)."""
    chunks = stub.DownloadCheckpointFile(pb.DownloadCheckpointFileRequest(
        checkpoint_id=checkpoint_id, relative_file_name=name), timeout=sc.RPC_TIMEOUT_S)
    try:
        list(chunks)
    except grpc.RpcError as e:
        return e.code()
    raise AssertionError(f"download of {name} from {checkpoint_id} was not refused")


def test_resume_with_optimizer_is_bit_exact_across_a_restart(make_deployment, tmp_path):
    root = str(tmp_path / "ckpt")
    batches = _batches(6)
    first = _deploy(make_deployment, root, "first")
    straight = Run(first.stub, **LORA)
    losses = straight.steps(batches)
    end_straight = straight.save("end")
    half = Run(first.stub, **LORA)
    assert half.steps(batches[:3]) == losses[:3]
    mid = half.save("mid")
    listed = first.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=half.id), timeout=sc.RPC_TIMEOUT_S)
    assert [c.id for c in listed.checkpoints] == [mid] and listed.checkpoints[0].size_bytes > 0
    first.close()

    second = _deploy(make_deployment, root, "second")
    resumed = Run(second.stub, **LORA)
    loaded = resumed.ok(load_state_with_optimizer=pb.LoadStateOp(path=mid)).load_state
    assert loaded.step == 3
    assert resumed.steps(batches[3:]) == losses[3:], "losses after resuming differ from the straight run"
    end_resumed = resumed.save("end")
    info = second.stub.GetInfo(pb.GetInfoRequest(run_id=resumed.id), timeout=sc.RPC_TIMEOUT_S)
    assert info.step == 6

    # Weights only: the same weights (the first loss matches) but a fresh optimizer, so the
    # first update is Adam's first step (|update| = lr per element), not the straight run's.
    fresh = Run(second.stub, **LORA)
    assert fresh.ok(load_state=pb.LoadStateOp(path=mid)).load_state.step == 0
    fresh_losses = fresh.steps(batches[3:4])
    assert fresh_losses[0] == losses[3]
    end_fresh = fresh.save("fresh")

    m_straight, straight_tensors = assemble(root, end_straight)
    m_resumed, resumed_tensors = assemble(root, end_resumed)
    assert m_straight["step"] == m_resumed["step"] == 6
    assert_bitwise_equal(straight_tensors, resumed_tensors, "straight vs resumed")
    _, mid_tensors = assemble(root, mid)
    _, fresh_tensors = assemble(root, end_fresh)
    for (kind, name), after in fresh_tensors.items():
        if kind != "param" or "lora_B" not in name:
            continue
        moved = np.abs(after - mid_tensors[(kind, name)])
        # Adam's first step moves every element with a gradient by lr (to rounding).
        assert np.allclose(moved[moved > 0], 1e-2, rtol=1e-3), name
    assert fresh_tensors[("exp_avg", name)].any()


def test_checkpoint_reshards_to_other_layouts(make_deployment, tmp_path):
    root = str(tmp_path / "ckpt")
    saver = _deploy(make_deployment, root, "save_r2_tp2", tp=2, ep=1)
    run = Run(saver.stub, **LORA)
    run.steps(_batches(2))
    saved = run.save("s")
    saver.close()
    _, want = assemble(root, saved)
    for name, layout in (("load_1x1", dict(replicas=1, ranks=1, ep=1)), ("load_ep2", dict(replicas=1, ranks=2, ep=2))):
        d = _deploy(make_deployment, root, name, **layout)
        again = Run(d.stub, **LORA)
        assert again.ok(load_state_with_optimizer=pb.LoadStateOp(path=saved)).load_state.step == 2
        _, got = assemble(root, again.save("again"))
        assert_bitwise_equal(want, got, name)
        d.close()


def test_checkpoints_move_between_context_parallel_layouts(make_deployment, tmp_path):
    """Weights do not depend on cp: a checkpoint saved with the sequence split over 2 ranks
    holds each slice once (the cp ranks hold the same ones), records cp, and resumes under
    cp 1 and tp 2 x cp 2 with the same tensors and the same next loss."""
    root = str(tmp_path / "ckpt")

    def deploy(name, cp, **layout):
        return make_deployment(name, max_runs=2, worker_args=["--checkpoint_root", root, "--cp", str(cp)],
                               coordinator_args=["--checkpoint_root", root], **layout).start()

    batches = _batches(3)
    saver = deploy("save_cp2", 2, replicas=1, ranks=4, ep=2)
    run = Run(saver.stub, **LORA)
    losses = run.steps(batches[:2])
    saved = run.save("s")
    losses += run.steps(batches[2:])
    saver.close()
    manifest, want = assemble(root, saved)
    assert manifest["layout"]["cp"] == 2 and manifest["layout"]["ep"] == 2
    slices = [(e["kind"], e["name"], e.get("begin", 0)) for e in manifest["tensors"]]
    assert len(slices) == len(set(slices)), "a slice was written by more than one rank"
    for name, cp, layout in (("load_cp1", 1, dict(replicas=1, ranks=1, ep=1)),
                             ("load_tp2_cp2", 2, dict(replicas=1, ranks=4, ep=1, tp=2))):
        d = deploy(name, cp, **layout)
        again = Run(d.stub, **LORA)
        assert again.ok(load_state_with_optimizer=pb.LoadStateOp(path=saved)).load_state.step == 2
        _, got = assemble(root, again.save("again"))
        assert_bitwise_equal(want, got, name)
        resumed = again.steps(batches[2:])
        assert abs(resumed[0] - losses[2]) <= 1e-5 * abs(losses[2]), (name, resumed, losses)
        d.close()


def test_save_and_load_refusals_and_corruption(make_deployment, tmp_path):
    root = str(tmp_path / "ckpt")
    d = _deploy(make_deployment, root, "refusals")
    run = Run(d.stub, **LORA)
    run.steps(_batches(1))
    path = run.save("a")
    for bad in ("", "a/b", "..", ".hidden", "x" * 129, "tab\there", "run.partial"):
        req = pb.SubmitRequest(run_id=run.id, seq_id=run.seq + 1, save_state=pb.SaveStateOp(name=bad))
        assert sc.rpc_error(d.stub.Submit, req) == Code.INVALID_ARGUMENT, bad
    for bad in ("", "a", "lathe://x/y/z", "lathe://r/weights/", "lathe://../weights/a", f"{path}/extra"):
        req = pb.SubmitRequest(run_id=run.id, seq_id=run.seq + 1, load_state=pb.LoadStateOp(path=bad))
        assert sc.rpc_error(d.stub.Submit, req) == Code.INVALID_ARGUMENT, bad

    again = run.op(save_state=pb.SaveStateOp(name="a"))
    assert again.state == Retrieve.FAILED and again.error.code == Code.ALREADY_EXISTS.value[0], again
    assert run.save("a", overwrite=True) == path
    missing = run.op(load_state=pb.LoadStateOp(path=f"lathe://{run.id}/weights/nope"))
    assert missing.state == Retrieve.FAILED and missing.error.code == Code.NOT_FOUND.value[0], missing

    probe = batch([datum(*sc.random_sequence(np.random.default_rng(3), 12))])
    before = run.ok(forward=probe)
    # One flipped byte inside a shard's tensor data.
    folder = os.path.join(root, run.id, "weights", "a")
    shard = os.path.join(folder, "node_rank-0", "rank-0.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    corrupt = run.op(load_state_with_optimizer=pb.LoadStateOp(path=path))
    assert corrupt.state == Retrieve.FAILED and corrupt.error.code == Code.DATA_LOSS.value[0], corrupt
    assert "rank-0.safetensors" in corrupt.error.message, corrupt.error.message
    os.remove(shard)
    gone = run.op(load_state=pb.LoadStateOp(path=path))
    assert gone.state == Retrieve.FAILED and gone.error.code == Code.DATA_LOSS.value[0], gone
    # Nothing was loaded: the run answers as before.
    assert run.ok(forward=probe) == before

    # A save that never committed (its rank died mid-way) is neither listed nor loadable.
    os.makedirs(os.path.join(root, run.id, "weights", "b.partial", "node_rank-0"))
    listed = d.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run.id), timeout=sc.RPC_TIMEOUT_S)
    assert [c.id for c in listed.checkpoints] == [path]


def test_sampler_weights_load_with_peft(make_deployment, tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = str(tmp_path / "ckpt")
    d = _deploy(make_deployment, root, "peft")
    run = Run(d.stub, **LORA)
    run.steps(_batches(2))  # lora_B away from zero
    saved = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="s")).save_weights_for_sampler
    assert saved.path == f"lathe://{run.id}/sampler_weights/s" and saved.policy_version == 1
    info = d.stub.GetInfo(pb.GetInfoRequest(run_id=run.id), timeout=sc.RPC_TIMEOUT_S)
    assert info.policy_version == 1
    again = run.op(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="s"))
    assert again.state == Retrieve.FAILED and again.error.code == Code.ALREADY_EXISTS.value[0], again
    with_merged = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="m", merged=True))
    assert with_merged.save_weights_for_sampler.policy_version == 2

    tokens, targets = sc.random_sequence(np.random.default_rng(8), 24)
    lathe_lp = sc.logprobs(run.ok(forward=batch([datum(tokens, targets)])).forward_backward)[0]

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager")
    model = PeftModel.from_pretrained(base, os.path.join(root, run.id, "sampler_weights", "s")).eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(tokens)])).logits[0].float()
    peft_lp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].numpy()
    np.testing.assert_allclose(peft_lp, lathe_lp, atol=1e-4, rtol=0)
    # The adapter matters: without it the logprobs differ.
    with torch.no_grad(), model.disable_adapter():
        plain = torch.log_softmax(model(torch.tensor([list(tokens)])).logits[0].float(), -1)
    assert np.abs(plain[torch.arange(len(targets)), torch.tensor(targets)].numpy() - lathe_lp).max() > 1e-3

    # The merged model loads as a plain transformers model and gives the same logprobs.
    merged_dir = os.path.join(root, run.id, "sampler_weights", "m", "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager").eval()
    with torch.no_grad():
        logits = merged(torch.tensor([list(tokens)])).logits[0].float()
    merged_lp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].numpy()
    np.testing.assert_allclose(merged_lp, lathe_lp, atol=1e-4, rtol=0)


def _tied_moe_with_a_dense_layer(out):
    """A sharded Qwen3-MoE folder with tied embeddings whose layer 1 is dense (mlp_only_layers)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=sc.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                            mlp_only_layers=[1], norm_topk_prob=True, tie_word_embeddings=True,
                            max_position_embeddings=128, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.3 if name.endswith("mlp.gate.weight") else 0.1)
    model.save_pretrained(out, max_shard_size="200KB")
    return out


def test_sampler_weights_of_a_tied_moe_with_a_dense_layer(make_deployment, tmp_path):
    """save_weights_for_sampler on a tied model with dense and MoE layers: the adapter loads
    with peft and the merged folder with transformers, both with lathe's logprobs, and the
    save leaves nothing but its folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = _tied_moe_with_a_dense_layer(str(tmp_path / "model"))
    root = str(tmp_path / "ckpt")
    d = _deploy(make_deployment, root, "peft_tied", model_dir=model_dir)
    run = Run(d.stub, **LORA)
    run.steps(_batches(2))
    run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="s", merged=True))
    folder = os.path.join(root, run.id, "sampler_weights")
    assert sorted(os.listdir(folder)) == ["s"]
    assert sorted(os.listdir(os.path.join(folder, "s"))) == [
        "adapter_config.json", "adapter_model.safetensors", "lathe", "lathe_sampler.json", "merged"]

    rng = np.random.default_rng(8)
    probes = [sc.random_sequence(rng, n) for n in (24, 11)]
    lathe_lp = sc.logprobs(run.ok(forward=batch([datum(t, y) for t, y in probes])).forward_backward)

    def logprobs(model):
        out = []
        with torch.no_grad():
            for tokens, targets in probes:
                logits = model(torch.tensor([list(tokens)])).logits[0].float()
                out.append(torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].numpy())
        return out

    kw = dict(dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, **kw),
                                           os.path.join(folder, "s")).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "s", "merged"), **kw).eval()
    for name, got in (("peft", logprobs(peft_model)), ("merged", logprobs(merged))):
        for g, want in zip(got, lathe_lp):
            np.testing.assert_allclose(g, want, atol=1e-4, rtol=0, err_msg=name)
    with peft_model.disable_adapter():
        plain = logprobs(peft_model)
    assert max(np.abs(p - w).max() for p, w in zip(plain, lathe_lp)) > 1e-3


def test_files_download_delete_and_expiry(make_deployment, tmp_path):
    root = str(tmp_path / "ckpt")
    d = _deploy(make_deployment, root, "files")
    run = Run(d.stub, **LORA)
    run.steps(_batches(1))
    path = run.save("a")
    folder = os.path.join(root, run.id, "weights", "a")
    names, token = [], ""
    while True:  # one file per page
        page = d.stub.GetCheckpointFiles(pb.GetCheckpointFilesRequest(checkpoint_id=path, page_size=1,
                                                                      page_token=token), timeout=sc.RPC_TIMEOUT_S)
        assert page.total_count == 3 and len(page.files) == 1
        f = page.files[0]
        names.append(f.relative_file_name)
        assert f.size_bytes == os.path.getsize(os.path.join(folder, f.relative_file_name))
        assert f.node_rank == (0 if f.relative_file_name.startswith("node_rank-0/") else -1)
        token = page.next_page_token
        if not token:
            break
    assert names == ["manifest.json", "node_rank-0/rank-0.safetensors", "node_rank-0/rank-1.safetensors"]
    for name in names:
        chunks = d.stub.DownloadCheckpointFile(
            pb.DownloadCheckpointFileRequest(checkpoint_id=path, relative_file_name=name), timeout=sc.RPC_TIMEOUT_S)
        with open(os.path.join(folder, name), "rb") as f:
            assert b"".join(c.data for c in chunks) == f.read(), name
    for bad, code in (("../../manifest.json", Code.INVALID_ARGUMENT), ("/etc/passwd", Code.INVALID_ARGUMENT),
                      ("node_rank-0", Code.NOT_FOUND)):
        assert _download_error(d.stub, path, bad) == code, bad

    run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="s"))
    listed = d.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run.id), timeout=sc.RPC_TIMEOUT_S)
    kinds = {c.id: c.type for c in listed.checkpoints}
    assert kinds == {path: "training", f"lathe://{run.id}/sampler_weights/s": "sampler"}, kinds
    assert all(c.sync_state == "committed" and c.size_bytes > 0 for c in listed.checkpoints)

    d.stub.DeleteCheckpoint(pb.DeleteCheckpointRequest(checkpoint_id=path), timeout=sc.RPC_TIMEOUT_S)
    assert sc.rpc_error(d.stub.DeleteCheckpoint, pb.DeleteCheckpointRequest(checkpoint_id=path)) == Code.NOT_FOUND
    gone = run.op(load_state=pb.LoadStateOp(path=path))
    assert gone.state == Retrieve.FAILED and gone.error.code == Code.NOT_FOUND.value[0], gone

    short = run.save("short", ttl_seconds=1)
    short_sampler = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(
        name="short", ttl_seconds=1)).save_weights_for_sampler.path
    req = pb.ListCheckpointsRequest(run_id=run.id)
    ids = lambda: [c.id for c in d.stub.ListCheckpoints(req, timeout=sc.RPC_TIMEOUT_S).checkpoints]  # noqa: E731
    assert short in ids() and short_sampler in ids()
    deadline = time.monotonic() + 15  # the coordinator looks for expired checkpoints every 5 s
    while short in ids() or short_sampler in ids():
        assert time.monotonic() < deadline, "checkpoints with a 1 s TTL are still listed after 15 s"
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(root, run.id, "weights", "short"))
    assert not os.path.exists(os.path.join(root, run.id, "sampler_weights", "short"))
    assert f"lathe://{run.id}/sampler_weights/s" in ids()  # no TTL: kept


def test_a_rank_killed_during_a_save_leaves_earlier_checkpoints_intact(make_deployment, tmp_path):
    import signal

    root = str(tmp_path / "ckpt")
    d = _deploy(make_deployment, root, "kill_save", worker_env={"LATHE_TEST_SAVE_PAUSE_MS": "4000"})
    run = Run(d.stub, **LORA)
    run.steps(_batches(1))
    good = run.save("good")
    run.seq += 1
    op_id = sc.submit(d.stub, run.id, run.seq, save_state=pb.SaveStateOp(name="bad"))
    partial = os.path.join(root, run.id, "weights", "bad.partial")
    deadline = time.monotonic() + 20
    while not (os.path.isdir(partial) and any(f.endswith(".safetensors")
                                              for _, _, fs in os.walk(partial) for f in fs)):
        assert time.monotonic() < deadline, "the save wrote no shard within 20 s"
        time.sleep(0.05)
    os.kill(d.worker_pids()[1], signal.SIGKILL)  # while the save waits to commit
    r = sc.wait(d.stub, op_id, timeout=20)
    assert r.state == Retrieve.FAILED and r.error.code == Code.UNAVAILABLE.value[0], r
    d.close()

    fresh = _deploy(make_deployment, root, "after_kill")
    listed = fresh.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run.id), timeout=sc.RPC_TIMEOUT_S)
    assert [c.id for c in listed.checkpoints] == [good]
    again = Run(fresh.stub, **LORA)
    assert again.ok(load_state_with_optimizer=pb.LoadStateOp(path=good)).load_state.step == 1
    bad = again.op(load_state=pb.LoadStateOp(path=f"lathe://{run.id}/weights/bad"))
    assert bad.state == Retrieve.FAILED and bad.error.code == Code.NOT_FOUND.value[0], bad


def test_links_corrupt_manifests_and_huge_ttls(make_deployment, tmp_path):
    """Links in the checkpoint root lead nowhere, a corrupt manifest is skipped (the
    coordinator survives its expiry sweeps), and a TTL of INT64_MAX means never."""
    int64_max = 2**63 - 1
    root = str(tmp_path / "ckpt")
    d = _deploy(make_deployment, root, "links")
    run = Run(d.stub, **LORA)
    run.steps(_batches(1))
    forever = run.save("forever", ttl_seconds=int64_max)
    forever_sampler = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(
        name="forever", ttl_seconds=int64_max)).save_weights_for_sampler.path
    nearly = run.save("nearly", ttl_seconds=int64_max // 1000 - 1)
    path = run.save("c")
    bad = run.save("bad")

    folder = os.path.join(root, run.id, "weights", "c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not part of any checkpoint")
    os.symlink(outside / "secret.txt", os.path.join(folder, "hostname"))
    os.symlink(outside, os.path.join(folder, "node_rank-7"))
    os.symlink(outside, os.path.join(root, run.id, "weights", "linked"))
    manifest = os.path.join(root, run.id, "weights", "bad", "manifest.json")
    with open(manifest) as f:
        m = json.load(f)
    m["expires_unix_ms"] = "never"
    with open(manifest, "w") as f:
        json.dump(m, f)

    files = d.stub.GetCheckpointFiles(pb.GetCheckpointFilesRequest(checkpoint_id=path), timeout=sc.RPC_TIMEOUT_S)
    assert [f.relative_file_name for f in files.files] == [
        "manifest.json", "node_rank-0/rank-0.safetensors", "node_rank-0/rank-1.safetensors"]
    for name in ("hostname", "node_rank-7/secret.txt"):
        assert _download_error(d.stub, path, name) == Code.NOT_FOUND, name
    assert _download_error(d.stub, f"lathe://{run.id}/weights/linked", "secret.txt") == Code.NOT_FOUND
    assert sc.rpc_error(d.stub.GetCheckpointFiles, pb.GetCheckpointFilesRequest(checkpoint_id=bad)) == Code.DATA_LOSS
    assert _download_error(d.stub, bad, "manifest.json") == Code.DATA_LOSS

    time.sleep(6)  # at least one expiry sweep (every 5 s) over the corrupt manifest and the huge TTLs
    assert d.stub.Health(pb.HealthRequest(), timeout=sc.RPC_TIMEOUT_S).state == pb.HealthResponse.SERVING
    listed = {c.id: c for c in d.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run.id),
                                                      timeout=sc.RPC_TIMEOUT_S).checkpoints}
    assert set(listed) == {forever, forever_sampler, nearly, path}, sorted(listed)
    assert listed[forever].expires_unix_ms == int64_max
    assert listed[forever_sampler].expires_unix_ms == int64_max
    assert listed[nearly].expires_unix_ms > time.time() * 1000 + 1e15
    assert listed[path].expires_unix_ms == 0
    assert (outside / "secret.txt").exists()
    d.stub.DeleteCheckpoint(pb.DeleteCheckpointRequest(checkpoint_id=bad), timeout=sc.RPC_TIMEOUT_S)
    assert not os.path.exists(os.path.dirname(manifest))
