"""SFT tokens/s through the HTTP door, driven by the unchanged Tinker SDK
(``tinker`` 0.38, .venv), against lathe's C++ client (build/bench/service_bench,
the gRPC path of bench/service_throughput.py) on the same deployment, batch,
LoRA rank and step count.

Both keep two steps submitted (forward_backward + optim_step each) and time
from the end of the warm-up steps to the end of the last; tokens are the
runs' own num_tokens:sum. Both print the first step's loss, which must agree
(the same batch on a fresh LoRA of the same seed). The clients run in
pairs on the same coordinator and dp_workers (--rounds pairs, each run on a
new run_id, alternating which client goes first); a pair runs back to back,
so the ratio is the geometric mean of the pairs' ratios, which holds while
the machine's speed drifts between pairs. The CPU time each client spends
per step is printed too: on a machine with fewer cores than ranks + client,
the client's CPU is taken from the ranks.

  .venv/bin/python bench/http_sft.py [--model tiny|moe2|dense] [--layout replicas=2,ep=2] \\
      [--steps 200] [--rounds 4]
"""
import argparse
import collections
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_throughput as st  # noqa: E402
import train_throughput as tt  # noqa: E402
from deployment import add_workload_args, deployment, http_door_args, http_url, log_tails, ranks_of  # noqa: E402

KEY = "tml-bench"  # the door runs with API keys off on loopback; the SDK still wants a tml- key


def through_grpc(args, address, data, logs):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([os.path.join(args.build_dir, "bench", "service_bench"), f"--address={address}",
                          f"--data={data}", f"--lora_rank={args.rank}", f"--warmup={args.warmup}",
                          f"--steps={args.steps}", "--queued_steps=2"],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"service_bench failed:\n{out.stderr}\n{log_tails(logs)}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def through_sdk(args, url, batch):
    import numpy as np
    import tinker
    client = tinker.ServiceClient(base_url=url, api_key=KEY)
    deadline = time.monotonic() + 120
    while True:  # the replicas register after the coordinator starts
        try:
            with urllib.request.urlopen(url + "/api/v1/healthz", timeout=30):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the deployment did not start serving")
            time.sleep(0.2)
    with urllib.request.urlopen(url + "/api/v1/get_server_capabilities", timeout=30) as r:
        base_model = json.loads(r.read())["supported_models"][0]["model_name"]
    training = client.create_lora_training_client(base_model=base_model, rank=args.rank).result()
    data = [tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(s[:-1]),
        loss_fn_inputs={"target_tokens": tinker.types.TensorData.from_numpy(np.asarray(s[1:], np.int64)),
                         "weights": tinker.types.TensorData.from_numpy(np.ones(len(s) - 1, np.float32))})
            for s in batch]
    # The C++ client sends AdamParams with every field 0 (lathe's defaults); the
    # SDK's defaults are the same values spelled out.
    adam = tinker.types.AdamParams(learning_rate=1e-4)
    before = resource.getrusage(resource.RUSAGE_SELF)
    pending = collections.deque()
    submitted, tokens, loss, start = 0, 0.0, None, None
    total = args.warmup + args.steps
    for step in range(total):
        while submitted < total and len(pending) < 2:
            pending.append((training.forward_backward(data, "cross_entropy"), training.optim_step(adam)))
            submitted += 1
        fb, opt = pending.popleft()
        out = fb.result()
        opt.result()
        if step == 0:
            loss = out.metrics["loss:sum"]
        if step + 1 == args.warmup:
            start = time.perf_counter()
        if step >= args.warmup:
            tokens += out.metrics["num_tokens:sum"]
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    client.close("success").result()
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "first_loss": loss,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs, one per client, alternating which goes first")
    tt.add_path_args(ap)
    args = ap.parse_args()
    layout = dict(kv.split("=") for kv in args.layout.split(","))
    threads = max(1, args.threads // ranks_of(layout))
    model, vocab = st.model_dir(args)
    batch = tt.make_batch([int(x) for x in args.lengths.split(",")], vocab)
    grpc_runs, http_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "batch.jsonl")
        with open(data, "w") as f:
            for s in batch:
                f.write(json.dumps({"tokens": s}) + "\n")
        runs = 2 * args.rounds
        with deployment(args.build_dir, model, layout, threads, tmp, worker_args=[f"--max_runs={runs}"],
                        coordinator_args=http_door_args(tmp, f"--max_runs={runs}")) as address:
            url = http_url(tmp)
            for i in range(args.rounds):
                if i % 2 == 0:
                    grpc_runs.append(through_grpc(args, address, data, tmp))
                    http_runs.append(through_sdk(args, url, batch))
                else:
                    http_runs.append(through_sdk(args, url, batch))
                    grpc_runs.append(through_grpc(args, address, data, tmp))
    ratios = []
    for i, (g, h) in enumerate(zip(grpc_runs, http_runs)):
        ratios.append(h["tokens_per_s"] / g["tokens_per_s"])
        print(f"  pair {i + 1} ({'C++' if i % 2 == 0 else 'SDK'} first): SDK {h['tokens_per_s']:.1f} tokens/s, "
              f"C++ {g['tokens_per_s']:.1f} tokens/s, ratio {ratios[-1]:.3f}x", flush=True)
    # Pairs run back to back, so a pair's ratio is fair even as the machine's speed drifts between pairs.
    ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    http = sorted(http_runs, key=lambda r: r["tokens_per_s"])[len(http_runs) // 2]
    grpc_ = sorted(grpc_runs, key=lambda r: r["tokens_per_s"])[len(grpc_runs) // 2]
    total = args.warmup + args.steps
    print(f"{args.model} {args.layout}: Tinker SDK over HTTP {http['tokens_per_s']:.1f} tokens/s vs C++ client over "
          f"gRPC {grpc_['tokens_per_s']:.1f} tokens/s (medians): ratio {ratio:.3f}x (geometric mean of "
          f"{args.rounds} pairs; first-step loss {http['first_loss']:.4f} / {grpc_['first_loss']:.4f}; "
          f"{args.steps} steps, 2 queued; client CPU per step: SDK {http['cpu_s'] / total * 1e3:.1f} ms, "
          f"C++ {grpc_['cpu_s'] / total * 1e3:.1f} ms)")


if __name__ == "__main__":
    sys.exit(main())
