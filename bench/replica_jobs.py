"""Replicas as separate jobs: how long a replica's loss and return take.

Starts a coordinator and two one-rank replica jobs (dp_worker --replica_index) on
the tiny model (lathe_sft --make_tiny_model), trains a few steps, then measures:
  * kill -9 of replica 1 during a forward_backward -> that op failed (s);
  * the next forward_backward on the survivor alone (forms generation 2) against
    a steady one;
  * replica 1 started again -> registered (process start, model load);
  * the operation that admits it (state sync, then its part of the batch) against
    a steady one, and the sync itself (the worker's log line).

  .venv/bin/python bench/replica_jobs.py [--lora_rank 8] [--build_dir build]
"""
import argparse
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for k, v in {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(k, v)


def stubs():
    out = tempfile.mkdtemp(prefix="lathe_bench_stubs_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    protos = [os.path.join("proto", "lathe", "v1", f"{n}.proto") for n in ("types", "service", "replica")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={out}",
                    f"--grpc_python_out={out}", *protos], cwd=ROOT, check=True, timeout=60)
    sys.path.insert(0, out)
    sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))


def wait_log(path, text, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if text in f.read():
                return
        time.sleep(0.02)
    raise RuntimeError(f"{path}: no {text!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build_dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--lora_rank", type=int, default=8, help="0: full fine-tuning (the largest state)")
    args = ap.parse_args()
    stubs()
    import numpy as np
    import service_client as sc

    work = tempfile.mkdtemp(prefix="lathe_bench_replicas_")
    model = os.path.join(work, "tiny")
    subprocess.run([os.path.join(args.build_dir, "runtime", "lathe_sft"), "--make_tiny_model", model], check=True,
                   capture_output=True, timeout=120)
    d = sc.ReplicaJobs(args.build_dir, model, work, replicas=2, ranks=1, collective_timeout_s=60)
    d.start()
    try:
        rng = np.random.default_rng(1)
        batch = [sc.datum(*sc.random_sequence(rng, n)) for n in (64, 96, 128, 160, 192, 224, 256, 288)]
        opt = dict(optim_step=sc.adam(learning_rate=1e-3))
        run = sc.create_run(d.stub, rank=args.lora_rank, seed=3)
        seq = 1

        def op(**kw):
            nonlocal seq
            t = time.monotonic()
            d.run_op(run, seq, **kw)
            seq += 1
            return time.monotonic() - t

        for _ in range(2):
            op(**sc.fb_op(*batch)), op(**opt)
        steady2 = min(op(**sc.fb_op(*batch)) for _ in range(3))
        op(**opt)
        big = sc.fb_op(*[sc.datum(*sc.random_sequence(rng, 4096)) for _ in range(8)])
        in_flight = sc.submit(d.stub, run, seq, **big)
        seq += 1
        time.sleep(0.3)
        killed = time.monotonic()
        os.kill(d.replica_pids(1)[0], signal.SIGKILL)
        r = sc.wait(d.stub, in_flight, timeout=60)
        failed = time.monotonic() - killed
        assert r.state == sc.Retrieve.FAILED, r
        regroup = op(**sc.fb_op(*batch))
        op(**opt)
        steady1 = min(op(**sc.fb_op(*batch)) for _ in range(3))
        op(**opt)
        d.wait_job(1, 30)
        started = time.monotonic()
        d.start_replica(1)
        wait_log(d.coordinator_log, "replica 1 registered again")
        registered = time.monotonic() - started
        admit = op(**sc.fb_op(*batch))
        with open(d.replica_log(1)) as f:
            sync = re.findall(r"synced from replica \d+: .*", f.read())[-1]
        print(f"lora_rank {args.lora_rank}; 2 replica jobs x 1 rank, tiny model, batch of 8 datums (1408 tokens)")
        print(f"  kill -9 during forward_backward -> op failed: {failed:.2f} s")
        print(f"  next forward_backward alone (forms generation 2): {regroup:.3f} s; steady alone: {steady1:.3f} s; "
              f"steady on 2 replicas: {steady2:.3f} s")
        print(f"  restart -> registered again: {registered:.2f} s")
        print(f"  forward_backward that admits it (sync + its part): {admit:.3f} s; {sync}")
    finally:
        d.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
