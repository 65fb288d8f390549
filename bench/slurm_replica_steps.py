"""Replicas as slurm job steps (LATHE_REPLICA_JOBS=1): how long a killed replica takes to
come back through slurm.

Starts the private two-node slurm of tests/launch/test_slurm.py on this machine, submits
launch/slurm_submit.sh with two one-rank replicas of the tiny model, trains a step, then
kills replica 1's rank and measures, from the kill:
  * the supervisor's "[slurm] replica 1 exited 137" (srun saw its step end);
  * the coordinator's "replica 1 registered again" (the delay, a new step, model load);
  * the forward_backward that admits it (state sync, then its part of the batch).
Needs root and Debian's slurmd, slurmctld, slurm-client and munge.

  .venv/bin/python bench/slurm_replica_steps.py [--lora_rank 8] [--restart_delay_s 1]
"""
import argparse
import atexit
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "launch"))
os.environ.setdefault("LATHE_BUILD_DIR", os.path.join(ROOT, "build"))

import test_slurm as ts  # noqa: E402 (the private slurm, the API-key channel)
from test_launch import _dp_worker_pids  # noqa: E402


def wait_text(path, text, timeout=120):
    """time.monotonic() when `text` first shows in `path` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.02)
    raise SystemExit(f"{path} does not say {text!r} within {timeout} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--restart_delay_s", type=int, default=1)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="lathe_bench_slurm_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    (work / "slurm").mkdir()
    build = os.environ["LATHE_BUILD_DIR"]
    model, data = str(work / "tiny"), str(work / "data.jsonl")
    subprocess.run([os.path.join(build, "runtime", "lathe_sft"), "--make_tiny_model", model, "--make_data", data],
                   check=True, capture_output=True, timeout=120)
    (work / "key").write_text("k-bench\n")
    port = ts.free_port()
    with ts.private_slurm(work / "slurm") as slurm_env:
        env = dict(slurm_env, LATHE_MODEL="tiny", LATHE_REPLICAS="2", LATHE_LAYOUT_FLAGS="--devices_per_node 1",
                   LATHE_MODEL_DIR=model, LATHE_API_KEY_FILE=str(work / "key"), LATHE_PORT=str(port),
                   LATHE_INSECURE_LISTEN="1", LATHE_REPLICA_JOBS="1", LATHE_GLOO_HOSTNAME="127.0.0.1",
                   LATHE_COORDINATOR_HOST="127.0.0.1", LATHE_RESTART_DELAY_S=str(args.restart_delay_s),
                   LATHE_LOG_DIR=str(work))
        submit = subprocess.run(["bash", "launch/slurm_submit.sh", f"--output={work}/job-%j.log", "--parsable"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
        job = submit.stdout.strip().split(";")[0]
        log = work / f"job-{job}.log"
        try:
            sc = load_client(work)
            channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), ts._ApiKey("k-bench"))
            stub = sc.pb_grpc.LatheStub(channel)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if stub.Health(sc.pb.HealthRequest(), timeout=5).state == sc.Health.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the replicas did not register: " + log.read_text())
                time.sleep(0.2)
            rng = sc.np.random.default_rng(5)
            batch = [sc.datum(*sc.random_sequence(rng, n)) for n in (7, 19, 4, 33, 12, 25, 9, 30)]
            run = sc.create_run(stub, rank=args.lora_rank, seed=3)

            def fb(seq):
                t = time.monotonic()
                sc.result(stub, sc.submit(stub, run, seq, **sc.fb_op(*batch)), timeout=120)
                return time.monotonic() - t

            fb(1)
            steady = fb(2)
            [pid] = [p for p in _dp_worker_pids(1)
                     if f"127.0.0.1:{port}".encode() in open(f"/proc/{p}/cmdline", "rb").read()]
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            ended = wait_text(log, "[slurm] replica 1 exited 137") - killed
            registered = wait_text(log, "replica 1 registered again") - killed
            admit = fb(3)
            print(f"steady forward_backward (both replicas)        {steady:.3f} s")
            print(f"kill -9 -> srun's step ended (supervisor saw)  {ended:.2f} s")
            print(f"kill -9 -> registered again (delay {args.restart_delay_s} s incl.)  {registered:.2f} s")
            print(f"forward_backward that admits it               {admit:.3f} s")
        finally:
            subprocess.run(["scancel", job], env=env, timeout=30)


def load_client(work):
    """tests/e2e/service_client.py with its generated stubs."""
    out = work / "stubs"
    out.mkdir()
    protos = [os.path.join("proto", "lathe", "v1", f"{n}.proto") for n in ("types", "service", "replica")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={out}",
                    f"--grpc_python_out={out}", *protos], cwd=ROOT, check=True, timeout=60)
    sys.path[:0] = [str(out), os.path.join(ROOT, "tests", "e2e")]
    import service_client
    return service_client


if __name__ == "__main__":
    main()
