"""forward_backward + optim_step throughput of a sharded run against one process.

Runs build/bench/train_bench on the same model, batch and core budget:
the baseline is one process with --threads threads; each layout is an
mpirun job of N ranks with threads/N threads each (N = --threads by default,
so the cores are the same). Prints tokens/s of each and the ratio to the
baseline. Models are those of bench/train_throughput.py (cached in runs/).

  .venv/bin/python bench/data_parallel_throughput.py [--threads 2] [--model dense|moe] \\
      [--layouts "replicas=2" "tp=2"]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402


def run(build_dir, model_dir, data, rank, warmup, steps, np_, threads, layout):
    cmd = [os.path.join(build_dir, "bench", "train_bench"), f"--model={model_dir}", f"--data={data}",
           f"--lora_rank={rank}", f"--warmup={warmup}", f"--steps={steps}"]
    cmd += [f"--{k}={v}" for k, v in layout.items()]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if np_ > 1:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(np_), "-x", "OMP_NUM_THREADS"] + cmd
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="cores for every configuration")
    ap.add_argument("--model", choices=["dense", "moe", "moe2"], default="dense")
    ap.add_argument("--lengths", default="64,96,128,160,192,224,256,288")
    ap.add_argument("--layouts", nargs="*", default=["replicas=2"],
                    help="key=value[,key=value] of train_bench's mesh flags; ranks = their product")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    tt.add_path_args(ap)
    args = ap.parse_args()
    model_dir = tt.cached_model(args.cache, args.model)
    batch = tt.make_batch([int(x) for x in args.lengths.split(",")], tt.SHAPES[args.model]["vocab_size"])
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for s in batch:
            f.write(json.dumps({"tokens": s}) + "\n")
    base = run(args.build_dir, model_dir, f.name, args.rank, args.warmup, args.steps, 1, args.threads, {})
    print(f"{args.model}: 1 process x {args.threads} threads: {base['tokens_per_s']:.1f} tokens/s "
          f"(first-step loss {base['first_loss']:.4f})", flush=True)
    for spec in args.layouts:
        layout = dict(kv.split("=") for kv in spec.split(","))
        np_ = 1
        for v in layout.values():
            np_ *= int(v)
        threads = max(1, args.threads // np_)
        r = run(args.build_dir, model_dir, f.name, args.rank, args.warmup, args.steps, np_, threads, layout)
        print(f"{args.model}: {spec}: {np_} ranks x {threads} threads: {r['tokens_per_s']:.1f} tokens/s, "
              f"ratio {r['tokens_per_s'] / base['tokens_per_s']:.2f}x (first-step loss {r['first_loss']:.4f})",
              flush=True)
    os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(main())
