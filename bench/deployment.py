"""A local deployment for benchmarks: a coordinator on a free loopback port and
``mpirun`` dp_workers with the given mesh flags; stopped (SIGTERM to the
coordinator, which stops the workers) on leaving the ``with`` block.

    with deployment(build_dir, model, {"replicas": "2", "ep": "2"}, threads=1, logs=tmp) as address:
        ...
"""
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def add_workload_args(ap):
    """The deployment benchmarks' shared flags: model, mesh layout, cores, datum lengths, LoRA rank."""
    ap.add_argument("--model", choices=["tiny", "dense", "moe", "moe2"], default="tiny")
    ap.add_argument("--layout", default="replicas=2,ep=2", help="key=value[,…] mesh flags; ranks = their product")
    ap.add_argument("--threads", type=int, default=2, help="cores shared by all ranks")
    ap.add_argument("--lengths", default="64,96,128,160,192,224,256,288")
    ap.add_argument("--rank", type=int, default=32)


def ranks_of(layout):
    n = 1
    for v in layout.values():
        n *= int(v)
    return n


def mesh_flags(layout):
    return [f"--{k}={v}" for k, v in layout.items()]


def log_tails(logs):
    return "".join(open(os.path.join(logs, n)).read()[-2000:] for n in ("coordinator.log", "workers.log")
                   if os.path.exists(os.path.join(logs, n)))


@contextlib.contextmanager
def deployment(build_dir, model, layout, threads, logs, checkpoint_root=None, coordinator_args=(), worker_args=(),
               dtype=None):
    """Yields the coordinator's gRPC address; `coordinator_args` / `worker_args` are more
    lathe_coordinator / dp_worker flags; `dtype` the workers' --dtype (None: their default)."""
    port_file = os.path.join(logs, "port")
    root = [f"--checkpoint_root={checkpoint_root}"] if checkpoint_root else []
    token = {"LATHE_WORKER_TOKEN": secrets.token_hex(32)}  # the replicas' credential, for both sides
    coord = subprocess.Popen([os.path.join(build_dir, "coordinator", "lathe_coordinator"), "--listen=127.0.0.1:0",
                              f"--port_file={port_file}", f"--replicas={layout.get('replicas', 1)}"] + root
                             + list(coordinator_args),
                             env=dict(os.environ, **token),
                             stdout=open(os.path.join(logs, "coordinator.log"), "w"), stderr=subprocess.STDOUT)
    workers = None
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.monotonic() > deadline or coord.poll() is not None:
                raise SystemExit("the coordinator did not start:\n" + log_tails(logs))
            time.sleep(0.1)
        address = "127.0.0.1:" + open(port_file).read().strip()
        workers = subprocess.Popen(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks_of(layout)),
                                    "-x", "OMP_NUM_THREADS", os.path.join(build_dir, "dp_worker", "dp_worker"),
                                    f"--coordinator={address}", f"--model={model}"] + mesh_flags(layout) + root
                                   + list(worker_args) + ([f"--dtype={dtype}"] if dtype else []),
                                   env=dict(ENV, OMP_NUM_THREADS=str(threads), **token),
                                   stdout=open(os.path.join(logs, "workers.log"), "w"), stderr=subprocess.STDOUT)
        yield address
    finally:
        coord.send_signal(signal.SIGTERM)
        coord.wait(timeout=60)
        if workers is not None:
            try:
                workers.wait(timeout=60)
            except subprocess.TimeoutExpired:
                workers.kill()


def http_door_args(logs, *more):
    """lathe_coordinator flags that serve the HTTP door on a free port (see http_url)."""
    return ["--http_port=0", f"--http_port_file={os.path.join(logs, 'http_port')}", *more]


def http_url(logs):
    """The HTTP door's base URL once the coordinator started with http_door_args(logs)."""
    path = os.path.join(logs, "http_port")
    deadline = time.monotonic() + 30
    while not (os.path.exists(path) and open(path).read().endswith("\n")):
        if time.monotonic() > deadline:
            raise SystemExit("the HTTP door did not start:\n" + log_tails(logs))
        time.sleep(0.05)
    return "http://127.0.0.1:" + open(path).read().strip()


def stubs(tmp):
    """Generates the Python gRPC modules of lathe's protos into `tmp` and makes them importable."""
    os.makedirs(tmp, exist_ok=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={tmp}",
                    f"--grpc_python_out={tmp}"] + [f"proto/lathe/v1/{n}.proto" for n in ("types", "service", "replica")],
                   cwd=ROOT, check=True)
    sys.path.insert(0, tmp)


def serving_run(address, lora_rank):
    """(stub, pb, types, run_id): a client of the deployment at `address` once it serves, and a
    new run with LoRA rank `lora_rank` (0: full fine-tuning), initialised. Needs stubs() first."""
    import grpc
    from lathe.v1 import service_pb2 as pb, service_pb2_grpc as pbg, types_pb2 as types
    stub = pbg.LatheStub(grpc.insecure_channel(address))
    while stub.Health(pb.HealthRequest(), timeout=10).state != pb.HealthResponse.SERVING:
        time.sleep(0.2)
    created = stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=lora_rank)), timeout=60)
    wait(stub, pb, created.init_op_id)
    return stub, pb, types, created.run_id


def wait(stub, pb, op_id):
    """The result of operation `op_id` once it is done; exits on a failed one."""
    while True:
        r = stub.Retrieve(pb.RetrieveRequest(op_id=op_id, wait_ms=30000), timeout=60)
        if r.state == pb.RetrieveResponse.DONE:
            return r.result
        if r.state == pb.RetrieveResponse.FAILED:
            raise SystemExit(f"operation failed: {r.error}")
