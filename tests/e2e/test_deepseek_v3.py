"""A DeepSeek-V3 model (latent attention, sigmoid-routed experts) through the service with
tensor and expert parallelism: LoRA training steps, then greedy sampling with the trained
adapter (each rank decoding its heads from the latent cache) equals peft + transformers'
``generate`` on the exported sampler weights."""

from __future__ import annotations

import os
import struct
import sys
import warnings

import numpy as np
import pytest

import service_client as sc
from service_client import Retrieve, adam, batch, datum, pb, types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))

import make_tiny_models  # noqa: E402

PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]


@pytest.fixture(scope="module")
def deepseek_model(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("deepseek") / "deepseek_v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model("deepseek_v3", out, seed=0)
    return out


def _ok(stub, run_id, seq, **kw):
    r = sc.wait(stub, sc.submit(stub, run_id, seq, **kw), timeout=120)
    assert r.state == Retrieve.DONE, r
    return r.result


def _prompt():
    m = types.ModelInput()
    m.chunks.add().encoded_text.tokens = struct.pack(f"<{len(PROMPT)}i", *PROMPT)
    return m


@pytest.mark.parametrize("tp,ep", [(2, 2)])
def test_trained_adapter_greedy_equals_peft_generate(make_deployment, deepseek_model, tmp_path, tp, ep):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]
    d = make_deployment("deepseek", model_dir=deepseek_model, replicas=1, ranks=4, tp=tp, ep=ep,
                        worker_args=args, coordinator_args=args).start()
    run_id = sc.create_run(d.stub, rank=8, seed=4)
    rng = np.random.default_rng(9)
    seq = 0
    for _ in range(2):
        data = []
        for n in (14, 9):
            seq_tokens = rng.integers(0, 157, size=n + 1)
            data.append(datum(seq_tokens[:-1].astype(np.int32), seq_tokens[1:].astype(np.int64)))
        seq += 1
        _ok(d.stub, run_id, seq, forward_backward=batch(data))
        seq += 1
        _ok(d.stub, run_id, seq, optim_step=adam(learning_rate=3e-2))
    seq += 1
    saved = _ok(d.stub, run_id, seq, save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="g"))
    seq += 1
    sample = _ok(d.stub, run_id, seq, sample=pb.SampleOp(
        prompt=_prompt(), num_samples=1, policy_version=saved.save_weights_for_sampler.policy_version,
        params=pb.SamplingParams(max_tokens=12, temperature=0.0))).sample
    b = sample.sequences[0].tokens
    got = list(struct.unpack(f"<{len(b) // 4}i", b))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(deepseek_model, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager")
        model = PeftModel.from_pretrained(base, os.path.join(root, run_id, "sampler_weights", "g")).eval()
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
        with model.disable_adapter():
            plain = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    assert got == want
    assert plain != want, "the adapter should change the greedy continuation (train it harder)"
