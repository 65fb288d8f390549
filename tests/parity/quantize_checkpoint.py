#!/usr/bin/env python3
"""Quantize a Hugging Face safetensors checkpoint the way the hub's quantized models are stored.

Usage:
    python tests/parity/quantize_checkpoint.py fp8 IN_DIR OUT_DIR [--block R C]
    python tests/parity/quantize_checkpoint.py int4 IN_DIR OUT_DIR [--group 32] [--placement top|text|both]

fp8: block FP8 as DeepSeek-V3 / GLM-5.2-FP8 store it: every linear weight (2-D ``*.weight`` but
the embedding, lm_head, the MoE router and norms) becomes float8_e4m3fn with a float32
``*.weight_scale_inv`` of one factor per (R x C) block, edge blocks partial; config.json gets
``quantization_config`` {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [R, C]}.

int4: compressed-tensors "pack-quantized" as Kimi-K2 stores its experts: symmetric int4 with a
bf16 scale per group of ``group`` input columns, the values offset by 8 and packed eight to an
int32 (value i of a word in bits 4i..4i+3), ``weight_packed`` / ``weight_scale`` /
``weight_shape``. Only the MoE experts are quantized when the model has any (Kimi's layout),
every MLP projection otherwise; the config's ``ignore`` list names the rest. On a Kimi-K2.5 /
K2.6 wrapper folder (make_tiny_models.write_kimi_layout) ``ignore`` spells the wrapper's names
(``language_model.lm_head``, the vision tower and projector), and ``--placement text`` puts the
config under ``text_config`` as the hub's Kimi checkpoints have it (``both``: in both places).

Both write the exact dequantized model (float32) too, with ``dequantized_dir``, for the
reference: W = fp8 · scale_inv, or W = q · scale (q the signed value), in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0


def _is_linear(name: str, t: torch.Tensor) -> bool:
    if t.dim() != 2 or not name.endswith(".weight"):
        return False
    return not any(s in name for s in ("embed_tokens", "lm_head", "norm")) and not name.endswith("mlp.gate.weight")


def _blocks(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[R, C] → [ceil(R/rows), ceil(C/cols), rows, cols], edge blocks zero-padded."""
    r, c = t.shape
    pr, pc = -r % rows, -c % cols
    t = torch.nn.functional.pad(t, (0, pc, 0, pr))
    return t.reshape((r + pr) // rows, rows, (c + pc) // cols, cols).permute(0, 2, 1, 3)


def quantize_fp8(w: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(R/rows), ceil(C/cols)])."""
    w = w.float()
    amax = _blocks(w, rows, cols).abs().amax(dim=(-2, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    full = scale_inv.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: w.shape[0], : w.shape[1]]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    full = scale_inv.float().repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * full


def quantize_int(w: torch.Tensor, group: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values in [-2^(bits-1), 2^(bits-1) - 1], bf16 scale [R, C / group])."""
    r, c = w.shape
    assert c % group == 0, (w.shape, group)
    g = w.float().reshape(r, c // group, group)
    top = 2 ** (bits - 1)
    scale = (g.abs().amax(-1) / (top - 1)).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(g / scale.float()[..., None]).clamp(-top, top - 1).to(torch.int8)
    return q.reshape(r, c), scale


def pack_int32(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 along dim 1: values + 2^(bits-1), value i of each
    word in bits [bits·i, bits·(i+1)), the last word zero-padded."""
    per = 32 // bits
    r, c = q.shape
    u = (q.to(torch.int64) + 2 ** (bits - 1))
    u = torch.nn.functional.pad(u, (0, -c % per)).reshape(r, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    return q.float() * scale.float().repeat_interleave(group, 1)


def _write(out_dir: str, in_dir: str, tensors: dict, quant_config: dict | None, placement: str = "top") -> None:
    """``placement``: where config.json gets ``quantization_config``: "top" (the top level),
    "text" (under ``text_config``, where the Kimi-K2.5 / K2.6 wrapper keeps it) or "both"."""
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(in_dir):
        if f.endswith(".json") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(in_dir, f), os.path.join(out_dir, f))
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    if quant_config is not None:
        if placement in ("top", "both"):
            config["quantization_config"] = quant_config
        if placement in ("text", "both"):
            config["text_config"]["quantization_config"] = json.loads(json.dumps(quant_config))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def write_fp8(in_dir: str, out_dir: str, block: tuple[int, int] | None = (128, 128),
              dequantized_dir: str | None = None, not_convert: list[str] | None = None) -> list[str]:
    """Writes the block-FP8 checkpoint; ``block`` None leaves weight_block_size out of the
    config (the default, 128 x 128). Returns the quantized weights' names."""
    rows, cols = block or (128, 128)
    src = load_file(os.path.join(in_dir, "model.safetensors"))
    out, deq, done = {}, {}, []
    for name, t in src.items():
        module = name[: -len(".weight")]
        if _is_linear(name, t) and not any(re.search(p, module) for p in not_convert or []):
            q, s = quantize_fp8(t, rows, cols)
            out[name], out[module + ".weight_scale_inv"] = q, s
            deq[name] = dequantize_fp8(q, s, rows, cols)
            done.append(name)
        else:
            out[name] = deq[name] = t
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block is not None:
        qc["weight_block_size"] = list(block)
    if not_convert:
        qc["modules_to_not_convert"] = not_convert
    _write(out_dir, in_dir, out, qc)
    if dequantized_dir:
        _write(dequantized_dir, in_dir, deq, None)
    return done


def _is_kimi_wrapper(in_dir: str) -> bool:
    with open(os.path.join(in_dir, "config.json")) as f:
        return "KimiK25ForConditionalGeneration" in json.load(f).get("architectures", [])


def write_int4(in_dir: str, out_dir: str, group: int = 32, dequantized_dir: str | None = None,
               placement: str = "top") -> list[str]:
    """On a Kimi-K2.5 / K2.6 wrapper folder (make_tiny_models.write_kimi_layout) the experts
    under ``language_model.model.`` are quantized, and ``ignore`` spells the modules as the
    wrapper's checkpoint does, the vision tower and projector included; ``placement`` says
    where the config goes (see _write)."""
    src = load_file(os.path.join(in_dir, "model.safetensors"))
    moe = any(".experts." in n for n in src)
    kimi = _is_kimi_wrapper(in_dir)
    out, deq, done = {}, {}, []
    for name, t in src.items():
        module = name[: -len(".weight")]
        pick = ".experts." in name if moe else re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", name)
        if _is_linear(name, t) and pick:
            q, s = quantize_int(t, group)
            out[module + ".weight_packed"] = pack_int32(q)
            out[module + ".weight_scale"] = s
            out[module + ".weight_shape"] = torch.tensor(t.shape, dtype=torch.int64)
            deq[name] = dequantize_int(q, s, group)
            done.append(name)
        else:
            out[name] = deq[name] = t
    ignore = ["language_model.lm_head" if kimi else "lm_head", r"re:.*self_attn.*", r"re:.*mlp\.gate$"]
    if moe:
        ignore.append(r"re:.*mlp\.(gate|up|down)_proj$")
    if kimi:
        ignore += [r"re:.*shared_experts.*", r"re:vision_tower.*", r"re:mm_projector.*"]
    qc = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "input_activations": None, "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax"}}},
        "ignore": ignore, "kv_cache_scheme": None,
    }
    _write(out_dir, in_dir, out, qc, placement)
    if dequantized_dir:
        _write(dequantized_dir, in_dir, deq, None)
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=["fp8", "int4"])
    p.add_argument("in_dir")
    p.add_argument("out_dir")
    p.add_argument("--block", type=int, nargs=2, default=[128, 128])
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--dequantized", help="also write the exact dequantized model here")
    p.add_argument("--placement", choices=["top", "text", "both"], default="top",
                   help="int4: where quantization_config goes (text: under text_config, as Kimi-K2.5 has it)")
    a = p.parse_args()
    if a.format == "fp8":
        write_fp8(a.in_dir, a.out_dir, tuple(a.block), a.dequantized)
    else:
        write_int4(a.in_dir, a.out_dir, a.group, a.dequantized, a.placement)


if __name__ == "__main__":
    main()
