"""Peak memory of a GLM-5-shaped LoRA training step at long lengths, and the
cost of building a sparse-attention mask from its compact forms.

Peak RSS: runs bench/train_bench (one forward_backward + optim_step, LoRA
rank 32, one datum of T tokens, the defaults: logprobs in chunks, per-layer
recompute) on a GlmMoeDsaForCausalLM at bench width whose indexer keeps
--topk keys per query (random weights written by transformers), in a fresh
process per length, and reads the process's peak RSS (wait4). Give
--build-dir of another build (or a folder holding bench/train_bench) to
compare two versions of the runtime.

--build-cost: the time to turn one chunk's selection into its bool mask
[n, m] from the int32 top-k indices [n, topk] (scatter into zeros, keep the
causal triangle: what runtime/sparse_indexer.cc KeyMask does) and from a
bit-packed mask [n, m / 8] (unpacked with shifts), in torch on the CPU.

  .venv/bin/python bench/sparse_selection_memory.py [--lengths 8192,16384] [--topk 512] [--threads 2]
      [--build-dir build] [--retain-freed-memory true|false] [--build-cost]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_peak  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024.0 * 1024.0

# GLM-5's layout (latent attention, sigmoid-routed experts, two full indexer
# layers then a shared one) at bench width; a small vocabulary so that the
# layers dominate the peak, and 2 attention heads: the masked SDPA on a CPU
# takes its math path (values narrower than q and k), whose [heads, T, T]
# fp32 scores are transient, so that the selections kept for the step
# stand out.
GLM_SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                 num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=96,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                 index_head_dim=32, index_n_heads=4, tie_word_embeddings=False)


def cached_glm(cache, topk):
    path = os.path.join(cache, f"glm-moe-dsa-memory-12x2-top{topk}")
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch
        from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
        print(f"[bench] writing the model to {path}", flush=True)
        torch.manual_seed(0)
        layers = GLM_SHAPE["num_hidden_layers"]
        config = GlmMoeDsaConfig(**GLM_SHAPE, index_topk=topk,
                                 indexer_types=["shared" if i % 3 == 2 else "full" for i in range(layers)],
                                 max_position_embeddings=131072,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        GlmMoeDsaForCausalLM(config).save_pretrained(path)
    return path


def build_cost(threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    first, n, topk = 8192, 8192, 2048  # a later cp chunk: 8,192 queries over 16,384 keys
    m = first + n
    positions = torch.arange(first, first + n).unsqueeze(1)
    scores = torch.rand(n, m).masked_fill(torch.arange(m).unsqueeze(0) > positions, float("-inf"))
    top = scores.topk(topk, -1).indices.to(torch.int32)
    mask = torch.zeros(n, m, dtype=torch.bool).scatter_(1, top.long(), True).tril_(first)
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    packed = (mask.view(n, m // 8, 8).to(torch.uint8) * bits).sum(-1, dtype=torch.uint8)

    def from_indices():
        out = torch.zeros(n, m, dtype=torch.bool)
        rows = max(1, (1 << 22) // topk)
        for b in range(0, n, rows):
            out[b:b + rows].scatter_(1, top[b:b + rows].long(), True)
        return out.tril_(first)

    def from_bits():
        return packed.unsqueeze(-1).bitwise_and(bits).ne(0).view(n, m)

    print(f"mask [{n}, {m}] (a cp chunk at {first}, top-{topk}), threads {threads}")
    print(f"  kept: int32 indices {top.numel() * 4 / MiB:.0f} MiB, bit-packed {packed.numel() / MiB:.0f} MiB, "
          f"bool mask {mask.numel() / MiB:.0f} MiB")
    for name, fn in (("from int32 indices", from_indices), ("from bit-packed", from_bits)):
        assert torch.equal(fn(), mask)
        start = time.perf_counter()
        for _ in range(5):
            fn()
        print(f"  {name:>20}: {(time.perf_counter() - start) / 5 * 1000:.0f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--build-dir", default=os.environ.get("LATHE_BUILD_DIR", os.path.join(ROOT, "build")))
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench-models"))
    ap.add_argument("--build-cost", action="store_true")
    ap.add_argument("--retain-freed-memory", choices=["true", "false"], default="true",
                    help="train_bench's --retain_freed_memory (false: freed memory goes back to the OS)")
    args = ap.parse_args()
    if args.build_cost:
        return build_cost(args.threads)
    model = cached_glm(args.cache, args.topk)
    print(f"{'tokens':>7} {'peak RSS':>10} {'s':>6}", flush=True)
    for t in [int(x) for x in args.lengths.split(",") if x]:
        peak, secs = memory_peak.run_bench(args.build_dir, model, t, args.threads,
                                           [f"--retain_freed_memory={args.retain_freed_memory}"])
        print(f"{t:>7} {peak / MiB:>6.0f} MiB {secs:>6.1f}", flush=True)
    print(f"(train_bench of {args.build_dir}; threads {args.threads}; GlmMoeDsa {GLM_SHAPE}, index_topk "
          f"{args.topk}, indexer layers full, full, shared, ...; LoRA rank 32; float32; one datum per step)")


if __name__ == "__main__":
    sys.exit(main())
