"""Qwen3.5 / Qwen3.6 tiny checkpoints: transformers runs them, and lathe reads their configs.

The numerics of the text models are compared in test_parity.py (HYBRID_KINDS). What is
checked here:

* each tiny kind of make_tiny_models.py runs fp32 forward + backward on CPU in transformers;
* the multimodal layout (``model.language_model.`` weights, a ``model.visual.`` tower, an
  ``mtp.`` head, the ConditionalGeneration config) is what transformers' own
  ``Qwen3_5[Moe]ForConditionalGeneration`` loads, with the same text logits;
* ``lathe_model_config`` (LoadModelConfig) reads every field as transformers does, names
  the weight prefix and skip prefixes that cover exactly the checkpoint's tensors, and the
  runtime runs the multimodal layout's text tower with the text model's logprobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_tiny_models  # noqa: E402

KINDS = make_tiny_models.QWEN3_5_KINDS
TEXT_OF = {"qwen3_5_multimodal": "qwen3_5", "qwen3_5_moe_multimodal": "qwen3_5_moe"}


@pytest.fixture(scope="module")
def qwen3_5_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5")
    dirs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in KINDS:
            dirs[kind] = str(root / kind)
            make_tiny_models.make_model(kind, dirs[kind], seed=0)
    return dirs


def _load(kind: str, path: str):
    import transformers

    if kind.endswith("_multimodal"):
        cls = (transformers.Qwen3_5MoeForConditionalGeneration if "moe" in kind
               else transformers.Qwen3_5ForConditionalGeneration)
    else:
        cls = transformers.Qwen3_5MoeForCausalLM if "moe" in kind else transformers.Qwen3_5ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _tokens(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, vocab, (2, 19), generator=g)  # 19: no multiple of the 64-token chunk


@pytest.mark.parametrize("kind", ("qwen3_5", "qwen3_5_moe"))
def test_tiny_model_runs_forward_and_backward_on_cpu(qwen3_5_models, kind):
    model = _load(kind, qwen3_5_models[kind])
    tokens = _tokens(model.config.vocab_size)
    out = model(input_ids=tokens, labels=tokens, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert sum(1 for t in model.config.layer_types if t == "linear_attention") == 3


@pytest.mark.parametrize("kind", ("qwen3_5_multimodal", "qwen3_5_moe_multimodal"))
def test_multimodal_layout_is_what_transformers_loads(qwen3_5_models, kind):
    wrapped = _load(kind, qwen3_5_models[kind])
    text = _load(TEXT_OF[kind], qwen3_5_models[TEXT_OF[kind]])
    tokens = _tokens(text.config.vocab_size)
    with torch.no_grad():
        a = wrapped(input_ids=tokens, use_cache=False).logits
        b = text(input_ids=tokens, use_cache=False).logits
    # Same weights; the wrapper's rotary path (3-axis positions) rounds differently in the last bits.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The top-level flag ties lm_head (text_config says the opposite on purpose).
    with open(os.path.join(qwen3_5_models[kind], "config.json")) as f:
        config = json.load(f)
    assert config["text_config"]["tie_word_embeddings"] != config["tie_word_embeddings"]
    tied = wrapped.lm_head.weight.data_ptr() == wrapped.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == config["tie_word_embeddings"]


def _read_with_lathe(path: str) -> dict:
    build = os.environ.get("LATHE_BUILD_DIR", "/work/main/build")
    binary = os.path.join(build, "tests", "lathe_model_config")
    if not os.path.exists(binary):
        pytest.skip(f"{binary} not built")
    run = subprocess.run([binary, path], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _tensor_names(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize("kind", KINDS)
def test_lathe_reads_the_config_as_transformers_does(qwen3_5_models, kind):
    path = qwen3_5_models[kind]
    got = _read_with_lathe(path)
    model = _load(kind, path)
    text = model.config.get_text_config()
    assert got["architecture"] == model.config.architectures[0]
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps"):
        assert got[field] == getattr(text, field), field
    assert got["layer_types"] == list(text.layer_types)
    lin = got["linear_attention"]
    assert (lin["num_key_heads"], lin["num_value_heads"], lin["key_head_dim"], lin["value_head_dim"],
            lin["conv_kernel_size"]) == (text.linear_num_key_heads, text.linear_num_value_heads,
                                         text.linear_key_head_dim, text.linear_value_head_dim,
                                         text.linear_conv_kernel_dim)
    rope = text.rope_parameters
    assert got["rope_theta"] == rope["rope_theta"]
    assert got["rotary"]["partial_rotary_factor"] == rope["partial_rotary_factor"]
    assert got["rotary"]["rotary_dim"] == int(text.head_dim * rope["partial_rotary_factor"])
    assert got["rotary"]["mrope_section"] == list(rope["mrope_section"])
    # What the model computes: a gated q_proj, (1 + w) norms, lm_head tied or not.
    layer = model.get_decoder().layers[3]
    assert got["attn_output_gate"] and layer.self_attn.q_proj.out_features == 2 * text.num_attention_heads * text.head_dim
    assert got["norm_style"] == "one_plus_weight"
    embed = model.get_input_embeddings().weight
    assert got["tie_word_embeddings"] == (model.lm_head.weight.data_ptr() == embed.data_ptr())
    if "moe" in kind:
        assert (got["num_experts"], got["num_experts_per_tok"], got["moe_intermediate_size"]) == (
            text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size)
        assert got["shared_expert"] == {"intermediate_size": text.shared_expert_intermediate_size,
                                        "sigmoid_gate": True}
        assert got["intermediate_size"] == 0
    else:
        assert got["intermediate_size"] == text.intermediate_size and got["num_experts"] == 0
    # Every tensor is the text model's (under the prefix, or lm_head) or skipped; the
    # skipped ones are exactly the vision tower and the MTP head.
    ckpt = got["checkpoint"]
    names = _tensor_names(path)
    skipped = [n for n in names if any(n.startswith(p) for p in ckpt["skip_prefixes"])]
    kept = [n for n in names if n not in skipped]
    assert all(n.startswith(ckpt["weight_prefix"]) or n == ckpt["lm_head"] for n in kept), kept
    assert skipped == [n for n in names if n.startswith(("model.visual.", "mtp."))]
    assert bool(skipped) == kind.endswith("_multimodal")
    text_names = {n for n, _ in (model.model.language_model if kind.endswith("_multimodal") else model.model)
                  .named_parameters()}
    assert {n[len(ckpt["weight_prefix"]):] for n in kept if n != ckpt["lm_head"]} >= (
        text_names - {n for n in text_names if ".mlp.experts." in n})


@pytest.mark.parametrize("kind", ("qwen3_5", "qwen3_5_moe"))
def test_reference_lora_targets_and_split_qkv(qwen3_5_models, kind):
    """The peft side of the Qwen3.5 parity tests: which modules get adapters, and that
    lathe's split in_proj_q/k/v adapters are exactly PEFT's fused rank-3r block LoRA."""
    import reference as R

    r, alpha = 4, 8.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = R.Reference(qwen3_5_models[kind], lora={"rank": r, "alpha": alpha})
    names = ref.names
    modules = {n.rsplit(".lora_", 1)[0].split(".", 3)[-1] for n in names if ".layers." in n}
    expected = {"linear_attn.in_proj_q", "linear_attn.in_proj_k", "linear_attn.in_proj_v", "linear_attn.in_proj_z",
                "linear_attn.in_proj_a", "linear_attn.in_proj_b", "linear_attn.out_proj",
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    if "moe" in kind:
        expected |= {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                     "mlp.shared_expert_gate"}
        expected |= {f"mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    else:
        expected |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert modules == expected
    assert "lm_head.lora_A.weight" in names
    for never in ("conv1d", "A_log", "dt_bias", "norm", "mlp.gate.", "in_proj_qkv"):
        assert not any(never in n for n in names), never
    # Layer 0's split adapters, random, everything else zero: PEFT's output equals the
    # base model with in_proj_qkv's q, k and v rows each moved by (alpha / r) B A.
    g = torch.Generator().manual_seed(3)
    values = {n: torch.zeros_like(t) for n, t in ref.params().items()}
    la = "model.layers.0.linear_attn"
    for p in R.QWEN3_5_SPLIT_QKV:
        for ab in ("A", "B"):
            key = f"{la}.{p}.lora_{ab}.weight"
            values[key] = 0.3 * torch.randn(values[key].shape, generator=g)
    ref.set_params(values)
    tokens = _tokens(ref.base.config.vocab_size)[0]
    with torch.no_grad():
        got = ref.logits(tokens)
        base = _load(kind, qwen3_5_models[kind])
        before = base(input_ids=tokens[None], use_cache=False).logits[0]
        w = base.model.layers[0].linear_attn.in_proj_qkv.weight
        delta = torch.cat([values[f"{la}.{p}.lora_B.weight"] @ values[f"{la}.{p}.lora_A.weight"]
                           for p in R.QWEN3_5_SPLIT_QKV])
        w.add_(alpha / r * delta)
        want = base(input_ids=tokens[None], use_cache=False).logits[0]
    assert (want - before).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ("qwen3_5_multimodal", "qwen3_5_moe_multimodal"))
def test_the_runtime_runs_the_text_tower_of_the_multimodal_layout(qwen3_5_models, harness, kind):
    """lathe loads the text tower of the hub layout (skipping the vision and MTP tensors) and
    computes the logprobs transformers computes with the text model of the same weights."""
    import reference as R

    ref = R.Reference(qwen3_5_models[TEXT_OF[kind]])
    data = R.pick_batch(ref, 11, lengths=(5, 23, 9))
    want = ref.run(data, backward=False)
    op = {"op": "forward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": data}
    res = harness(qwen3_5_models[kind], {"lora": None, "ops": [op]})
    for j, lp_want in enumerate(want["logprobs"]):
        d = float((res.logprobs(0, j) - lp_want).abs().max())
        assert d <= 1e-4, f"{kind} datum {j}: logprobs max abs diff {d:.3g}"
