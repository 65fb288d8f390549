"""What the latent-attention end-to-end tests (DeepSeek-V3 / Kimi, GLM-5) share: random
batches, the greedy prompt, and one run through the service — LoRA steps, a checkpoint whose
resumed run repeats the straight run's next loss exactly, the merged export of a quantized
base refused, a probe's logprobs, greedy sampling with the trained adapter — compared with
peft + transformers on the exported adapter."""

from __future__ import annotations

import os
import struct
import warnings
from typing import Callable

import grpc
import numpy as np

import service_client as sc
from checkpoint_run import Run
from service_client import Retrieve, batch, datum, pb, types

GREEDY_TOKENS = 12


def random_datum(seed: int, n: int, vocab: int):
    seq = np.random.default_rng(seed).integers(0, vocab, size=n + 1)
    return seq[:-1].astype(np.int32), seq[1:].astype(np.int64)


def random_batches(count: int, lengths, vocab: int):
    rng = np.random.default_rng(9)
    out = []
    for _ in range(count):
        data = []
        for n in lengths:
            tokens = rng.integers(0, vocab, size=n + 1)
            data.append(datum(tokens[:-1].astype(np.int32), tokens[1:].astype(np.int64)))
        out.append(batch(data))
    return out


def prompt_input(prompt) -> types.ModelInput:
    m = types.ModelInput()
    m.chunks.add().encoded_text.tokens = struct.pack(f"<{len(prompt)}i", *prompt)
    return m


def greedy(model, prompt, **kw) -> list:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([list(prompt)]), max_new_tokens=GREEDY_TOKENS,
                             min_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                             **kw)
    return out[0, len(prompt):].tolist()


def logprobs(model, tokens, targets) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens.tolist()])).logits[0].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].numpy()


def check_against_peft(deployment, root: str, batches, probe, prompt, load_reference: Callable,
                       merge_refusal: Callable | None = None, adapter_names: Callable | None = None) -> None:
    """Trains on ``batches`` (two steps, a checkpoint, the rest; the resumed run must repeat
    them exactly), then checks the probe's logprobs and greedy sampling of ``prompt`` against
    peft on ``load_reference()`` with the exported adapter. ``merge_refusal``: for a quantized
    base, whose merged export is refused, called with the refusal's message. ``adapter_names``:
    called with the exported adapter's tensor names."""
    from peft import PeftModel
    from safetensors import safe_open

    lora = dict(rank=8, seed=4)
    run = Run(deployment.stub, **lora)
    losses = run.steps(batches[:2], lr=3e-2)
    mid = run.save("mid")
    losses += run.steps(batches[2:], lr=3e-2)
    resumed = Run(deployment.stub, **lora)
    assert resumed.ok(load_state_with_optimizer=pb.LoadStateOp(path=mid)).load_state.step == 2
    assert resumed.steps(batches[2:], lr=3e-2) == losses[2:], "the resumed run's step differs"

    folder = os.path.join(root, run.id, "sampler_weights")
    if merge_refusal is not None:
        merged = run.op(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="m", merged=True))
        assert merged.state == Retrieve.FAILED, merged
        assert merged.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], merged
        assert "quantized" in merged.error.message, merged.error.message
        merge_refusal(merged.error.message)
        assert not os.path.exists(os.path.join(folder, "m")), "a refused merged export left files"
    lathe_lp = sc.logprobs(run.ok(forward=batch([datum(*probe)])).forward_backward)[0]
    saved = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="g"))
    sample = run.ok(sample=pb.SampleOp(
        prompt=prompt_input(prompt), num_samples=1, policy_version=saved.save_weights_for_sampler.policy_version,
        params=pb.SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0))).sample
    b = sample.sequences[0].tokens
    got = list(struct.unpack(f"<{len(b) // 4}i", b))

    adapter = os.path.join(folder, "g")
    if adapter_names is not None:
        with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
            adapter_names(list(f.keys()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_reference(), adapter).eval()
        check = model.load_adapter(adapter, adapter_name="check")
    assert not check.missing_keys and not check.unexpected_keys, check
    model.delete_adapter("check")
    want = greedy(model, prompt)
    with model.disable_adapter():
        plain = greedy(model, prompt)
    np.testing.assert_allclose(lathe_lp, logprobs(model, *probe), atol=1e-4, rtol=0)
    assert got == want
    assert plain != want, "the adapter should change the greedy continuation (train it harder)"
