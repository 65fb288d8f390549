"""DeepSeek-V3 configs: lathe reads them as transformers does, and refuses by field what it
does not compute.

The numerics of the tiny models are compared in test_parity.py (MLA_KINDS). What is checked
here, through ``lathe_model_config`` (LoadModelConfig):

* the tiny kinds of make_tiny_models.py and Kimi-K2- and DeepSeek-V3-shaped configs (the
  published dimensions; transformers' defaults for the rest) give the latent attention's
  widths, the softmax scale transformers' attention uses (yarn's mscale correction included),
  the router's groups and scaling, the dense first layers and the skipped
  multi-token-prediction layer;
* a config transformers would compute differently from lathe, or could not build, is refused
  with an error naming the field;
* the MoE load metrics of a forward are those of the experts transformers' router picks;
* bf16 runs route with the exact fp32 score correction bias;
* the Kimi-K2.5 / K2.6 wrapper's hub layout runs as its text model, and its PEFT export loads
  on transformers' Kimi_K25ForConditionalGeneration.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_tiny_models  # noqa: E402
from model_views import TextView, model_config_binary, read_config  # noqa: E402

# Kimi-K2's text config (seed-architectures.md, section 2.2) and DeepSeek-V3's dimensions.
KIMI_K2 = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=163840, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=1,
    num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1,
    n_group=1, topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
    routed_scaling_factor=2.827, max_position_embeddings=262144, rope_theta=50000.0, rms_norm_eps=1e-5,
    rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                  "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    tie_word_embeddings=False, hidden_act="silu")
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
    num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
    n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=163840,
    rope_theta=10000.0, rms_norm_eps=1e-6,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    tie_word_embeddings=False, hidden_act="silu")


def _transformers_view(config: dict) -> dict:
    """What transformers 5.23 computes from the config: its attention's softmax scale and
    the fields lathe reads."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    cfg = DeepseekV3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return dict(
        softmax_scale=yarn_apply_mscale(cfg.rope_parameters, qk ** -0.5), head_dim=qk,
        rotary_dim=cfg.qk_rope_head_dim, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave, experts=cfg.n_routed_experts,
        top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        scaling=cfg.routed_scaling_factor, shared=cfg.moe_intermediate_size * cfg.n_shared_experts,
        dense=[i for i in range(cfg.num_hidden_layers) if i < cfg.first_k_dense_replace],
        norm_topk_prob=cfg.norm_topk_prob, layers=cfg.num_hidden_layers)


def _configs() -> dict:
    out = {"kimi_k2": KIMI_K2, "deepseek_v3_full": DEEPSEEK_V3}
    for kind in make_tiny_models.MLA_KINDS:
        out[kind] = make_tiny_models.build_config(kind).to_dict() | {"architectures": ["DeepseekV3ForCausalLM"]}
    return out


