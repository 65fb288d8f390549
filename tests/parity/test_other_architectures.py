"""Llama- and Mistral-style decoders (no QK-norm): logprobs and full fine-tuning
gradients equal transformers', and a model folder whose experts are stored fused
(transformers 5.x in-memory names) loads like the per-expert one."""
import pytest
import torch

import make_tiny_models

ARCHS = ("llama", "mistral")


def make_decoder(kind, out_dir):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    common = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(3)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(out_dir)
    return model


def batch(vocab, lengths=(5, 12, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for n in lengths:
        toks = torch.randint(0, vocab, (n + 1,), generator=g).tolist()
        data.append({"tokens": toks[:-1], "loss_fn_inputs": {"target_tokens": toks[1:]}})
    return data


def reference_logprobs(model, data):
    out = []
    for d in data:
        logits = model(input_ids=torch.tensor([d["tokens"]])).logits[0].float()
        t = torch.tensor(d["loss_fn_inputs"]["target_tokens"])
        out.append(torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0])
    return out


@pytest.mark.parametrize("kind", ARCHS)
def test_logprobs_and_full_grads_match_transformers(kind, tmp_path, harness):
    model = make_decoder(kind, str(tmp_path / kind))
    data = batch(model.config.vocab_size)
    want = reference_logprobs(model, data)
    loss = -sum(lp.sum() for lp in want)
    loss.backward()
    res = harness(str(tmp_path / kind), {"lora": None, "ops": [
        {"op": "forward_backward", "loss_fn": "cross_entropy", "data": data}, {"op": "dump", "prefix": "g"}]})
    for i, lp in enumerate(want):
        assert torch.max(torch.abs(res.logprobs(0, i) - lp.detach())) <= 1e-4
    grads = res.grads("g")
    named = dict(model.named_parameters())
    assert set(grads) == set(named)
    for name, g in grads.items():
        ref = named[name].grad
        rel = float((g - ref).norm() / ref.norm().clamp_min(1e-12))
        assert rel <= 1e-4, f"{kind} {name}: relative gradient error {rel}"


def test_fused_expert_layout_loads_like_per_expert(tiny_models, harness, tmp_path):
    src = tiny_models["qwen3_moe"]
    dst = tmp_path / "fused"
    config = make_tiny_models.write_fused_experts(src, dst)
    data = batch(config["vocab_size"], seed=5)
    req = {"lora": None, "ops": [{"op": "forward", "loss_fn": "cross_entropy", "data": data}]}
    a, b = harness(src, req), harness(str(dst), req)
    for i in range(len(data)):
        assert torch.equal(a.logprobs(0, i), b.logprobs(0, i))
