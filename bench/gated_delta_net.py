"""One Gated DeltaNet layer's math, forward + backward, lathe against transformers.

The span timed is everything between the input projections and out_proj (causal conv +
SiLU, l2norm, gates, the chunked delta rule, the gated RMSNorm), on random inputs of one
sequence at Qwen3.5-0.8B's layer widths (16 key and 16 value heads of 128). transformers
runs its torch path (causal_conv1d_fn, torch_chunk_gated_delta_rule, Qwen3_5RMSNormGated)
in this process; lathe runs build/bench/gdn_bench in a child process with the same number
of threads. Also printed: transformers' torch_chunk_gated_delta_rule alone.

  OMP_NUM_THREADS=1 .venv/bin/python bench/gated_delta_net.py [--threads 1] [--tokens 4096] [--reps 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5 import modeling_qwen3_5 as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_ms(fn, reps):
    """(wall, process CPU) milliseconds per call, medians of `reps` after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - cpu_start) * 1e3)
        wall.append((time.perf_counter() - start) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def hf_span(qkv, z, b, a, conv_w, a_log, dt_bias, norm, hk, hv, d):
    """transformers' Qwen3_5GatedDeltaNet.forward between the projections."""
    t = qkv.shape[1]
    mixed = M.causal_conv1d_fn(qkv.transpose(1, 2), conv_w, None, activation="silu").transpose(1, 2)
    q, k, v = torch.split(mixed, [hk * d, hk * d, hv * d], dim=-1)
    q, k, v = q.reshape(1, t, hk, d), k.reshape(1, t, hk, d), v.reshape(1, t, hv, d)
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    out, _ = M.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=b.sigmoid(), use_qk_l2norm_in_kernel=True)
    return norm(out.reshape(-1, d), z.reshape(-1, d)).reshape(1, t, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hk = hv = 16
    d, t = 128, args.tokens
    conv_dim = 2 * hk * d + hv * d
    leaf = lambda x: x.requires_grad_(True)  # noqa: E731
    qkv, z = leaf(torch.randn(1, t, conv_dim)), leaf(torch.randn(1, t, hv * d))
    b, a = leaf(torch.randn(1, t, hv)), leaf(torch.randn(1, t, hv))
    conv_w, a_log, dt_bias = leaf(torch.randn(conv_dim, 4) * 0.5), leaf(torch.rand(hv) * 2.7), leaf(torch.ones(hv))
    norm = M.Qwen3_5RMSNormGated(d)
    grad = torch.randn(1, t, hv * d)

    def span():
        hf_span(qkv, z, b, a, conv_w, a_log, dt_bias, norm, hk, hv, d).backward(grad)

    with torch.no_grad():
        q = F.normalize(torch.randn(1, t, hk, d), dim=-1)
        kk = F.normalize(torch.randn(1, t, hk, d), dim=-1)
    vv = torch.randn(1, t, hv, d)
    gg = -torch.rand(1, t, hv)
    bb = torch.rand(1, t, hv)
    for x in (q, kk, vv, gg, bb):
        x.requires_grad_(True)

    def rule():
        out, _ = M.torch_chunk_gated_delta_rule(q, kk, vv, g=gg, beta=bb)
        out.backward(torch.randn_like(out))

    hf_fwd = median_ms(lambda: torch.no_grad()(hf_span)(qkv, z, b, a, conv_w, a_log, dt_bias, norm, hk, hv, d),
                       args.reps)
    hf_fb = median_ms(span, args.reps)
    hf_rule = median_ms(rule, args.reps)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([os.path.join(args.build, "bench", "gdn_bench"), f"--threads={args.threads}",
                           f"--tokens={t}", f"--reps={args.reps}"], capture_output=True, text=True, env=env,
                          check=True)
    lathe = json.loads(proc.stdout)
    ours_fwd = (lathe["forward_ms"], lathe["forward_cpu_ms"])
    ours_fb = (lathe["forward_backward_ms"], lathe["forward_backward_cpu_ms"])
    print(f"T={t} threads={args.threads} (Hk=Hv=16, Dk=Dv=128); wall / process CPU ms, medians of {args.reps}")
    print(f"{'':32s} {'forward':>17s} {'forward+backward':>19s}")
    row = lambda name, f, fb: print(f"{name:32s} {f:>17s} {fb:>19s}")  # noqa: E731
    fmt = lambda x: f"{x[0]:.0f} / {x[1]:.0f}"  # noqa: E731
    row("transformers span", fmt(hf_fwd), fmt(hf_fb))
    row("transformers chunk rule alone", "", fmt(hf_rule))
    row("lathe GatedDeltaNet span", fmt(ours_fwd), fmt(ours_fb))
    print(f"forward+backward, transformers span / lathe: wall {hf_fb[0] / ours_fb[0]:.2f}x, "
          f"CPU {hf_fb[1] / ours_fb[1]:.2f}x")


if __name__ == "__main__":
    main()
