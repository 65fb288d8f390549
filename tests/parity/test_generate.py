"""Generation with the KV cache (runtime/generate.h) against transformers: greedy
tokens equal ``generate`` (greedy), and the logprobs the sampler reports equal the
model's on the sampled sequence."""

from __future__ import annotations

import pytest
import torch

from reference import load_hf_model

PROMPT = [5, 17, 3, 42, 8, 99, 23]


def _hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """logprob of tokens[i] after tokens[:i], for i >= 1."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1)
    return lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_greedy_equals_transformers_generate(kind, tiny_models, harness):
    model_dir = tiny_models[kind]
    res = harness(model_dir, {"lora": {"rank": 0}, "ops": [
        {"op": "generate", "prompt": PROMPT, "num_samples": 2, "max_tokens": 12, "temperature": 0}]})
    hf = load_hf_model(model_dir)
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    for n in range(2):
        got = res.tensors[f"op0.sample{n}.tokens"].long().tolist()
        assert got == want, (n, got, want)
    full = PROMPT + want
    ref = _hf_logprobs(hf, full)
    torch.testing.assert_close(res.tensors["op0.sample0.logprobs"], ref[len(PROMPT) - 1:], atol=1e-4, rtol=0)
    prompt_lp = res.tensors["op0.prompt_logprobs"]
    assert torch.isnan(prompt_lp[0])
    torch.testing.assert_close(prompt_lp[1:], ref[:len(PROMPT) - 1], atol=1e-4, rtol=0)


def test_sampled_logprobs_equal_the_models_and_seeds_decide(tiny_models, harness):
    model_dir = tiny_models["qwen3_moe"]
    op = {"op": "generate", "prompt": PROMPT, "num_samples": 3, "max_tokens": 10, "temperature": 1.0,
          "top_k": 50, "top_p": 0.95, "seed": 7}
    res = harness(model_dir, {"lora": {"rank": 0}, "ops": [op, op, dict(op, seed=8)]})
    hf = load_hf_model(model_dir)
    samples = [res.tensors[f"op0.sample{n}.tokens"].long().tolist() for n in range(3)]
    assert len({tuple(s) for s in samples}) == 3, f"the samples of one request should differ: {samples}"
    for n in range(3):
        assert res.tensors[f"op1.sample{n}.tokens"].long().tolist() == samples[n], "same seed, other tokens"
        ref = _hf_logprobs(hf, PROMPT + samples[n])[len(PROMPT) - 1:]
        torch.testing.assert_close(res.tensors[f"op0.sample{n}.logprobs"], ref, atol=1e-4, rtol=0)
    assert [res.tensors[f"op2.sample{n}.tokens"].long().tolist() for n in range(3)] != samples


def test_stop_sequences_end_samples(tiny_models, harness):
    model_dir = tiny_models["qwen3"]
    greedy = harness(model_dir, {"lora": {"rank": 0}, "ops": [
        {"op": "generate", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}]})
    tokens = greedy.tensors["op0.sample0.tokens"].long().tolist()
    stop = tokens[2:4]
    res = harness(model_dir, {"lora": {"rank": 0}, "ops": [
        {"op": "generate", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": [[255, 254], stop]}]})
    got = res.tensors["op0.sample0.tokens"].long().tolist()
    first = next(i for i in range(1, len(tokens)) if tokens[i - 1:i + 1] == stop)
    assert got == tokens[:first + 1] and res.meta["op0.sample0.stopped"] == "1"
    assert greedy.meta["op0.sample0.stopped"] == "0"


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(top_k=-2),
                                 dict(temperature=-1.0), dict(max_tokens=0), dict(prompt=[]),
                                 dict(num_samples=0)])
def test_bad_sampling_requests_are_refused(bad, tiny_models, harness):
    op = dict({"op": "generate", "prompt": PROMPT, "max_tokens": 4}, **bad)
    res = harness(tiny_models["qwen3"], {"lora": {"rank": 0}, "ops": [op]}, expect_rc=3)
    assert "INVALID_ARGUMENT" in res.stderr, res.stderr
