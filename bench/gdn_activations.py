#!/usr/bin/env python3
"""What transformers' Gated DeltaNet (Qwen3.5 linear attention) keeps for backward, per token.

Runs one fp32 forward of `Qwen3_5GatedDeltaNet` (transformers' torch path: causal_conv1d
fallback and torch_chunk_gated_delta_rule, chunk 64) on CPU under a saved-tensors hook,
counts the distinct storages autograd saves (the module's input and parameters excluded)
and compares the elements per token with the formula `lathe plan` uses
(client/plan_estimate.cc: MixerElements(linear) less the norm, plus RecurrenceElements).

Usage: python bench/gdn_activations.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json

import torch

CHUNK = 64
# hidden, key heads, value heads, key head dim, value head dim
SHAPES = [(256, 2, 4, 32, 32), (512, 2, 4, 32, 32), (256, 4, 4, 32, 32), (256, 1, 4, 32, 32),
          (256, 2, 8, 32, 32), (256, 2, 4, 64, 32), (256, 2, 4, 32, 64), (256, 2, 4, 16, 16),
          (256, 4, 8, 64, 16), (384, 1, 2, 128, 128), (256, 2, 6, 48, 32)]


def measured(h, hk, hv, dk, dv, tokens) -> float:
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    config = Qwen3_5TextConfig(hidden_size=h, num_hidden_layers=1, layer_types=["linear_attention"],
                               linear_num_key_heads=hk, linear_num_value_heads=hv, linear_key_head_dim=dk,
                               linear_value_head_dim=dv, linear_conv_kernel_dim=4)
    module = Qwen3_5GatedDeltaNet(config, 0).float()
    x = torch.randn(1, tokens, h, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in saved.items() if ptr not in skip) / 4 / tokens


def formula(h, hk, hv, dk, dv) -> float:
    kd, vd = hk * dk, hv * dv
    conv = 2 * kd + vd
    layer = 3 * conv + 2 * vd + 2 * hv  # projections, conv and SiLU, z, a, b, the gated norm's output
    recurrence = 11 * hv * dk + 6 * vd + 5 * hv * CHUNK + hv * dk * dv / CHUNK
    return layer + recurrence


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    for shape in SHAPES:
        m = measured(*shape, args.tokens)
        f = formula(*shape)
        print(json.dumps({"hidden": shape[0], "key_heads": shape[1], "value_heads": shape[2], "dk": shape[3],
                          "dv": shape[4], "tokens": args.tokens, "measured_per_token": round(m, 1),
                          "formula_per_token": round(f, 1), "formula_over_measured": round(f / m, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
