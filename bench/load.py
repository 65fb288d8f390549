"""Load: many concurrent clients against one deployment, checked and timed.

``build/bench/load_bench`` runs --clients clients, each with its own connection and
run, that submit --ops operations each (noops, with a forward_backward of one short
datum and an optim_step at fixed periods), retry some submits with the same seq_id
and request, send a conflicting request at some used seq_ids, and retrieve every
result. It fails on any lost or duplicated result or accepted conflict. The
baseline, measured first in the same run on the same deployment and connections,
is bare unary calls (Health): the transport's own rate, which an operation (submit
+ retrieve, through the ledger and both replicas) cannot beat.

With --http the clients speak Tinker's REST API to the HTTP door (a session and
a model each; optim_steps with a forward at a period, the door having no noop).

  .venv/bin/python bench/load.py [--clients 200] [--ops 1000] [--layout replicas=2,ep=2] [--http]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_throughput as st  # noqa: E402
import train_throughput as tt  # noqa: E402
from deployment import deployment, http_door_args, http_url, log_tails  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--ops", type=int, default=1000, help="operations per client")
    ap.add_argument("--health-calls", type=int, default=200, help="baseline unary calls per client")
    ap.add_argument("--layout", default="replicas=2,ep=2", help="key=value[,…] mesh flags; ranks = their product")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    ap.add_argument("--model", choices=["tiny"], default="tiny")
    ap.add_argument("--http", action="store_true", help="through the HTTP door (Tinker's REST API)")
    tt.add_path_args(ap)
    args = ap.parse_args()
    layout = dict(kv.split("=") for kv in args.layout.split(","))
    model, vocab = st.model_dir(args)
    runs = [f"--max_runs={args.clients}"]
    with tempfile.TemporaryDirectory() as logs:
        coordinator_args = runs + ["--max_queued=8192"]
        if args.http:
            coordinator_args = http_door_args(logs, *coordinator_args)
        with deployment(args.build_dir, model, layout, args.threads, logs, coordinator_args=coordinator_args,
                        worker_args=runs) as address:
            door = [f"--http_url={http_url(logs)}"] if args.http else []
            proc = subprocess.run([os.path.join(args.build_dir, "bench", "load_bench"), f"--address={address}",
                                   f"--clients={args.clients}", f"--ops={args.ops}", f"--vocab_size={vocab}",
                                   f"--health_calls={args.health_calls}", *door],
                                  capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"load_bench exited {proc.returncode}:\n{proc.stderr[-4000:]}\n{proc.stdout}\n"
                                 + log_tails(logs))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out))
    print(f"{'HTTP door' if args.http else 'gRPC'}: {out['clients']} clients x {args.ops} ops: {out['ops']} ops ({out['retries']} retries, "
          f"{out['conflicts']} conflicts refused) in {out['seconds']:.1f} s: {out['ops_per_s']:.0f} ops/s "
          f"vs {out['health_calls_per_s']:.0f} bare unary calls/s: ratio "
          f"{out['ops_per_s'] / out['health_calls_per_s']:.3f}; submit p50 {out['submit_p50_ms']:.2f} ms "
          f"p99 {out['submit_p99_ms']:.2f} ms; submit-to-result p50 {out['round_trip_p50_ms']:.2f} ms "
          f"p99 {out['round_trip_p99_ms']:.2f} ms; lost {out['lost']}, duplicated {out['duplicated']}, "
          f"conflicts accepted {out['conflict_accepted']}")


if __name__ == "__main__":
    main()