@pytest.mark.parametrize("name", ("kimi_k2", "deepseek_v3_full") + make_tiny_models.MLA_KINDS)
def test_config_is_read_as_transformers_reads_it(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _configs()[name]
        want = _transformers_view(config)
    run = read_config(config, tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    a, r = got["latent_attention"], got["sigmoid_router"]
    assert math.isclose(a["softmax_scale"], want["softmax_scale"], rel_tol=1e-12), (a, want)
    assert (got["head_dim"], got["rotary"]["rotary_dim"]) == (want["head_dim"], want["rotary_dim"])
    assert (a["q_lora_rank"], a["kv_lora_rank"], a["v_head_dim"], a["rope_interleave"]) == (
        want["q_lora_rank"], want["kv_lora_rank"], want["v_head_dim"], want["rope_interleave"])
    assert (got["num_experts"], got["num_experts_per_tok"], r["n_group"], r["topk_group"]) == (
        want["experts"], want["top_k"], want["n_group"], want["topk_group"])
    assert r["enabled"] and math.isclose(r["routed_scaling_factor"], want["scaling"])
    assert got["norm_topk_prob"] == want["norm_topk_prob"]
    assert got["shared_expert"] == {"intermediate_size": want["shared"], "sigmoid_gate": False}
    assert got["mlp_only_layers"] == want["dense"]
    assert got["checkpoint"]["skip_prefixes"] == [f"model.layers.{want['layers']}."]


@pytest.mark.parametrize("change,field", [
    ({"num_key_value_heads": 32}, "num_key_value_heads"),
    ({"attention_bias": True}, "attention_bias"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"n_group": 7}, "n_group"),
    ({"n_group": 256}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 40, "topk_group": 1}, "num_experts_per_tok"),
    ({"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"output_router_logits": True}, "output_router_logits"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config.quant_method"),
])
def test_unsupported_config_is_refused_by_field(change, field, tmp_path):
    run = read_config(dict(DEEPSEEK_V3, **change), tmp_path)
    assert run.returncode == 1, run.stdout
    assert f"'{field}'" in run.stderr, run.stderr


def test_q_proj_without_a_q_lora_rank(tmp_path):
    run = read_config(dict(DEEPSEEK_V3, q_lora_rank=None), tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["latent_attention"]["q_lora_rank"] == 0


@pytest.mark.parametrize("kind", make_tiny_models.MLA_KINDS)
def test_moe_load_metrics_are_those_of_transformers_routing(kind, tiny_models, harness):
    """forward reports the share of experts that got tokens (mean over the MoE layers) and
    the busiest expert's load over the mean (max over them), of the experts transformers'
    router picks for the same tokens (bias-corrected, group-limited top-k)."""
    import torch

    import reference as R

    d = tiny_models[kind]
    ref = R.Reference(d)
    data = R.pick_batch(ref, 3, lengths=(5, 11, 17))
    chosen: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(ref.model.model.layers):
        if hasattr(layer.mlp, "experts"):
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda mod, args, out, i=i: chosen.setdefault(i, []).append(out[2].flatten())))
    try:
        ref.run(data, backward=False)
    finally:
        for h in hooks:
            h.remove()
    experts = ref.model.config.n_routed_experts
    fracs, ratios = [], []
    for picks in chosen.values():
        load = torch.bincount(torch.cat(picks), minlength=experts).double()
        fracs.append(float((load > 0).sum()) / experts)
        ratios.append(float(load.max() / load.mean()))
    res = harness(d, {"lora": None, "ops": [{"op": "forward", "loss_fn": "cross_entropy", "data": data}]})
    metrics = res.metrics(0)
    assert math.isclose(metrics["moe_frac_experts_with_tokens:mean"], sum(fracs) / len(fracs), rel_tol=1e-9), metrics
    assert math.isclose(metrics["moe_max_over_mean_load:max"], max(ratios), rel_tol=1e-9), (metrics, ratios)


