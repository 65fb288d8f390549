#!/usr/bin/env python3
"""Generate tiny random Qwen3 / Qwen3-MoE checkpoints with the real transformers classes.

Usage:
    python tests/parity/make_tiny_models.py KIND OUT_DIR [--seed N]
    python tests/parity/make_tiny_models.py all OUT_ROOT [--seed N]   # one sub-dir per kind

KIND is one of: qwen3, qwen3_tied, qwen3_moe, qwen3_moe_sparse (the session's ``tiny_models``),
or qwen3_moe_sparse_tied (qwen3_moe_sparse with tied embeddings, for the export tests),
or one of the Qwen3.5 kinds (hybrid Gated DeltaNet / gated attention; lathe reads their
configs but does not run them yet, so no parity test uses them): qwen3_5, qwen3_5_moe
(``Qwen3_5ForCausalLM`` / ``Qwen3_5MoeForCausalLM`` text checkpoints) and
qwen3_5_multimodal, qwen3_5_moe_multimodal: the same text models written the way the
Qwen3.5 / Qwen3.6 hub checkpoints are (``Qwen3_5*ForConditionalGeneration`` config with the
text fields under ``text_config``, weights under ``model.language_model.``, a small fake
vision tower under ``model.visual.`` and an ``mtp.`` head, which a loader must skip).
or one of ROPE_BIAS_KINDS: Llama-3-style models with llama3, yarn (saved in the
transformers 4.x ``rope_scaling`` + ``rope_theta`` spelling) and linear RoPE scaling (the
linear one with ``attention_bias``: q/k/v/o biases), and Qwen2.5-shaped models (q/k/v biases),
untied and tied. The scaled RoPE models use a short ``original_max_position_embeddings`` (16 or
32 of 128 positions) so that short sequences already reach the rescaled frequencies.

The models are float32 and saved with ``save_pretrained`` (safetensors).  Weights are
re-initialised with a larger spread than the transformers default so that logits are far
from uniform and MoE routing decisions have comfortable margins.

Note on the on-disk MoE layout (transformers 5.x): in memory the experts of a
Qwen3-MoE block are fused 3-D parameters (``mlp.experts.gate_up_proj`` [E, 2*Im, H],
gate rows first, and ``mlp.experts.down_proj`` [E, H, Im]); ``save_pretrained`` reverts
the weight conversion, so the checkpoint holds the legacy per-expert keys
``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``.  ``checkpoint_layout``
below reports which layout a saved directory actually has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

KINDS = ("qwen3", "qwen3_tied", "qwen3_moe", "qwen3_moe_sparse")
EXTRA_KINDS = ("qwen3_moe_sparse_tied",)
QWEN3_5_KINDS = ("qwen3_5", "qwen3_5_moe", "qwen3_5_multimodal", "qwen3_5_moe_multimodal")
# The hybrid (linear + softmax attention) models the runtime parity suite runs.
HYBRID_KINDS = ("qwen3_5", "qwen3_5_moe")
# DeepSeek-V3 (multi-head latent attention, sigmoid group-limited routing, shared
# experts, dense first layers). deepseek_v3 is shaped like Kimi-K2 (q LoRA, interleaved
# RoPE with yarn and the mscale softmax correction, one group, untied);
# deepseek_v3_grouped like DeepSeek-V3 itself with q_proj instead of the q LoRA (4 groups
# of which 2 are kept, halves RoPE, two shared experts, no renormalisation, tied).
MLA_KINDS = ("deepseek_v3", "deepseek_v3_grouped")
# GLM-5 (GlmMoeDsaForCausalLM): the latent attention of deepseek_v3 made sparse by the
# DeepSeek sparse-attention indexer. index_topk 8: sequences of up to 8 tokens attend to
# every earlier key (plain latent attention), longer ones to the indexer's 8 best; layer 1
# shares layer 0's selection (indexer_types full, shared, full). 16 indexer heads keep the
# relu'd index scores free of ties.
DSA_KINDS = ("glm_moe_dsa",)
ROPE_BIAS_KINDS = ("llama3_rope", "llama_yarn", "llama_linear_bias", "qwen2", "qwen2_tied")

# Shared architecture knobs.  Vocab sizes differ per model (and are not powers of two)
# to catch shape mix-ups.
_COMMON = dict(
    hidden_size=64,
    num_key_value_heads=2,
    intermediate_size=96,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    use_cache=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def _rope_kwargs():
    # transformers 5 expresses rope_theta through rope_parameters.
    return dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _qwen3_5_text_kwargs(vocab_size: int) -> dict:
    # 3 linear-attention layers then a full-attention one (transformers' default
    # pattern); 4 value heads over 2 key heads exercises the GVA repeat, head_dim 32
    # with partial_rotary_factor 0.25 gives 8 rotary dims (mrope_section sums to 4).
    return dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=128, hidden_act="silu",
        attention_bias=False, attention_dropout=0.0, use_cache=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True})


def _qwen3_5_config(kind: str):
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    if kind.startswith("qwen3_5_moe"):
        kw = _qwen3_5_text_kwargs(152)
        kw.pop("intermediate_size")  # every layer is MoE
        return Qwen3_5MoeTextConfig(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, output_router_logits=False,
            tie_word_embeddings=False, **kw)
    return Qwen3_5TextConfig(tie_word_embeddings=True, **_qwen3_5_text_kwargs(136))


def _deepseek_v3_config(kind: str):
    from transformers import DeepseekV3Config

    common = dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
        first_k_dense_replace=1, rms_norm_eps=1e-5, max_position_embeddings=128, hidden_act="silu",
        attention_bias=False, attention_dropout=0.0, use_cache=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, output_router_logits=False)
    if kind == "deepseek_v3":
        # Kimi-K2's rope: yarn x64 over an original 4096 with mscale = mscale_all_dim = 1, so
        # cos/sin are unscaled and the softmax scale is (0.1 ln 64 + 1)^2 / sqrt(24).
        rope = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 64.0, "original_max_position_embeddings": 4096,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
        return DeepseekV3Config(
            vocab_size=157, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2,
            n_group=1, topk_group=1, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.827,
            rope_interleave=True, tie_word_embeddings=False, rope_parameters=rope, **common)
    return DeepseekV3Config(
        vocab_size=163, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=2.5,
        rope_interleave=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)


def _glm_moe_dsa_config():
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(
        vocab_size=167, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
        index_topk=8, index_head_dim=16, index_n_heads=16, indexer_types=["full", "shared", "full"],
        rms_norm_eps=1e-5, max_position_embeddings=128, hidden_act="silu", attention_bias=False,
        attention_dropout=0.0, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        output_router_logits=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build_config(kind: str):
    from transformers import Qwen3Config, Qwen3MoeConfig

    if kind in DSA_KINDS:
        return _glm_moe_dsa_config()
    if kind in QWEN3_5_KINDS:
        return _qwen3_5_config(kind)
    if kind in MLA_KINDS:
        return _deepseek_v3_config(kind)

    if kind == "qwen3":
        # heads * head_dim == hidden
        return Qwen3Config(
            vocab_size=160, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
            tie_word_embeddings=False, **_COMMON, **_rope_kwargs())
    if kind == "qwen3_tied":
        # heads * head_dim (128) != hidden (64)
        return Qwen3Config(
            vocab_size=131, num_attention_heads=4, head_dim=32, num_hidden_layers=2,
            tie_word_embeddings=True, **_COMMON, **_rope_kwargs())
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            vocab_size=192, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
            tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], output_router_logits=False, **_COMMON, **_rope_kwargs())
    if kind in ("qwen3_moe_sparse", "qwen3_moe_sparse_tied"):
        # layers 0, 2 dense (0 via mlp_only_layers, 2 via the sparse step), 1, 3 MoE
        return Qwen3MoeConfig(
            vocab_size=144, num_attention_heads=4, head_dim=32, num_hidden_layers=4,
            tie_word_embeddings=kind.endswith("_tied"), num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, norm_topk_prob=False, decoder_sparse_step=2,
            mlp_only_layers=[0], output_router_logits=False, **_COMMON, **_rope_kwargs())
    if kind in ROPE_BIAS_KINDS:
        return _rope_bias_config(kind)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS + EXTRA_KINDS + MLA_KINDS + ROPE_BIAS_KINDS}")


def _rope_bias_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(_COMMON, num_attention_heads=4, num_hidden_layers=2)
    if kind == "llama3_rope":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return LlamaConfig(vocab_size=139, head_dim=16, tie_word_embeddings=False, rope_parameters=rope, **common)
    if kind == "llama_yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
        return LlamaConfig(vocab_size=149, head_dim=16, tie_word_embeddings=False, rope_parameters=rope, **common)
    if kind == "llama_linear_bias":
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
        return LlamaConfig(vocab_size=137, head_dim=16, tie_word_embeddings=False, rope_parameters=rope,
                           **dict(common, attention_bias=True))
    # Qwen2.5: q/k/v biases, no q/k norm, head_dim = hidden / heads
    return Qwen2Config(vocab_size=151 if kind == "qwen2" else 133, tie_word_embeddings=kind == "qwen2_tied",
                       use_sliding_window=False, sliding_window=None, max_window_layers=2,
                       **{k: v for k, v in common.items() if k != "attention_bias"}, **_rope_kwargs())


def _to_transformers4_rope_spelling(out_dir: str) -> None:
    """Rewrites config.json's rope settings as transformers 4.x checkpoints carry them:
    ``rope_scaling`` (with the legacy ``type`` key) and a top-level ``rope_theta``."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _reinit_(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1234)
    # Qwen3.5's RMSNorms scale by (1 + w) and store w = gain - 1, except the Gated
    # DeltaNet's gated norm (linear_attn.norm), which scales by w.
    one_plus_w = model.config.model_type.startswith("qwen3_5")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if one_plus_w and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
                p.copy_(0.1 * noise)                    # gains around 1 = 1 + w
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)              # RMSNorm gains around 1
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.3 * noise)                    # decisive routing
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(0.15 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3, GLM-5: shifts which experts are chosen
                b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float32))


