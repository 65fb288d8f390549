"""GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3's latent attention made sparse by the DeepSeek
sparse-attention indexer, against transformers 5.23's glm_moe_dsa.

The tiny model's forward, gradients, Adam step, sharded runs, decoding, exports, resume and
FP8 load are compared in the shared suites (test_parity, test_sharded_mla, test_generate,
test_peft_export, test_checkpoint_resume, test_quantized_checkpoints). Here:

* GLM-5.2's config and the tiny one are read as transformers reads them (indexer widths,
  the indexer_types schedule from index_topk_freq / index_skip_topk_offset or a pattern,
  GLM's defaults, dense layers, eps); what transformers would compute differently or could
  not build is refused by field;
* both regimes of the sparse attention: a packed batch of documents no longer than
  index_topk (every earlier key kept: plain latent attention, bitwise what transformers
  computes with a larger index_topk) and longer ones (the indexer's choice decides the
  logprobs), each document equal to its own transformers run;
* the indexer never trains: neither full fine-tuning nor LoRA registers its tensors, and
  they leave a full fine-tuning run unchanged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import pytest
import torch

import reference as R
from model_views import read_config

GLM_5_2 = dict(
    architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144,
    intermediate_size=12288, moe_intermediate_size=2048, num_hidden_layers=78, num_attention_heads=64,
    num_key_value_heads=64, q_lora_rank=2048, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64,
    v_head_dim=256, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=3, index_n_heads=32, index_head_dim=128, index_topk=2048, index_topk_freq=4,
    index_skip_topk_offset=3, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 8e6}, max_position_embeddings=1048576,
    num_nextn_predict_layers=1, tie_word_embeddings=False, hidden_act="silu")
# Only what GlmMoeDsaConfig has no default for: the rest comes from its defaults.
GLM_MINIMAL = dict(architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", vocab_size=154880,
                   hidden_size=6144, intermediate_size=12288, num_hidden_layers=78, num_attention_heads=64,
                   rope_parameters={"rope_type": "default", "rope_theta": 8e6})
FWD_ATOL = 1e-4


def _transformers_view(config: dict) -> dict:
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import yarn_apply_mscale

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = GlmMoeDsaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    selection, last = [], None
    for i, kind in enumerate(cfg.indexer_types):
        last = i if kind == "full" else last
        selection.append(last)
    return dict(
        softmax_scale=yarn_apply_mscale(cfg.rope_parameters, cfg.qk_head_dim ** -0.5), head_dim=cfg.qk_head_dim,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, v_head_dim=cfg.v_head_dim,
        experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, shared=cfg.moe_intermediate_size * cfg.n_shared_experts,
        dense=[i for i, t in enumerate(cfg.mlp_layer_types) if t == "dense"], eps=cfg.rms_norm_eps,
        indexer={"index_topk": cfg.index_topk, "index_head_dim": cfg.index_head_dim,
                 "index_n_heads": cfg.index_n_heads, "selection_layer": selection},
        scaling=cfg.routed_scaling_factor, layers=cfg.num_hidden_layers)


def _tiny_config(tiny_models) -> dict:
    return json.load(open(os.path.join(tiny_models["glm_moe_dsa"], "config.json")))


@pytest.mark.parametrize("name", ["glm_5_2", "minimal", "pattern", "tiny"])
def test_config_is_read_as_transformers_reads_it(name, tiny_models, tmp_path):
    config = {"glm_5_2": GLM_5_2, "minimal": GLM_MINIMAL,
              "pattern": dict(GLM_MINIMAL, num_hidden_layers=6, index_topk_pattern="FFSFSS",
                              mlp_layer_types=["dense", "sparse", "dense", "sparse", "sparse", "sparse"]),
              "tiny": _tiny_config(tiny_models) if name == "tiny" else None}[name]
    want = _transformers_view(config)
    run = read_config(config, tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    a = got["latent_attention"]
    assert math.isclose(a["softmax_scale"], want["softmax_scale"], rel_tol=1e-12)
    assert (got["head_dim"], a["q_lora_rank"], a["kv_lora_rank"], a["v_head_dim"], a["rope_interleave"]) == (
        want["head_dim"], want["q_lora_rank"], want["kv_lora_rank"], want["v_head_dim"], True)
    assert (got["num_experts"], got["num_experts_per_tok"]) == (want["experts"], want["top_k"])
    assert math.isclose(got["sigmoid_router"]["routed_scaling_factor"], want["scaling"])
    assert got["shared_expert"]["intermediate_size"] == want["shared"]
    assert got["mlp_only_layers"] == want["dense"]
    assert got["rms_norm_eps"] == want["eps"]
    assert got["sparse_indexer"] == want["indexer"]
    assert got["checkpoint"]["skip_prefixes"] == [f"model.layers.{want['layers']}."]
    if name == "glm_5_2":  # layers 0-2, 6, 10, ..., 74 run their own indexer
        full = [i for i, s in enumerate(got["sparse_indexer"]["selection_layer"]) if s == i]
        assert full == [0, 1, 2] + list(range(6, 78, 4))


@pytest.mark.parametrize("change,field", [
    ({"q_lora_rank": None}, "q_lora_rank"),
    ({"indexer_types": ["shared"] + ["full"] * 77}, "indexer_types"),
    ({"indexer_types": ["full"] * 77}, "indexer_types"),
    ({"indexer_types": ["full"] * 77 + ["sparse"]}, "indexer_types"),
    ({"index_topk_pattern": "FFS"}, "index_topk_pattern"),
    ({"index_head_dim": 32}, "index_head_dim"),
    ({"index_topk": 0}, "index_topk"),
    ({"index_n_heads": -1}, "index_n_heads"),
    ({"index_skip_topk_offset": -(2 ** 63)}, "index_skip_topk_offset"),
    ({"mlp_layer_types": ["dense"] * 3}, "mlp_layer_types"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
])
def test_unsupported_config_is_refused_by_field(change, field, tmp_path):
    run = read_config(dict(GLM_5_2, **change), tmp_path)
    assert run.returncode == 1, run.stdout
    assert f"'{field}'" in run.stderr, run.stderr


def _with_index_topk(src: str, out: str, topk: int) -> str:
    """The model of folder `src` with index_topk `topk` (same weights)."""
    shutil.copytree(src, out)
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config["index_topk"] = topk
    json.dump(config, open(path, "w"))
    return out


def _fwd(data):
    return {"op": "forward", "loss_fn": "cross_entropy", "data": data}


def test_both_regimes_of_packed_documents_match_transformers(tiny_models, harness, tmp_path):
    """One packed row of documents (the runtime's layout) against one transformers run per
    document. Documents of up to index_topk (8) tokens see every earlier key: transformers'
    logprobs for them are bitwise those of the same weights with index_topk 128 (plain latent
    attention). Longer ones see the indexer's 8 best keys, which moves their logprobs off the
    dense model's by far more than the tolerance. lathe matches the sparse model on all of
    them, and the dense one on its own folder; no key is chosen across a document boundary
    (the batch would otherwise differ from the per-document runs)."""
    sparse_dir = tiny_models["glm_moe_dsa"]
    dense_dir = _with_index_topk(sparse_dir, str(tmp_path / "dense"), 128)
    sparse, dense = R.Reference(sparse_dir), R.Reference(dense_dir)
    lengths = (6, 8, 17, 30, 3, 12)
    data = R.pick_batch(sparse, 71, min_margin=1e-4, lengths=lengths)
    want_s, want_d = sparse.run(data, backward=False), dense.run(data, backward=False)
    for j, n in enumerate(lengths):
        same = torch.equal(want_s["logprobs"][j], want_d["logprobs"][j])
        assert same is (n <= 8), (n, float((want_s["logprobs"][j] - want_d["logprobs"][j]).abs().max()))
        if n > 8:
            assert float((want_s["logprobs"][j] - want_d["logprobs"][j]).abs().max()) > 1e-2, n
    got_s = harness(sparse_dir, {"lora": None, "ops": [_fwd(data)]})
    got_d = harness(dense_dir, {"lora": None, "ops": [_fwd(data)]})
    for j in range(len(data)):
        assert float((got_s.logprobs(0, j) - want_s["logprobs"][j]).abs().max()) <= FWD_ATOL, j
        assert float((got_d.logprobs(0, j) - want_d["logprobs"][j]).abs().max()) <= FWD_ATOL, j


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_indexer_never_trains(mode, tiny_models, harness, tmp_path):
    """transformers computes the indexer under no_grad: lathe registers none of its tensors
    for training (full fine-tuning) and attaches no adapter to them (LoRA), and after full
    fine-tuning steps on long documents the forward still selects the keys with the
    checkpoint's indexer: its logprobs are transformers' on the trained weights with the
    original indexer."""
    d = tiny_models["glm_moe_dsa"]
    lora = None if mode == "full" else {"rank": 4, "alpha": 8.0, "seed": 0}
    adam = {"learning_rate": 2e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    train = R.random_batch(3, 167, lengths=(17, 25))
    probe = R.random_batch(9, 167, lengths=(20, 11))
    ops = [{"op": "forward_backward", "loss_fn": "cross_entropy", "data": train}, {"op": "optim_step", "adam": adam},
           {"op": "dump", "prefix": "after"}, _fwd(probe)]
    res = harness(d, {"lora": lora, "ops": ops})
    names = list(res.params("after"))
    assert names and not [n for n in names if ".indexer." in n], names
    assert any(".self_attn." in n for n in names)
    if mode != "full":
        return
    ref = R.Reference(d)
    ref.set_params(res.params("after"))
    want = ref.run(probe, backward=False)
    for j in range(len(probe)):
        assert float((res.logprobs(3, j) - want["logprobs"][j]).abs().max()) <= FWD_ATOL, j
