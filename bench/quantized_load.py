#!/usr/bin/env python3
"""Load time and peak memory of a quantized base checkpoint against the bf16 one.

Writes one random Qwen3 model (bf16 safetensors), quantizes it to block FP8 (128 x 128) and to
compressed-tensors pack-quantized INT4 (the MLP projections, group 32) with
tests/parity/quantize_checkpoint.py, then times lathe_harness loading each (a request with no
ops: config, mapping, every weight read, dequantized and converted), with its CPU time (less
sensitive than wall time to other load on the machine), and reads the process's peak resident set. Prints one JSON line per (checkpoint, dtype), best of --repeat runs.

    .venv/bin/python bench/quantized_load.py --build_dir build [--cache /tmp/lathe_quant_bench]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "parity"))

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)


def write_models(cache: str) -> dict[str, str]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import quantize_checkpoint as Q

    dirs = {k: os.path.join(cache, k) for k in ("bf16", "fp8", "int4")}
    if not os.path.exists(os.path.join(dirs["bf16"], "config.json")):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPE, max_position_embeddings=4096)).to(torch.bfloat16)
        model.save_pretrained(dirs["bf16"])
    if not os.path.exists(os.path.join(dirs["fp8"], "config.json")):
        Q.write_fp8(dirs["bf16"], dirs["fp8"], (128, 128))
    if not os.path.exists(os.path.join(dirs["int4"], "config.json")):
        Q.write_int4(dirs["bf16"], dirs["int4"], 32)
    return dirs


def load_once(exe: str, model: str, dtype: str, work: str) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one harness process that only loads `model`."""
    req = os.path.join(work, "req.json")
    with open(req, "w") as f:
        json.dump({"lora": None, "dtype": dtype, "ops": []}, f)
    cmd = [exe, "--model", model, "--request", req, "--out", os.path.join(work, "out.safetensors")]
    start = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(pid.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {pid.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build_dir", default="build")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lathe_quant_bench"))
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    exe = os.path.join(a.build_dir, "tests", "lathe_harness")
    dirs = write_models(a.cache)
    with tempfile.TemporaryDirectory() as work:
        for dtype in ("bfloat16", "float32"):
            for kind, d in dirs.items():
                runs = [load_once(exe, d, dtype, work) for _ in range(a.repeat)]
                size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
                print(json.dumps({"checkpoint": kind, "dtype": dtype, "file_mib": round(size / 2**20, 1),
                                  "load_s": round(min(r[0] for r in runs), 3),
                                  "cpu_s": round(min(r[1] for r in runs), 3),
                                  "peak_rss_mib": round(min(r[2] for r in runs), 1)}), flush=True)


if __name__ == "__main__":
    main()
