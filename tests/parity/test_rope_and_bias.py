"""Scaled RoPE (llama3, yarn, linear) and attention biases (Qwen2 / Qwen2.5 q/k/v, Llama's
``attention_bias`` q/k/v/o): logprobs, gradients and one AdamW step equal transformers' /
peft's, with LoRA (biases frozen, as peft's ``bias="none"``) and full fine-tuning (biases
trained under their checkpoint names), and greedy decoding with the KV cache equals
transformers' ``generate``. Bad RoPE settings are refused at load, naming the field."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

import make_tiny_models
import reference as R

KINDS = make_tiny_models.ROPE_BIAS_KINDS
LORA = dict(rank=4, alpha=8, seed=0, train_attn=True, train_mlp=True, train_unembed=True)
KIND_SEED = {k: 1000 + 100 * i for i, k in enumerate(KINDS)}
ADAM = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.01, grad_clip_norm=0.0)
FWD_ATOL = 1e-4
GRAD_RTOL = 1e-4
ADAM_ATOL = 1e-6
# Long enough to pass the 16 / 32 pretraining positions the scaled kinds rescale beyond.
LENGTHS = (7, 23, 41)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rope_bias_models")
    out = {}
    for kind in KINDS:
        out[kind] = str(root / kind)
        make_tiny_models.make_model(kind, out[kind], seed=0)
    return out


def _edited_copy(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


def _default_rope(config):
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_grads_and_adam_step_match(kind, mode, models, harness, tmp_path):
    d = models[kind]
    seed = KIND_SEED[kind] + (0 if mode == "lora" else 50)
    if mode == "full":
        ref, head = R.Reference(d), {"lora": None}
    else:
        adapter = R.random_adapter(d, LORA, seed=seed)
        path = R.save_adapter(adapter, str(tmp_path / "adapter.safetensors"))
        ref, head = R.Reference(d, lora=LORA, adapter=adapter), {"lora": LORA, "adapter": path}
    data = R.random_batch(seed + 1, ref.dims["vocab"], lengths=LENGTHS)
    want = ref.run(data)
    g_ref = ref.grads()
    if "bias" in kind or kind.startswith("qwen2"):  # peft leaves the biases frozen
        assert any(k.endswith("_proj.bias") for k in g_ref) == (mode == "full")

    res = harness(d, dict(head, ops=[{"op": "forward_backward", "loss_fn": "cross_entropy", "data": data},
                                     {"op": "dump", "prefix": "s1"}, {"op": "optim_step", "adam": ADAM},
                                     {"op": "dump", "prefix": "s2"}]))
    init = res.params("init")
    if mode == "full":
        R.assert_bit_identical(init, ref.params(), f"{kind}: init.param vs checkpoint")
    else:
        R.assert_bit_identical(init, adapter, f"{kind}: init.param vs adapter file")
    for j, lp_want in enumerate(want["logprobs"]):
        diff = float((res.logprobs(0, j) - lp_want).abs().max())
        assert diff <= FWD_ATOL, f"{kind}/{mode} datum {j}: logprobs max abs diff {diff:.3g}"
    loss = res.metrics(0)["loss:sum"]
    assert math.isclose(loss, want["loss_sum"], rel_tol=1e-4), f"{kind}/{mode}: loss {loss} vs {want['loss_sum']}"
    R.assert_tensors_rel_close(res.grads("s1"), g_ref, GRAD_RTOL, f"{kind}/{mode}: grads")
    stepped, norms = R.adamw_reference(init, [res.grads("s1")], [ADAM])
    R.assert_tensors_abs_close(res.params("s2"), stepped[0], ADAM_ATOL, f"{kind}/{mode}: params after AdamW")
    got = R.grad_norm_metric(res.metrics(2))
    assert math.isclose(got, norms[0], rel_tol=1e-4), f"{kind}/{mode}: grad_norm {got} vs {norms[0]}"


@pytest.mark.parametrize("kind", KINDS)
def test_reference_scaling_and_biases_change_the_logprobs(kind, models, tmp_path):
    """The models above would not tell a scaled RoPE from the default one, or a bias from
    none, if the difference were below the tolerance: it is not."""
    d = models[kind]
    ref = R.Reference(d)
    data = R.random_batch(KIND_SEED[kind] + 2, ref.dims["vocab"], lengths=LENGTHS)
    want = ref.run(data, backward=False)["logprobs"]
    if kind.startswith("llama"):
        other = R.Reference(_edited_copy(d, str(tmp_path / "default_rope"), _default_rope))
        lps = other.run(data, backward=False)["logprobs"]
        assert max(float((a - b).abs().max()) for a, b in zip(want, lps)) > 1e-2, "rope scaling has no effect"
    if "bias" in kind or kind.startswith("qwen2"):
        with torch.no_grad():
            for name, p in ref.model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.zero_()
        lps = ref.run(data, backward=False)["logprobs"]
        assert max(float((a - b).abs().max()) for a, b in zip(want, lps)) > 1e-2, "the biases have no effect"


BAD_ROPE = [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type"),
    ({"rope_type": "linear", "factor": -2.0}, "rope_parameters.factor"),
    ({"rope_type": "linear", "factor": 1e9}, "rope_parameters.factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, "rope_parameters.high_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "rope_parameters.low_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}, "rope_parameters.attention_factor"),
    ({"rope_type": "default", "rope_theta": 0.0}, "rope_parameters.rope_theta"),
]


@pytest.mark.parametrize("rope,field", BAD_ROPE, ids=[f for _, f in BAD_ROPE])
def test_bad_rope_settings_are_refused_at_load(rope, field, models, harness, tmp_path):
    d = _edited_copy(models["llama3_rope"], str(tmp_path / "bad"), lambda c: c.update(rope_parameters=rope))
    res = harness(d, {"lora": None, "ops": []}, expect_rc=None)
    assert res.rc == 1, f"a bad rope setting was not refused at load (rc {res.rc})"
    assert "INVALID_ARGUMENT" in res.stderr and f"field '{field}'" in res.stderr, res.stderr[-2000:]


def test_sliding_window_smaller_than_the_context_is_refused(models, harness, tmp_path):
    def slide(config):
        config.update(use_sliding_window=True, sliding_window=16, max_window_layers=0)
        config.pop("layer_types")

    d = _edited_copy(models["qwen2"], str(tmp_path / "sliding"), slide)
    res = harness(d, {"lora": None, "ops": []}, expect_rc=None)
    assert res.rc == 1 and "INVALID_ARGUMENT" in res.stderr, res.stderr[-2000:]
    assert "field 'use_sliding_window' is true with sliding_window 16, smaller than max_position_embeddings 128" \
        in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("kind", ["llama3_rope", "llama_yarn", "llama_linear_bias", "qwen2"])
def test_cached_generation_equals_transformers_generate(kind, models, harness):
    """Decoding with the KV cache reads the scaled RoPE rows at each new position and
    adds the biases to the new tokens' projections: greedy tokens and their logprobs equal
    transformers' past the 16 / 32 pretraining positions."""
    d = models[kind]
    prompt = [5, 17, 3, 42, 8, 99, 23]
    res = harness(d, {"lora": {"rank": 0}, "ops": [
        {"op": "generate", "prompt": prompt, "num_samples": 1, "max_tokens": 40, "temperature": 0}]})
    hf = R.load_hf_model(d)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                           pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    got = res.tensors["op0.sample0.tokens"].long().tolist()
    assert got == want, (got, want)
    tokens = torch.tensor([prompt + want])
    with torch.no_grad():
        lp = torch.log_softmax(hf(tokens).logits[0].float()[:-1], -1)
    ref = lp[torch.arange(tokens.shape[1] - 1), tokens[0, 1:]][len(prompt) - 1:]
    torch.testing.assert_close(res.tensors["op0.sample0.logprobs"], ref, atol=1e-4, rtol=0)


