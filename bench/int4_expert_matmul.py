"""An INT4 frozen expert kept packed against the same expert dequantized on load, at
Kimi-K2.6's expert widths (gate/up 2048 x 7168, down 7168 x 2048, groups of 32).

Times, per expert and per token count routed to it, y = x Wᵀ with:
  fp32 / bf16    the weight dequantized once on load (what lathe does), torch's matmul;
  unpack+fp32    the weight kept pack-quantized and dequantized on every use (torch ops);
  int4mm bf16    torch's fused CPU int4 kernel (aten._weight_int4pack_mm_for_cpu, bf16
                 activations, its own packed layout), when this torch has it.
Prints ms per call (best of --repeat) and the resident bytes of each form.

  OMP_NUM_THREADS=2 .venv/bin/python bench/int4_expert_matmul.py [--tokens 1,8,64,256]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))
import quantize_checkpoint as Q  # noqa: E402


def best(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def unpack(words, scale, cols, group):
    """compressed-tensors' int4 words [R, C/8] and scales [R, C/g] → fp32 [R, C]."""
    shifts = torch.arange(8, dtype=torch.int32) * 4
    q = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(words.shape[0], -1)[:, :cols] - 8
    return q.float() * scale.float().repeat_interleave(group, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,64,256")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    group = 32
    has_int4mm = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    for name, (rows, cols) in {"gate/up": (2048, 7168), "down": (7168, 2048)}.items():
        w = torch.randn(rows, cols) * 0.02
        q, scale = Q.quantize_int(w, group)
        words = Q.pack_int32(q)
        deq = Q.dequantize_int(q, scale, group)
        deq_bf16 = deq.bfloat16()
        assert torch.equal(unpack(words, scale, cols, group), deq), "unpack disagrees with the dequantization"
        forms = {"fp32": deq.numel() * 4, "bf16": deq.numel() * 2,
                 "packed": words.numel() * 4 + scale.numel() * 2}
        int4 = None
        if has_int4mm:
            # its input: the unsigned values (signed + 8) as int32 [R, C]; its scales and zeros
            # [C/g, R, 2] bf16 with W = (u - 8) * scale + zero, zero 0 for a symmetric scheme.
            cpu_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
            sz = torch.stack([scale.float().t(), torch.zeros(cols // group, rows)], -1).bfloat16().contiguous()
            int4 = (cpu_packed, sz)
        print(f"{name} [{rows} x {cols}]: resident fp32 {forms['fp32'] / 2**20:.1f} MiB, "
              f"bf16 {forms['bf16'] / 2**20:.1f} MiB, packed {forms['packed'] / 2**20:.1f} MiB", flush=True)
        for t in (int(x) for x in a.tokens.split(",")):
            x = torch.randn(t, cols)
            xb = x.bfloat16()
            row = {
                "fp32": best(lambda: x @ deq.t(), a.repeat),
                "bf16": best(lambda: xb @ deq_bf16.t(), a.repeat),
                "unpack+fp32": best(lambda: x @ unpack(words, scale, cols, group).t(), a.repeat),
            }
            if int4 is not None:
                got = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, int4[0], group, int4[1])
                err = float((got.float() - xb.float() @ (deq.bfloat16().float()).t()).abs().max())
                row["int4mm bf16"] = best(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, int4[0], group,
                                                                                             int4[1]), a.repeat)
                row["int4mm max err"] = err
            print(f"  {t:4d} tokens: " + ", ".join(f"{k} {v:.3g}" + ("" if "err" in k else " ms")
                                                  for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