@pytest.mark.parametrize("tie_flag", [False, None])
def test_kimi_wrapper_runs_its_text_model(tie_flag, tiny_models, harness, tmp_path):
    """The Kimi-K2.5 / K2.6 hub layout (KimiK25ForConditionalGeneration, text fields under
    text_config with model_type kimi_k2, weights under language_model.model. and
    language_model.lm_head, a vision tower and an MTP layer beside them): lathe's logprobs are
    transformers' Kimi_K25ForConditionalGeneration's on text, with lm_head untied by an
    explicit top-level false (text_config says true), and tied to the embedding when the
    top-level flag is absent (transformers' Kimi_K25Config defaults it to true)."""
    import torch
    import transformers

    import reference as R

    text_dir = tiny_models["deepseek_v3"]
    out = str(tmp_path / "kimi")
    make_tiny_models.write_kimi_layout(text_dir, out, tie_flag=tie_flag)
    run = subprocess.run([model_config_binary(), out], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["tie_word_embeddings"] is (tie_flag is None)
    assert got["checkpoint"]["weight_prefix"] == "language_model.model."
    assert set(got["checkpoint"]["skip_prefixes"]) == {"language_model.model.layers.3.", "vision_tower.",
                                                       "mm_projector."}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    assert bool(hf.config.tie_word_embeddings) is (tie_flag is None)
    data = R.random_batch(4, 157, lengths=(6, 11))
    res = harness(out, {"lora": None, "ops": [{"op": "forward", "loss_fn": "cross_entropy", "data": data}]})
    text_res = harness(text_dir, {"lora": None, "ops": [{"op": "forward", "loss_fn": "cross_entropy", "data": data}]})
    for j, datum in enumerate(data):
        tokens = torch.tensor([datum["tokens"]])
        with torch.no_grad():
            logits = hf(input_ids=tokens).logits[0].float()
        lp, _ = R.gather_logprobs(logits, torch.tensor(datum["loss_fn_inputs"]["target_tokens"]))
        assert float((res.logprobs(0, j) - lp).abs().max()) <= 1e-4, j
        same_as_text = torch.equal(res.logprobs(0, j), text_res.logprobs(0, j))
        assert same_as_text is (tie_flag is not None), j  # tied: the embedding is the head


def test_bf16_routing_uses_the_exact_fp32_score_correction_bias(tiny_models, harness, tmp_path):
    """Under bfloat16 transformers keeps e_score_correction_bias in fp32; so does lathe. With
    biases near 5 (bf16 steps of 1/32 there) rounding them to bf16 would change which experts
    some tokens pick in this batch; lathe's bf16 logprobs are transformers' bf16 ones, bit for
    bit."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import reference as R

    src, out = tiny_models["deepseek_v3"], str(tmp_path / "big_bias")
    os.makedirs(out)
    shutil.copy(os.path.join(src, "config.json"), out)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    g = torch.Generator().manual_seed(11)
    for name in [n for n in tensors if n.endswith("e_score_correction_bias")]:
        tensors[name] = 5.0 + 0.03 * torch.rand(tensors[name].shape, generator=g)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    ref = R.Reference(out, dtype=torch.bfloat16)
    data = R.pick_batch(ref, 21, min_margin=2e-3, tries=512, lengths=(9, 13))

    def picks(model):
        got = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: got.append(o[2].sort(-1).values))
                 for layer in model.model.layers if hasattr(layer.mlp, "experts")]
        with torch.no_grad():
            for d in data:
                model(input_ids=torch.tensor([d["tokens"]]))
        for h in hooks:
            h.remove()
        return torch.cat(got)

    exact = picks(ref.model)
    gates = [layer.mlp.gate for layer in ref.model.model.layers if hasattr(layer.mlp, "experts")]
    saved = [gate.e_score_correction_bias.clone() for gate in gates]
    for gate in gates:
        gate.e_score_correction_bias.copy_(gate.e_score_correction_bias.bfloat16().float())
    rounded = picks(ref.model)
    for gate, bias in zip(gates, saved):
        gate.e_score_correction_bias.copy_(bias)
    assert not torch.equal(exact, rounded), "rounding the bias changes no choice: the test proves nothing"

    want = ref.run(data, backward=False)
    res = harness(out, {"lora": None, "dtype": "bfloat16",
                        "ops": [{"op": "forward", "loss_fn": "cross_entropy", "data": data}]})
    for j in range(len(data)):
        assert torch.equal(res.logprobs(0, j), want["logprobs"][j].float()), j


def test_kimi_wrapper_export_loads_on_the_conditional_generation_model(tiny_models, harness, tmp_path):
    """The PEFT export of a run on the Kimi hub layout names its modules as
    Kimi_K25ForConditionalGeneration holds them (model.language_model.*, lm_head): peft on
    that model, and transformers on the merged folder (the hub's names, experts merged per
    expert), give lathe's logprobs."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors import safe_open

    import reference as R

    model_dir = str(tmp_path / "kimi")
    make_tiny_models.write_kimi_layout(tiny_models["deepseek_v3"], model_dir, tie_flag=False)
    lora = {"rank": 4, "alpha": 8.0, "seed": 3}
    ops = []
    for seed in (0, 1):
        ops += [{"op": "forward_backward", "loss_fn": "cross_entropy", "data": R.random_batch(seed, 157)},
                {"op": "optim_step", "adam": {"learning_rate": 2e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}}]
    probes = [R.random_batch(50 + i, 157, lengths=(7, 13)) for i in range(4)]
    first = len(ops)
    ops += [{"op": "forward", "loss_fn": "cross_entropy", "data": p} for p in probes]
    out = str(tmp_path / "export")
    ops.append({"op": "export_peft", "dir": out, "merged": True})
    res = harness(model_dir, {"lora": lora, "ops": ops})
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(n.startswith(("base_model.model.model.language_model.", "base_model.model.lm_head.")) for n in names)

    def load(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(load(model_dir), out).eval()
    merged = load(os.path.join(out, "merged"))
    base = load(model_dir)

    def diff(model, data, i):
        worst = 0.0
        for j, d in enumerate(data):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([d["tokens"]])).logits[0].float()
            lp, _ = R.gather_logprobs(logits, torch.tensor(d["loss_fn_inputs"]["target_tokens"]))
            worst = max(worst, float((res.logprobs(first + i, j) - lp).abs().max()))
        return worst

    # A probe whose routing has a margin, so rounding cannot legitimately pick other experts.
    view = TextView(merged.model.language_model)
    usable = [i for i, p in enumerate(probes) if R.min_routing_margin(view, p) >= 1e-4]
    assert usable
    i = usable[0]
    assert diff(base, probes[i], i) > 1e-2, "the adapter barely changes the logprobs: the comparison proves nothing"
    assert diff(peft_model, probes[i], i) <= 1e-4
    assert diff(merged, probes[i], i) <= 1e-4


