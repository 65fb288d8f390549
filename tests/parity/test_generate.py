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


# Qwen3.5 / Qwen3.5-MoE (Gated DeltaNet + gated attention): prompts shorter than, longer than
# one and longer than two 64-token chunks of the delta rule, decoded together.
HYBRID_KINDS = ("qwen3_5", "qwen3_5_moe")
# DeepSeek-V3 (latent attention; transformers caches the latent, lathe each head's keys and
# values) with the same requests, and GLM-5 (the same with the sparse-attention indexer,
# whose keys both cache: prompts shorter and longer than its index_topk of 8, decoded past it).
DECODE_KINDS = HYBRID_KINDS + ("deepseek_v3", "deepseek_v3_grouped", "glm_moe_dsa")


def _hybrid_requests(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(1, vocab, (80,), generator=g).tolist()
    longer_prompt = torch.randint(1, vocab, (131,), generator=g).tolist()
    return [
        {"prompt": PROMPT, "num_samples": 2, "max_tokens": 12, "temperature": 0, "topk_prompt_logprobs": 3},
        {"prompt": long_prompt, "num_samples": 1, "max_tokens": 10, "temperature": 0},
        {"prompt": longer_prompt, "num_samples": 1, "max_tokens": 6, "temperature": 0, "topk_prompt_logprobs": 2},
        {"prompt": [9, 4], "num_samples": 3, "max_tokens": 9, "temperature": 1.0, "top_k": 20, "seed": 3},
    ]


def _vocab(model_dir: str) -> int:
    import json
    import os

    return json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]


def _request_out(res, tag: str, request: dict) -> dict:
    return {"tokens": [res.tensors[f"{tag}.sample{n}.tokens"].long().tolist() for n in range(request["num_samples"])],
            "logprobs": [res.tensors[f"{tag}.sample{n}.logprobs"] for n in range(request["num_samples"])],
            "prompt_logprobs": res.tensors[f"{tag}.prompt_logprobs"],
            "topk_ids": res.tensors.get(f"{tag}.topk_ids"), "topk_logprobs": res.tensors.get(f"{tag}.topk_logprobs")}


def _assert_bitwise_same(a: dict, b: dict, what: str):
    assert a["tokens"] == b["tokens"], what
    for x, y in zip(a["logprobs"], b["logprobs"]):
        assert torch.equal(x, y), f"{what}: logprobs differ by {float((x - y).abs().max())}"
    # Bit patterns: the NaN of position 0 included.
    assert torch.equal(a["prompt_logprobs"].view(torch.int32), b["prompt_logprobs"].view(torch.int32)), what
    for key in ("topk_ids", "topk_logprobs"):
        assert (a[key] is None) == (b[key] is None), what
        if a[key] is not None:
            assert torch.equal(a[key], b[key]), what


@pytest.mark.parametrize("kind", DECODE_KINDS)
def test_hybrid_greedy_batch_equals_transformers_generate(kind, tiny_models, harness):
    """Several requests decoded together (prompts within and beyond one and two delta-rule
    chunks): greedy tokens equal transformers' generate, the logprobs, prompt logprobs and
    top-k prompt logprobs equal the model's."""
    model_dir = tiny_models[kind]
    requests = _hybrid_requests(_vocab(model_dir))
    res = harness(model_dir, {"lora": {"rank": 0}, "ops": [{"op": "generate_batch", "requests": requests}]})
    hf = load_hf_model(model_dir)
    for r, request in enumerate(requests):
        got = _request_out(res, f"op0.req{r}", request)
        prompt = request["prompt"]
        assert res.meta[f"op0.req{r}.batched_requests"] == str(len(requests))
        if request["temperature"] == 0:
            with torch.no_grad():
                want = hf.generate(torch.tensor([prompt]), max_new_tokens=request["max_tokens"], do_sample=False,
                                   min_new_tokens=request["max_tokens"], pad_token_id=0,
                                   eos_token_id=None)[0, len(prompt):].tolist()
            assert got["tokens"] == [want] * request["num_samples"], (r, got["tokens"], want)
        for n, sample in enumerate(got["tokens"]):
            ref = _hf_logprobs(hf, prompt + sample)
            torch.testing.assert_close(got["logprobs"][n], ref[len(prompt) - 1:], atol=1e-4, rtol=0)
        ref = _hf_logprobs(hf, prompt + got["tokens"][0])
        assert torch.isnan(got["prompt_logprobs"][0])
        torch.testing.assert_close(got["prompt_logprobs"][1:], ref[:len(prompt) - 1], atol=1e-4, rtol=0)
        k = request.get("topk_prompt_logprobs", 0)
        if k:
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), -1)
            values, ids = lp.topk(k, -1)
            topk_ids = got["topk_ids"].long().view(len(prompt), k)
            topk_lp = got["topk_logprobs"].view(len(prompt), k)
            assert topk_ids[0].tolist() == [0] * k and topk_lp[0].tolist() == [-99999.0] * k
            assert torch.equal(topk_ids[1:], ids), r
            torch.testing.assert_close(topk_lp[1:], values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", DECODE_KINDS)
def test_hybrid_decoding_is_batch_invariant(kind, dtype, tiny_models, harness):
    """After a LoRA step, each request decoded beside the others gets bitwise the tokens,
    logprobs and prompt logprobs it gets alone, and in another company."""
    from reference import random_batch

    model_dir = tiny_models[kind]
    vocab = _vocab(model_dir)
    requests = _hybrid_requests(vocab)
    for r in requests:  # sampled throughout: every logprob row decides the tokens
        r.update(temperature=1.0, seed=11 + len(r["prompt"]))
    ops = [{"op": "forward_backward", "loss_fn": "cross_entropy", "data": random_batch(0, vocab)},
           {"op": "optim_step", "adam": {"learning_rate": 2e-2}},
           {"op": "generate_batch", "requests": requests}]
    ops += [{"op": "generate_batch", "requests": [r]} for r in requests]
    ops.append({"op": "generate_batch", "requests": [requests[3], requests[1]]})
    res = harness(model_dir, {"lora": {"rank": 4, "alpha": 8.0, "seed": 1}, "dtype": dtype, "ops": ops})
    together = [_request_out(res, f"op2.req{r}", q) for r, q in enumerate(requests)]
    for r, request in enumerate(requests):
        alone = _request_out(res, f"op{3 + r}.req0", request)
        _assert_bitwise_same(together[r], alone, f"request {r} together vs alone")
        assert res.meta[f"op{3 + r}.req0.batched_requests"] == "1"
    pair = len(ops) - 1
    _assert_bitwise_same(together[3], _request_out(res, f"op{pair}.req0", requests[3]), "request 3 in a pair")
    _assert_bitwise_same(together[1], _request_out(res, f"op{pair}.req1", requests[1]), "request 1 in a pair")
