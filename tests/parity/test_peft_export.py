"""The PEFT export (what save_weights_for_sampler writes, through the harness's
``export_peft``) after a few lathe training steps: ``PeftModel.from_pretrained`` on the
transformers model, and transformers alone on the merged folder, give lathe's logprobs.
Dense and MoE models, tied and untied embeddings, MoE models with dense layers
(``mlp_only_layers`` / ``decoder_sparse_step``), a sharded base; Qwen3.5 dense and MoE (Gated
DeltaNet layers whose split in_proj_q/k/v adapters join into in_proj_qkv, a gated shared expert);
Qwen2.5-shaped models (q/k/v biases, which the adapter leaves alone and the merged folder keeps)
and a Llama 3 model."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import make_tiny_models
from model_views import TextView
from reference import load_hf_model, min_routing_margin, random_batch

LORA = {"rank": 4, "alpha": 8.0, "seed": 3}
ADAM = {"learning_rate": 2e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
ATOL = 1e-4
KINDS = ("qwen3", "qwen3_tied", "qwen3_moe", "qwen3_moe_sparse", "qwen3_moe_sparse_tied", "qwen3_5", "qwen3_5_moe",
         "qwen2", "qwen2_tied", "llama3_rope") + make_tiny_models.MLA_KINDS + make_tiny_models.DSA_KINDS


@pytest.fixture(scope="module")
def sharded_sparse_tied(tmp_path_factory) -> str:
    """qwen3_moe_sparse with tied embeddings, saved in shards with an index."""
    out = str(tmp_path_factory.mktemp("export_models") / "qwen3_moe_sparse_tied")
    make_tiny_models.make_model("qwen3_moe_sparse_tied", out, seed=0, max_shard_size="150KB")
    return out


def _model_dir(kind, tiny_models, sharded_sparse_tied, tmp_path):
    if kind in make_tiny_models.ROPE_BIAS_KINDS:
        out = str(tmp_path / "base" / kind)
        make_tiny_models.make_model(kind, out, seed=0)
        return out
    return sharded_sparse_tied if kind == "qwen3_moe_sparse_tied" else tiny_models[kind]


def _logprobs(model, datum) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([datum["tokens"]])).logits[0].float()
    targets = torch.tensor(datum["loss_fn_inputs"]["target_tokens"])
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


def _max_diff(model, data, lathe_lp) -> float:
    return max(float((_logprobs(model, d) - lp).abs().max()) for d, lp in zip(data, lathe_lp))


def _load_peft(model_dir, adapter_dir):
    from peft import PeftModel

    with warnings.catch_warnings():
        # peft checks rank_pattern / alpha_pattern only against target_modules and warns that
        # the gate_up_proj pattern matched nothing, though it does apply to the fused experts.
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match")
        return PeftModel.from_pretrained(load_hf_model(model_dir), adapter_dir).eval()


def _train_and_export(harness, model_dir, out, vocab, probes):
    """Two lathe steps, then a forward of every probe batch, then the export (with merged)."""
    ops = []
    for seed in (0, 1):
        ops += [{"op": "forward_backward", "loss_fn": "cross_entropy", "data": random_batch(seed, vocab)},
                {"op": "optim_step", "adam": ADAM}]
    first_probe = len(ops)
    ops += [{"op": "forward", "loss_fn": "cross_entropy", "data": p} for p in probes]
    ops.append({"op": "export_peft", "dir": out, "merged": True})
    res = harness(model_dir, {"lora": LORA, "ops": ops})
    return [[res.logprobs(first_probe + i, d) for d in range(len(p))] for i, p in enumerate(probes)]


@pytest.mark.parametrize("kind", KINDS)
def test_exported_adapter_and_merged_model_give_lathe_logprobs(kind, tiny_models, sharded_sparse_tied, harness,
                                                                 tmp_path):
    model_dir = _model_dir(kind, tiny_models, sharded_sparse_tied, tmp_path)
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    probes = [random_batch(50 + i, vocab, lengths=(7, 13)) for i in range(4)]
    out = str(tmp_path / "export")
    lathe_lp = _train_and_export(harness, model_dir, out, vocab, probes)
    assert not os.path.exists(out + ".partial")

    peft_model = _load_peft(model_dir, out)
    # Probes whose MoE routing has a margin, so rounding cannot legitimately pick other experts.
    usable = [i for i, p in enumerate(probes) if min_routing_margin(peft_model, p) >= 1e-4]
    assert usable, "no probe batch with a routing margin of 1e-4"
    data, want = probes[usable[0]], lathe_lp[usable[0]]
    peft_diff = _max_diff(peft_model, data, want)
    with peft_model.disable_adapter():
        plain_diff = _max_diff(peft_model, data, want)
    merged = load_hf_model(os.path.join(out, "merged"))
    merged_diff = _max_diff(merged, data, want)
    print(f"{kind}: max |logprob diff| peft {peft_diff:.2e} merged {merged_diff:.2e} (base model {plain_diff:.2e})")
    assert plain_diff > 1e-2, "the adapter barely changes the logprobs: the comparison proves nothing"
    assert peft_diff <= ATOL, f"{kind}: PeftModel on the exported adapter is off lathe by {peft_diff}"
    assert merged_diff <= ATOL, f"{kind}: the merged model is off lathe by {merged_diff}"


def test_every_dense_mlp_of_a_moe_model_gets_its_adapter(tiny_models, harness, tmp_path):
    """peft wraps each dense layer's gate/up/down projection and each MoE layer's experts,
    with the per-expert tensors in place, not only close logprobs."""
    from peft.tuners.lora.layer import ParamWrapper

    model_dir = tiny_models["qwen3_moe_sparse"]
    out = str(tmp_path / "export")
    res = harness(model_dir, {"lora": LORA, "ops": [
        {"op": "forward_backward", "loss_fn": "cross_entropy", "data": random_batch(0, 144)},
        {"op": "optim_step", "adam": ADAM}, {"op": "dump", "prefix": "p"}, {"op": "export_peft", "dir": out}]})
    lathe = res.params("p")
    model = _load_peft(model_dir, out)
    base = model.get_base_model()
    for i, layer in enumerate(base.model.layers):
        if hasattr(layer.mlp, "experts"):
            assert isinstance(layer.mlp.experts, ParamWrapper), i
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            wrapped = getattr(layer.mlp, proj)
            assert isinstance(wrapped, ParamWrapper), f"layer {i} {proj} has no adapter: {type(wrapped)}"
            for ab in ("lora_A", "lora_B"):
                got = getattr(wrapped, ab)["default"].weight
                assert torch.equal(got, lathe[f"model.layers.{i}.mlp.{proj}.{ab}.weight"]), (i, proj, ab)


def test_merged_tied_model_gets_its_own_lm_head(sharded_sparse_tied, harness, tmp_path):
    out = str(tmp_path / "export")
    res = harness(sharded_sparse_tied, {"lora": LORA, "ops": [
        {"op": "forward_backward", "loss_fn": "cross_entropy", "data": random_batch(0, 144)},
        {"op": "optim_step", "adam": ADAM}, {"op": "dump", "prefix": "p"},
        {"op": "export_peft", "dir": out, "merged": True}]})
    merged = os.path.join(out, "merged")
    assert json.load(open(os.path.join(merged, "config.json")))["tie_word_embeddings"] is False
    index = json.load(open(os.path.join(merged, "model.safetensors.index.json")))
    base_index = json.load(open(os.path.join(sharded_sparse_tied, "model.safetensors.index.json")))
    assert "lm_head.weight" not in base_index["weight_map"]
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    tensors, total_bytes, total_params = {}, 0, 0
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(merged, name), "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == name, key
                t = f.get_tensor(key)
                tensors[key] = t
                total_bytes += t.numel() * t.element_size()
                total_params += t.numel()
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total_bytes
    assert index["metadata"]["total_parameters"] == total_params
    p = res.params("p")
    scale = LORA["alpha"] / LORA["rank"]
    want = tensors["model.embed_tokens.weight"] + scale * p["lm_head.lora_B.weight"] @ p["lm_head.lora_A.weight"]
    torch.testing.assert_close(tensors["lm_head.weight"], want, rtol=0, atol=1e-6)


def test_a_base_with_fused_experts_merges_into_them(tiny_models, harness, tmp_path):
    """A base whose experts are stored fused (gate_up_proj [E, 2I, H], down_proj [E, H, I])
    gets each expert's adapter merged into its slices, keeps the fused layout, and
    transformers on it gives lathe's logprobs."""
    base = tmp_path / "fused"
    make_tiny_models.write_fused_experts(tiny_models["qwen3_moe"], base)
    vocab = json.load(open(os.path.join(base, "config.json")))["vocab_size"]
    probes = [random_batch(50 + i, vocab, lengths=(7, 13)) for i in range(4)]
    out = str(tmp_path / "export")
    lathe_lp = _train_and_export(harness, str(base), out, vocab, probes)
    merged_dir = os.path.join(out, "merged")
    with safe_open(os.path.join(merged_dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(".mlp.experts.0." in n for n in names)
    merged = load_hf_model(merged_dir)
    usable = [i for i, p in enumerate(probes) if min_routing_margin(merged, p) >= 1e-4]
    assert usable, "no probe batch with a routing margin of 1e-4"
    base_model = load_hf_model(str(base))
    data, want = probes[usable[0]], lathe_lp[usable[0]]
    assert _max_diff(base_model, data, want) > 1e-2, "the adapter barely changes the logprobs"
    assert _max_diff(merged, data, want) <= ATOL


@pytest.fixture(scope="module")
def multimodal_moe(tmp_path_factory) -> str:
    """Qwen3.5-MoE in the hub's multimodal layout: model.language_model.* weights, fused experts,
    a vision tower."""
    out = str(tmp_path_factory.mktemp("export_models") / "qwen3_5_moe_multimodal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model("qwen3_5_moe_multimodal", out, seed=0)
    return out


def test_multimodal_export_loads_on_the_conditional_generation_model(multimodal_moe, harness, tmp_path):
    """The export of the multimodal layout's text tower names its modules as
    Qwen3_5MoeForConditionalGeneration holds them (model.language_model.*): peft on that model,
    and transformers on the merged folder (experts merged into their fused tensors), give
    lathe's logprobs."""
    import transformers
    from peft import PeftModel

    config = json.load(open(os.path.join(multimodal_moe, "config.json")))
    vocab = config["text_config"]["vocab_size"]
    probes = [random_batch(50 + i, vocab, lengths=(7, 13)) for i in range(4)]
    out = str(tmp_path / "export")
    lathe_lp = _train_and_export(harness, multimodal_moe, out, vocab, probes)
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(n.startswith("base_model.model.model.language_model.") or n.startswith("base_model.model.lm_head.")
               for n in names), [n for n in names if "language_model" not in n][:4]

    def load(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()

    def margin(model, data):
        text = model.get_base_model() if hasattr(model, "get_base_model") else model
        return min_routing_margin(TextView(text.model.language_model), data)

    base = load(multimodal_moe)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match")
        peft_model = PeftModel.from_pretrained(load(multimodal_moe), out).eval()
    usable = [i for i, p in enumerate(probes) if margin(peft_model, p) >= 1e-4]
    assert usable, "no probe batch with a routing margin of 1e-4"
    data, want = probes[usable[0]], lathe_lp[usable[0]]
    plain_diff = _max_diff(base, data, want)
    peft_diff = _max_diff(peft_model, data, want)
    merged_diff = _max_diff(load(os.path.join(out, "merged")), data, want)
    print(f"multimodal: max |logprob diff| peft {peft_diff:.2e} merged {merged_diff:.2e} (base {plain_diff:.2e})")
    assert plain_diff > 1e-2, "the adapter barely changes the logprobs: the comparison proves nothing"
    assert peft_diff <= ATOL, f"PeftModel on the exported adapter is off lathe by {peft_diff}"
    assert merged_diff <= ATOL, f"the merged model is off lathe by {merged_diff}"