# test_precision.py's bf16 tolerances.
BF16_LOGPROB_ATOL = 0.05
BF16_GRAD_RTOL = 0.05


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", ["llama_yarn", "llama_linear_bias", "qwen2_tied"])
def test_bf16_matches_transformers_in_bf16(kind, mode, models, harness, tmp_path):
    """Under bfloat16 the biases are bf16 weights (fp32 masters in full fine-tuning) and the
    RoPE tables, yarn's factor included, are computed in fp32 and rounded once."""
    d = models[kind]
    seed = KIND_SEED[kind] + 7
    if mode == "lora":
        adapter = R.random_adapter(d, LORA, seed=seed)
        path = R.save_adapter(adapter, str(tmp_path / "adapter.safetensors"))
        ref, head = R.Reference(d, lora=LORA, adapter=adapter, dtype=torch.bfloat16), {"lora": LORA, "adapter": path}
    else:
        ref, head = R.Reference(d, dtype=torch.bfloat16), {"lora": None}
    data = R.random_batch(seed, ref.dims["vocab"], lengths=LENGTHS)
    want = ref.run(data)
    g_ref = {k: v.float() for k, v in ref.grads().items()}
    res = harness(d, {**head, "dtype": "bfloat16", "ops": [
        {"op": "forward_backward", "loss_fn": "cross_entropy", "data": data}, {"op": "dump", "prefix": "g"}]})
    lp = max(float((res.logprobs(0, j) - w.float()).abs().max()) for j, w in enumerate(want["logprobs"]))
    total = R.global_norm(g_ref)
    grad = max(float((res.grads("g")[k] - w).norm()) / max(float(w.norm()), 1e-3 * total) for k, w in g_ref.items())
    print(f"\n{kind}/{mode} bf16: logprob {lp:.3g}, grad {grad:.3g}")
    assert lp <= BF16_LOGPROB_ATOL, f"{kind}/{mode}: bf16 logprobs differ by {lp:.3g}"
    assert grad <= BF16_GRAD_RTOL, f"{kind}/{mode}: bf16 gradients differ by {grad:.3g} (relative)"