def make_model(kind: str, out_dir: str, seed: int = 0, max_shard_size: str | None = None):
    """Build the tiny model ``kind``, save it into ``out_dir`` (in shards of at most
    ``max_shard_size`` with an index, when given) and return the model (eval mode)."""
    from transformers import (DeepseekV3ForCausalLM, GlmMoeDsaForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM,
                              Qwen3ForCausalLM, Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    config = build_config(kind)
    if kind in MLA_KINDS:
        cls = DeepseekV3ForCausalLM
    elif kind in DSA_KINDS:
        cls = GlmMoeDsaForCausalLM
    elif kind in QWEN3_5_KINDS:
        cls = Qwen3_5MoeForCausalLM if kind.startswith("qwen3_5_moe") else Qwen3_5ForCausalLM
    elif kind.startswith("llama"):
        cls = LlamaForCausalLM
    elif kind.startswith("qwen2"):
        cls = Qwen2ForCausalLM
    else:
        cls = Qwen3MoeForCausalLM if kind.startswith("qwen3_moe") else Qwen3ForCausalLM
    model = cls(config).to(torch.float32)
    _reinit_(model, seed)
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    if kind.endswith("_multimodal"):
        write_multimodal_layout(out_dir, seed)
    if kind == "llama_yarn":
        _to_transformers4_rope_spelling(out_dir)
    return model


def write_multimodal_layout(out_dir: str, seed: int = 0) -> dict:
    """Rewrites the text checkpoint in ``out_dir`` the way Qwen3.5 / Qwen3.6 hub checkpoints
    are laid out: experts fused, a ``Qwen3_5[Moe]ForConditionalGeneration`` config whose text fields sit
    under ``text_config`` (tie_word_embeddings at the top, which is the flag transformers
    ties by; text_config gets the opposite value so a reader that looks there is caught),
    the text weights under ``model.language_model.`` (``lm_head.weight`` unchanged), plus a
    small random vision tensor under ``model.visual.`` and an ``mtp.`` head. Returns the config."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(out_dir, "config.json")) as f:
        text = json.load(f)
    tensors = load_file(os.path.join(out_dir, "model.safetensors"))
    # The hub checkpoints store each MoE layer's experts fused: gate_up_proj [E, 2I, H]
    # (gate rows first) and down_proj [E, H, I].
    experts = text.get("num_experts") or 0
    for layer in sorted({k.split(".")[2] for k in tensors if ".mlp.experts." in k}):
        p = f"model.layers.{layer}.mlp.experts"
        gate = torch.stack([tensors.pop(f"{p}.{e}.gate_proj.weight") for e in range(experts)])
        up = torch.stack([tensors.pop(f"{p}.{e}.up_proj.weight") for e in range(experts)])
        tensors[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        tensors[f"{p}.down_proj"] = torch.stack([tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(experts)])
    out = {}
    for name, t in tensors.items():
        out["model.language_model." + name[len("model."):] if name.startswith("model.") else name] = t
    g = torch.Generator().manual_seed(seed + 77)
    hidden = text["hidden_size"]
    out["model.visual.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 4, 4, generator=g)
    out["model.visual.merger.linear_fc2.weight"] = torch.randn(hidden, 64, generator=g)  # 16 wide x 2x2 merge
    out["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
    out["mtp.norm.weight"] = torch.randn(hidden, generator=g)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    moe = text["model_type"] == "qwen3_5_moe_text"
    tied = bool(text.get("tie_word_embeddings", False))
    text_config = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version")}
    text_config["tie_word_embeddings"] = not tied
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "tie_word_embeddings": tied,
        "text_config": text_config,
        "vision_config": {"model_type": "qwen3_5_moe" if moe else "qwen3_5", "depth": 1, "hidden_size": 16,
                          "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
                          "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2},
        "image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 3, "vision_end_token_id": 4,
        "dtype": text.get("dtype", "float32"),
        "transformers_version": text.get("transformers_version"),
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def write_kimi_layout(text_dir: str, out_dir: str, seed: int = 0, tie_flag: bool | None = False) -> dict:
    """Writes the DeepSeek-V3 text model of ``text_dir`` into ``out_dir`` the way the Kimi-K2.5 /
    K2.6 hub checkpoints are laid out: a ``KimiK25ForConditionalGeneration`` config whose text
    fields sit under ``text_config`` (model_type ``kimi_k2``), the text weights under
    ``language_model.model.`` and ``language_model.lm_head.weight``, small random
    ``vision_tower.`` / ``mm_projector.`` tensors and a multi-token-prediction layer after the
    last decoder layer, which a loader must skip. ``tie_flag`` is the top-level
    tie_word_embeddings (None: absent, which transformers reads as true); text_config gets
    the opposite value so a reader that looks there is caught. A tied layout has no
    ``language_model.lm_head.weight`` (transformers ties by the flag only when the checkpoint
    does not hold a different head). Returns the config."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(text_dir, "config.json")) as f:
        text = json.load(f)
    tensors = load_file(os.path.join(text_dir, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name == "lm_head.weight" and tie_flag is not False:
            continue
        out["language_model." + name] = t  # model.* -> language_model.model.*, lm_head -> language_model.lm_head
    g = torch.Generator().manual_seed(seed + 99)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    out["vision_tower.tiny_stand_in.weight"] = torch.randn(16, 3, 4, 4, generator=g)
    out["mm_projector.tiny_stand_in.weight"] = torch.randn(hidden, 16, generator=g)
    out[f"language_model.model.layers.{layers}.input_layernorm.weight"] = torch.randn(hidden, generator=g)
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    text_config = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version")}
    text_config["model_type"] = "kimi_k2"
    text_config["tie_word_embeddings"] = not bool(tie_flag)
    config = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
              "text_config": text_config,
              "vision_config": {"model_type": "kimi_k25_vision", "patch_size": 4, "num_attention_heads": 2,
                                "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32},
              "projection_hidden_size": 16, "dtype": text.get("dtype", "float32")}
    if tie_flag is not None:
        config["tie_word_embeddings"] = tie_flag
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def checkpoint_layout(out_dir: str) -> str:
    """'per_expert', 'fused' or 'dense' depending on how the experts were written."""
    from safetensors import safe_open

    keys = []
    for fn in sorted(os.listdir(out_dir)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(out_dir, fn), "pt") as f:
                keys.extend(f.keys())
    if any(".mlp.experts.gate_up_proj" in k for k in keys):
        return "fused"
    if any(".mlp.experts.0.gate_proj.weight" in k for k in keys):
        return "per_expert"
    return "dense"


def write_fused_experts(src: str, dst) -> dict:
    """Writes the model of folder `src` to folder `dst` with each MoE layer's experts stored
    fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), as
    some checkpoints hold them; returns its config."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    experts = config.get("num_experts") or config.get("num_local_experts")
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in sorted({k.split(".")[2] for k in tensors if ".mlp.experts." in k}):
        p = f"model.layers.{layer}.mlp.experts"
        gate = torch.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(experts)])
        up = torch.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(experts)])
        fused[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(experts)])
    os.makedirs(dst, exist_ok=True)
    save_file(fused, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS + EXTRA_KINDS + QWEN3_5_KINDS + MLA_KINDS + DSA_KINDS + ROPE_BIAS_KINDS
                    + ("all",))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        out = os.path.join(args.out_dir, kind) if args.kind == "all" else args.out_dir
        make_model(kind, out, seed=args.seed)
        print(json.dumps({"kind": kind, "dir": out, "layout": checkpoint_layout(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
