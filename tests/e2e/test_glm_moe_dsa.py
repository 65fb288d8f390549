"""A GLM-5 model (latent attention made sparse by the DeepSeek sparse-attention indexer,
sigmoid-routed experts) through the service with tensor and expert parallelism, on documents
longer than its index_topk (8), in full precision and with a block-FP8 base as GLM-5-FP8
stores it (every linear F8_E4M3 with a scale per 32 x 48 block, blocks cut by the tp split;
dequantized on load): LoRA training steps, a checkpoint whose resumed run repeats the
straight run's next loss exactly, and greedy sampling past index_topk with the trained
adapter (each rank decoding its heads from the latent and indexer caches) that equals peft +
transformers' ``generate`` on the exported sampler weights (on the exact dequantization of
the FP8 base). The merged export of an adapter on FP8 weights is refused, naming one, with
nothing written. LoRA steps with each document split over two ranks (context parallelism)
give one rank's losses."""

from __future__ import annotations

import os
import struct
import sys
import warnings

import grpc
import numpy as np
import pytest

import service_client as sc
from checkpoint_run import Run
from service_client import Retrieve, batch, datum, pb, types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))

import make_tiny_models  # noqa: E402
import quantize_checkpoint as Q  # noqa: E402

PROMPT = [5, 17, 3, 42, 8, 99, 23, 61, 7, 130]


@pytest.fixture(scope="module")
def glm_model(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("glm") / "glm_moe_dsa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model("glm_moe_dsa", out, seed=0)
    return out


@pytest.fixture(scope="module", params=["plain", "fp8"])
def base(request, glm_model, tmp_path_factory) -> tuple[str, str, list]:
    """(the folder the deployment loads, the folder transformers loads, the quantized weights)."""
    if request.param == "plain":
        return glm_model, glm_model, []
    root = tmp_path_factory.mktemp("glm_fp8")
    q, d = str(root / "fp8"), str(root / "deq")
    done = Q.write_fp8(glm_model, q, (32, 48), dequantized_dir=d)
    assert any(".experts." in n for n in done) and any(".indexer." in n for n in done)
    return q, d, done


def _batches(count):
    rng = np.random.default_rng(9)
    out = []
    for _ in range(count):
        data = []
        for n in (14, 9, 21):
            tokens = rng.integers(0, 167, size=n + 1)
            data.append(datum(tokens[:-1].astype(np.int32), tokens[1:].astype(np.int64)))
        out.append(batch(data))
    return out


def _prompt():
    m = types.ModelInput()
    m.chunks.add().encoded_text.tokens = struct.pack(f"<{len(PROMPT)}i", *PROMPT)
    return m


def _generate(model, **kw):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return out[0, len(PROMPT):].tolist()


def test_train_checkpoint_resume_and_greedy_equal_peft_generate(make_deployment, base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    served, reference, quantized = base
    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]
    d = make_deployment("glm", model_dir=served, replicas=1, ranks=4, tp=2, ep=2, max_runs=2,
                        worker_args=args, coordinator_args=args).start()
    lora = dict(rank=8, seed=4)
    batches = _batches(3)
    run = Run(d.stub, **lora)
    losses = run.steps(batches[:2], lr=3e-2)
    mid = run.save("mid")
    losses += run.steps(batches[2:], lr=3e-2)
    resumed = Run(d.stub, **lora)
    assert resumed.ok(load_state_with_optimizer=pb.LoadStateOp(path=mid)).load_state.step == 2
    assert resumed.steps(batches[2:], lr=3e-2) == losses[2:], "the resumed run's step differs"

    folder = os.path.join(root, run.id, "sampler_weights")
    if quantized:
        merged = run.op(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="m", merged=True))
        assert merged.state == Retrieve.FAILED, merged
        assert merged.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], merged
        assert "F8_E4M3" in merged.error.message and "quantized" in merged.error.message, merged.error.message
        assert any(n in merged.error.message for n in quantized), merged.error.message
        assert not os.path.exists(os.path.join(folder, "m")), "a refused merged export left files"
    probe = np.random.default_rng(5).integers(0, 167, size=21)
    lathe_lp = sc.logprobs(run.ok(forward=batch([datum(probe[:-1].astype(np.int32),
                                                      probe[1:].astype(np.int64))])).forward_backward)[0]
    saved = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="g"))
    sample = run.ok(sample=pb.SampleOp(
        prompt=_prompt(), num_samples=1, policy_version=saved.save_weights_for_sampler.policy_version,
        params=pb.SamplingParams(max_tokens=12, temperature=0.0))).sample
    b = sample.sequences[0].tokens
    got = list(struct.unpack(f"<{len(b) // 4}i", b))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager")
        model = PeftModel.from_pretrained(hf, os.path.join(folder, "g")).eval()
        check = model.load_adapter(os.path.join(folder, "g"), adapter_name="check")
    assert not check.missing_keys and not check.unexpected_keys, check
    model.delete_adapter("check")
    want = _generate(model)
    with model.disable_adapter():
        plain = _generate(model)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([probe[:-1].tolist()])).logits[0].float()
    peft_lp = torch.log_softmax(logits, -1)[torch.arange(len(probe) - 1), torch.tensor(probe[1:])].numpy()
    np.testing.assert_allclose(lathe_lp, peft_lp, atol=1e-4, rtol=0)
    assert got == want
    assert plain != want, "the adapter should change the greedy continuation (train it harder)"


def test_context_parallel_training_matches_one_rank(make_deployment, glm_model):
    """dp_worker --cp 2 splits each document over two ranks (with ep 2 over them): the indexer
    selects each rank's queries' keys among the gathered keys of the whole document, so the
    LoRA steps' losses equal one rank's."""
    batches = _batches(3)
    losses = {}
    for name, cp, layout in (("glm_cp1", 1, dict(ranks=1, ep=1)), ("glm_cp2", 2, dict(ranks=2, ep=2))):
        d = make_deployment(name, model_dir=glm_model, replicas=1, max_runs=1, worker_args=["--cp", str(cp)],
                            **layout).start()
        losses[name] = Run(d.stub, rank=8, seed=4).steps(batches, lr=3e-2)
        d.close()
    want, got = losses["glm_cp1"], losses["glm_cp2"]
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want)), (got, want)
