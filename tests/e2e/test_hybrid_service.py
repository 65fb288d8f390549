"""Tiny Qwen3.5 and Qwen3.5-MoE (Gated DeltaNet hybrids) through the whole service, sharded:
the base model's logprobs equal transformers', the reported loss is the summed negative
logprob, the trained adapter exported for sampling loads in peft (and merged in
transformers) with the service's logprobs, greedy sampling equals transformers' generate
on that export, and a checkpoint saved under one layout resumes bit-exactly under another
with the same next loss."""

from __future__ import annotations

import os
import struct
import sys

import numpy as np
import pytest

import service_client as sc
from checkpoint_run import Run, assemble, assert_bitwise_equal
from service_client import batch, datum, pb, types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "parity"))
import make_tiny_models  # noqa: E402

# Each kind's deployment: Qwen3.5 over 2 replicas x tp 2 (DeltaNet heads and conv channels
# cut), Qwen3.5-MoE over 2 replicas x ep 2; each resumes on one rank.
LAYOUTS = {
    "qwen3_5": dict(replicas=2, ranks=4, tp=2, ep=1),
    "qwen3_5_moe": dict(replicas=2, ranks=4, tp=1, ep=2),
}
LORA = dict(rank=8, seed=7)
PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]


@pytest.fixture(scope="module")
def hybrid_models(tmp_path_factory):
    out = {}
    for kind in LAYOUTS:
        folder = str(tmp_path_factory.mktemp(kind) / "model")
        model = make_tiny_models.make_model(kind, folder, seed=0)
        out[kind] = (folder, model.config.vocab_size)
    return out


def _sequences(rng, vocab, lengths):
    return [rng.integers(0, vocab, size=n + 1) for n in lengths]


def _datums(seqs):
    return [datum([int(t) for t in s[:-1]], [int(t) for t in s[1:]]) for s in seqs]


def _hf_logprobs(model, seq):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([[int(t) for t in seq[:-1]]])).logits[0].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].numpy()


def _load(folder, peft_dir=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager")
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft_dir)
    return model.eval()


def _prompt():
    m = types.ModelInput()
    m.chunks.add().encoded_text.tokens = struct.pack(f"<{len(PROMPT)}i", *PROMPT)
    return m


def _greedy(model, n):
    import torch

    with torch.no_grad():
        return model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_hybrid_trains_samples_checkpoints_and_exports_through_the_service(kind, hybrid_models, make_deployment,
                                                                         tmp_path):
    folder, vocab = hybrid_models[kind]
    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]

    def deploy(name, **layout):
        return make_deployment(name, model_dir=folder, max_runs=2, worker_args=args, coordinator_args=args,
                               **layout).start()

    d = deploy(f"{kind}_sharded", **LAYOUTS[kind])
    run = Run(d.stub, **LORA)
    rng = np.random.default_rng(3)

    # The base model (every lora_B starts at zero): logprobs equal transformers' on packed datums.
    probe = _sequences(rng, vocab, (23, 9, 40))
    fwd = run.ok(forward=batch(_datums(probe))).forward_backward
    base = _load(folder)
    for got, seq in zip(sc.logprobs(fwd), probe):
        np.testing.assert_allclose(got, _hf_logprobs(base, seq), atol=1e-4, rtol=0)

    # Training: the reported loss is the summed negative logprob of the targets.
    train = [_sequences(rng, vocab, (17, 30, 6, 12)) for _ in range(3)]
    for seqs in train:
        out = run.ok(forward_backward=batch(_datums(seqs))).forward_backward
        total = -sum(float(lp.sum()) for lp in sc.logprobs(out))
        assert abs(out.metrics["loss:sum"] - total) <= 1e-5 * abs(total), (out.metrics["loss:sum"], total)
        run.ok(optim_step=sc.adam(learning_rate=3e-2))

    # The exports: the adapter in peft, the merged model in transformers, both at the service's logprobs.
    saved = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="s")).save_weights_for_sampler
    run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="m", merged=True))
    trained = sc.logprobs(run.ok(forward=batch(_datums(probe))).forward_backward)
    peft_model = _load(folder, os.path.join(root, run.id, "sampler_weights", "s"))
    merged = _load(os.path.join(root, run.id, "sampler_weights", "m", "merged"))
    for got, seq in zip(trained, probe):
        np.testing.assert_allclose(_hf_logprobs(peft_model, seq), got, atol=1e-4, rtol=0)
        np.testing.assert_allclose(_hf_logprobs(merged, seq), got, atol=1e-4, rtol=0)
    assert max(np.abs(a - b).max() for a, b in zip(trained, sc.logprobs(fwd))) > 1e-3, "training changed nothing"

    # Greedy sampling with the recurrent state cache equals transformers' generate on the export.
    sample = run.ok(sample=pb.SampleOp(prompt=_prompt(), num_samples=2, policy_version=saved.policy_version,
                                       params=pb.SamplingParams(max_tokens=10, temperature=0.0))).sample
    want = _greedy(peft_model, 10)
    for seq in sample.sequences:
        assert list(struct.unpack(f"<{len(seq.tokens) // 4}i", seq.tokens)) == want

    # A checkpoint saved under this layout resumes under one rank: the same tensors bit for
    # bit (adapters and Adam moments) and the same next loss.
    path = run.save("c")
    nxt = batch(_datums(_sequences(rng, vocab, (11, 25))))
    want_loss = run.ok(forward_backward=nxt).forward_backward.metrics["loss:sum"]
    d.close()
    _, want_tensors = assemble(root, path)
    one = deploy(f"{kind}_one", replicas=1, ranks=1, tp=1, ep=1)
    again = Run(one.stub, **LORA)
    assert again.ok(load_state_with_optimizer=pb.LoadStateOp(path=path)).load_state.step == 3
    _, got_tensors = assemble(root, again.save("again"))
    assert_bitwise_equal(want_tensors, got_tensors, f"{kind} resumed on one rank")
    got_loss = again.ok(forward_backward=nxt).forward_backward.metrics["loss:sum"]
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss), (got_loss, want_loss)
