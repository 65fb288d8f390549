"""Peak memory per rank of a long-sequence LoRA step with context parallelism.

Runs bench/train_bench (one forward_backward + optim_step, LoRA rank 32,
cross_entropy, one datum of T tokens, per-layer recompute as deployed) once
in one process (cp 1) and once under mpirun with --cp C (C ranks of one data
group splitting the sequence), and prints each run's largest per-rank peak
RSS, the ratio, and tokens/s. Baselines (the same processes with a 2-token
datum: libtorch, MKL, MPI, the weights) are printed too, so the ratio of the
memory the sequence itself takes can be read off.

The model has Qwen3-8B's layer layout (GQA 4:1, head_dim 128 cut to 64, MLP
3x the width, q/k norm) at reduced width and depth, with random weights
written by transformers; the vocabulary is small and logprobs are computed
in chunks of 1,024 rows, so the sequence's activations dominate.

  .venv/bin/python bench/context_parallel.py [--tokens 16384] [--cp 4] [--threads 2] [--heap deployed|mapped]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen3_models import cached_qwen3  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, num_hidden_layers=2, tie_word_embeddings=False)


def cached_model(cache):
    return cached_qwen3(cache, "qwen3-cp", SHAPE)


# glibc settings that return every freed block of 1 MiB or more to the OS at
# once, so the peak RSS is the peak of live memory (see --heap).
MAPPED = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def run(build_dir, model, tokens, cp, threads, heap):
    """train_bench's JSON line (tokens/s, largest per-rank peak RSS) and the wall seconds."""
    rng = random.Random(tokens)
    fd, data = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"tokens": [rng.randrange(SHAPE["vocab_size"]) for _ in range(tokens + 1)]}) + "\n")
    args = [os.path.join(build_dir, "bench", "train_bench"), f"--model={model}", f"--data={data}", "--lora_rank=32",
            "--max_seq_len=131072", "--logprob_chunk_tokens=1024", "--warmup=0",
            "--steps=1"]
    if heap == "mapped":
        args.append("--retain_freed_memory=false")
    extra = MAPPED if heap == "mapped" else {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    if cp > 1:
        forward = [x for k in ["OMP_NUM_THREADS", *extra] for x in ("-x", k)]
        args = ["mpirun", "--oversubscribe", *forward, "-np", str(cp)] + args + [f"--cp={cp}"]
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    os.unlink(data)
    if proc.returncode != 0:
        raise RuntimeError(f"train_bench exited {proc.returncode}: {proc.stderr[-2000:]}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="cores; each of the cp ranks gets threads / cp (>= 1)")
    parser.add_argument("--build-dir", default=os.environ.get("LATHE_BUILD_DIR", os.path.join(ROOT, "build")))
    parser.add_argument("--heap", choices=["deployed", "mapped"], default="deployed",
                        help="deployed: the trainer's heap policy (freed memory kept in the heap); mapped: "
                             "blocks >= 1 MiB mapped and returned when freed, so RSS follows live memory")
    parser.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench-models"))
    a = parser.parse_args()
    model = cached_model(a.cache)
    rank_threads = max(1, a.threads // a.cp)
    one, s1 = run(a.build_dir, model, a.tokens, 1, a.threads, a.heap)
    many, sc = run(a.build_dir, model, a.tokens, a.cp, rank_threads, a.heap)
    # Baselines: the same processes with a 2-token datum (libtorch, MKL, MPI, the weights).
    b = run(a.build_dir, model, 2, 1, a.threads, a.heap)[0]["max_rank_peak_rss_mib"]
    bc = run(a.build_dir, model, 2, a.cp, rank_threads, a.heap)[0]["max_rank_peak_rss_mib"]
    p1, pc = one["max_rank_peak_rss_mib"], many["max_rank_peak_rss_mib"]
    print(f"heap: {a.heap}; model {SHAPE}, {a.tokens} tokens, LoRA rank 32, one forward_backward + optim_step")
    print(f"baselines (2-token step): one process {b:.0f} MiB, largest of {a.cp} ranks {bc:.0f} MiB")
    print(f"cp 1 (1 process, {a.threads} threads):  peak RSS {p1:.0f} MiB, {one['tokens_per_s']:.0f} tokens/s "
          f"(wall {s1:.0f} s)")
    print(f"cp {a.cp} ({a.cp} ranks, {rank_threads} thread each): largest per-rank peak RSS {pc:.0f} MiB, "
          f"{many['tokens_per_s']:.0f} tokens/s (wall {sc:.0f} s)")
    print(f"ratio of peaks cp {a.cp} / cp 1: {pc / p1:.3f}; above the baselines: {(pc - bc) / (p1 - b):.3f}")
    print(f"first loss cp 1 {one['first_loss']:.6f}, cp {a.cp} {many['first_loss']:.6f}")


if __name__ == "__main__":
    sys.exit(main())
