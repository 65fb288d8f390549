"""bfloat16 against float32: step time and peak memory of one LoRA training step.

Runs bench/train_bench (forward_backward + optim_step, LoRA rank 32 on attention, MLP
and lm_head, one datum of T tokens, cross_entropy) with --dtype float32 and --dtype
bfloat16, each in a fresh process, at a few lengths, and prints the step time (median
of the timed steps) and the process's peak RSS (wait4) of both, with bf16/fp32 ratios
measured in the same run. Each configuration runs --repeats times, alternating the
dtypes: the median step time and the smallest peak RSS are printed (a process's peak
moves between identical runs with the order in which buffers are freed). The model is
Qwen3's layout at reduced width, depth and vocabulary (random weights written by
transformers, stored in fp32).

  .venv/bin/python bench/precision.py [--threads 2] [--lengths 256,1024] [--steps 3] [--repeats 3]
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen3_models import cached_qwen3  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024.0 * 1024.0

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, num_hidden_layers=4, tie_word_embeddings=False)


def cached_model(cache):
    return cached_qwen3(cache, "qwen3-precision", SHAPE, 32768)


def run(build_dir, model, tokens, dtype, threads, steps):
    """(seconds per step, peak RSS bytes) of one train_bench process."""
    rng = random.Random(tokens)
    fd, data = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"tokens": [rng.randrange(SHAPE["vocab_size"]) for _ in range(tokens + 1)]}) + "\n")
    args = [os.path.join(build_dir, "bench", "train_bench"), f"--model={model}", f"--data={data}",
            "--lora_rank=32", f"--dtype={dtype}", "--warmup=1", f"--steps={steps}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        text, message = out.read().decode(), err.read().decode(errors="replace")
    os.unlink(data)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train_bench --dtype={dtype} exited {status}: {message[-2000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    return result["seconds"] / steps, usage.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.environ.get("LATHE_BUILD_DIR", os.path.join(ROOT, "build")))
    ap.add_argument("--cache", default=os.path.join(ROOT, "build", "bench-cache"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = cached_model(args.cache)
    print(f"{'tokens':>7} {'fp32 s/step':>12} {'bf16 s/step':>12} {'time ratio':>11} "
          f"{'fp32 MiB':>9} {'bf16 MiB':>9} {'RSS ratio':>10}")
    for tokens in [int(x) for x in args.lengths.split(",")]:
        runs = {"float32": [], "bfloat16": []}
        for _ in range(args.repeats):
            for dtype in runs:
                runs[dtype].append(run(args.build, model, tokens, dtype, args.threads, args.steps))
        t32, t16 = (statistics.median(t for t, _ in runs[d]) for d in ("float32", "bfloat16"))
        m32, m16 = (min(m for _, m in runs[d]) for d in ("float32", "bfloat16"))
        print(f"{tokens:>7} {t32:>12.3f} {t16:>12.3f} {t16 / t32:>11.2f} {m32 / MiB:>9.0f} {m16 / MiB:>9.0f} "
              f"{m16 / m32:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
