"""The service's overhead, measured against baselines in the same run.

1. An empty operation's round trip (Submit noop + Retrieve through the
   coordinator and both replicas' leaders) next to a bare gRPC unary call
   (Health) on the same channel: build/bench/service_bench --round_trips.
2. forward_backward + optim_step tokens/s through the service (coordinator +
   mpirun dp_workers) next to the in-process runtime on the same layout
   (build/bench/train_bench under mpirun with the same mesh flags), same
   model, batch, LoRA rank, threads and steps.

  .venv/bin/python bench/service_throughput.py [--model tiny|moe2|dense] \\
      [--layout replicas=2,ep=2] [--round-trips 2000] [--steps 5]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402
from deployment import ENV, add_workload_args, deployment, log_tails, mesh_flags, ranks_of  # noqa: E402


def model_dir(args):
    if args.model == "tiny":
        path = os.path.join(tt.ROOT, "runs", "tiny-qwen3-moe")
        if not os.path.exists(os.path.join(path, "config.json")):
            subprocess.run([os.path.join(args.build_dir, "runtime", "lathe_sft"), "--make_tiny_model", path],
                           check=True)
        return path, 256
    return tt.cached_model(args.cache, args.model), tt.SHAPES[args.model]["vocab_size"]


def through_service(args, model, data, layout, threads, logs):
    with deployment(args.build_dir, model, layout, threads, logs) as address:
        out = subprocess.run([os.path.join(args.build_dir, "bench", "service_bench"), f"--address={address}",
                              f"--round_trips={args.round_trips}", f"--data={data}", f"--lora_rank={args.rank}",
                              f"--warmup={args.warmup}", f"--steps={args.steps}",
                              f"--queued_steps={args.queued_steps}"],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"service_bench failed:\n{out.stderr}\n{log_tails(logs)}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def in_process(args, model, data, layout, threads):
    env = dict(ENV, OMP_NUM_THREADS=str(threads))
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks_of(layout)), "-x", "OMP_NUM_THREADS",
           os.path.join(args.build_dir, "bench", "train_bench"), f"--model={model}", f"--data={data}",
           f"--lora_rank={args.rank}", f"--warmup={args.warmup}", f"--steps={args.steps}"] + mesh_flags(layout)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queued-steps", type=int, default=2,
                    help="steps the client keeps submitted (lathe train keeps 2; 1 = one at a time)")
    tt.add_path_args(ap)
    args = ap.parse_args()
    layout = dict(kv.split("=") for kv in args.layout.split(","))
    threads = max(1, args.threads // ranks_of(layout))
    model, vocab = model_dir(args)
    batch = tt.make_batch([int(x) for x in args.lengths.split(",")], vocab)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "batch.jsonl")
        with open(data, "w") as f:
            for s in batch:
                f.write(json.dumps({"tokens": s}) + "\n")
        served = through_service(args, model, data, layout, threads, tmp)
        local = in_process(args, model, data, layout, threads)
    print(f"empty operation round trip {served['empty_op_us']:.0f} us vs bare unary call "
          f"{served['bare_unary_us']:.0f} us: ratio {served['empty_op_us'] / served['bare_unary_us']:.2f}x "
          f"(median of {args.round_trips}; submit {served['submit_us']:.0f} us + retrieve {served['retrieve_us']:.0f} us)")
    print(f"{args.model} {args.layout}: service {served['tokens_per_s']:.1f} tokens/s vs in-process "
          f"{local['tokens_per_s']:.1f} tokens/s: ratio {served['tokens_per_s'] / local['tokens_per_s']:.3f}x "
          f"(first-step loss {served['first_loss']:.4f} / {local['first_loss']:.4f})")


if __name__ == "__main__":
    sys.exit(main())
