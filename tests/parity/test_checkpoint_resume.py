"""save_state / load_state of Qwen3.5 runs (Gated DeltaNet + gated attention layers; dense and
MoE) and DeepSeek-V3 runs (latent attention, sigmoid-routed experts): a run that saves midway, loads in a fresh process and takes the remaining steps ends
bit for bit where the straight run ends (parameters, Adam moments through the steps after
loading, logprobs), with LoRA and with full fine-tuning (where in_proj_qkv and conv1d are
trained whole; DeepSeek-V3's q_b_proj and kv_b_proj, which LoRA leaves alone), in float32
and bfloat16."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reference import random_batch

ADAM = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01}
LORA = {"rank": 4, "alpha": 8.0, "seed": 3}


def _train(vocab: int, seeds) -> list[dict]:
    ops = []
    for seed in seeds:
        ops += [{"op": "forward_backward", "loss_fn": "cross_entropy", "data": random_batch(seed, vocab)},
                {"op": "optim_step", "adam": ADAM}]
    return ops


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str):
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs by {float((a[name] - b[name]).abs().max())}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_5_moe", "deepseek_v3", "deepseek_v3_grouped", "glm_moe_dsa"])
def test_resume_from_a_checkpoint_is_bit_exact(kind, mode, dtype, tiny_models, harness, tmp_path):
    model_dir = tiny_models[kind]
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    lora = LORA if mode == "lora" else None
    ckpt = str(tmp_path / "mid")
    before, after = _train(vocab, (0, 1)), _train(vocab, (2, 3))
    straight = harness(model_dir, {"lora": lora, "dtype": dtype, "ops": before + [{"op": "save_state", "dir": ckpt}]
                                   + after + [{"op": "dump", "prefix": "end"}]})
    resumed = harness(model_dir, {"lora": lora, "dtype": dtype, "ops": [{"op": "load_state", "dir": ckpt}]
                                  + after + [{"op": "dump", "prefix": "end"}]})
    assert resumed.meta["op0.step"] == "2"
    if mode == "full" and (kind.startswith("deepseek") or kind.startswith("glm")):
        names = set(resumed.params("end"))
        assert any(n.endswith("self_attn.kv_b_proj.weight") for n in names), sorted(names)[:8]
        assert not any(n.endswith("e_score_correction_bias") or ".indexer." in n for n in names)
    elif mode == "full":
        names = set(resumed.params("end"))
        assert any(n.endswith("linear_attn.in_proj_qkv.weight") for n in names), sorted(names)[:8]
        assert any(n.endswith("linear_attn.conv1d.weight") for n in names), sorted(names)[:8]
    first = len(before) + 1  # the straight run's first op after the save
    for i in range(0, len(after), 2):
        for d in range(3):
            a, b = straight.logprobs(first + i, d), resumed.logprobs(1 + i, d)
            assert torch.equal(a, b), (i, d, float((a - b).abs().max()))
        assert straight.metrics(first + i + 1) == resumed.metrics(1 + i + 1), i
    # The loaded run really trains on from the checkpoint: it ends away from the base.
    _assert_bitwise(straight.params("end"), resumed.params("end"), "straight vs resumed")
    init = resumed.params("init")
    assert any(not torch.equal(init[n], t) for n, t in resumed.params("end").items())
