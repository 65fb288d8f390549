"""Client side of the end-to-end suite: a loopback deployment (lathe_coordinator plus
dp_worker ranks under mpirun), datum construction and submit/wait helpers on lathe.v1.

Imports the generated stubs (``lathe.v1.*_pb2``); conftest.py generates them and puts
them on sys.path before this module is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import numpy as np

from lathe.v1 import service_pb2 as pb
from lathe.v1 import service_pb2_grpc as pb_grpc
from lathe.v1 import types_pb2 as types

VOCAB = 256            # the tiny model's vocabulary
MAX_SEQ_LEN = 4096     # its max_position_embeddings
RPC_TIMEOUT_S = 10.0   # any single unary call
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

SUBPROCESS_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}

Health = pb.HealthResponse
Retrieve = pb.RetrieveResponse


# --------------------------------------------------------------------------------------
# tensors and datums
# --------------------------------------------------------------------------------------

_WIRE_DTYPES = {np.dtype("<f4"): types.FLOAT32, np.dtype("<i8"): types.INT64,
                np.dtype("<i4"): types.INT32, np.dtype("<f8"): types.FLOAT64}


def tensor(values, dtype=None, shape=None, data: bytes | None = None) -> types.TensorData:
    """TensorData of a numpy array; ``shape``/``data``/``dtype`` override (for malformed ones)."""
    arr = np.ascontiguousarray(values)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    wire = _WIRE_DTYPES[arr.dtype.newbyteorder("<")] if dtype is None else dtype
    return types.TensorData(dtype=wire, shape=list(arr.shape) if shape is None else list(shape),
                            data=arr.tobytes() if data is None else data)


def token_chunk(tokens) -> types.ModelInputChunk:
    return types.ModelInputChunk(encoded_text=types.EncodedTextChunk(tokens=np.asarray(tokens, "<i4").tobytes()))


def datum(tokens, targets, **inputs) -> types.Datum:
    """A datum with one token chunk; target_tokens as int64, other inputs as float32 arrays
    (or ready-made TensorData)."""
    d = types.Datum()
    d.model_input.chunks.append(token_chunk(tokens))
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensor(np.asarray(targets, "<i8")))
    for key, value in inputs.items():
        t = value if isinstance(value, types.TensorData) else tensor(np.asarray(value, "<f4"))
        d.loss_fn_inputs[key].CopyFrom(t)
    return d


def batch(data, loss_fn="cross_entropy", config=None) -> types.ForwardBackwardInput:
    return types.ForwardBackwardInput(data=list(data), loss_fn=loss_fn, loss_fn_config=config or {})


def adam(**params) -> types.AdamParams:
    return types.AdamParams(**params)


def random_sequence(rng: np.random.Generator, n: int):
    """(tokens, targets) of length n: a random walk over the vocabulary, targets shifted by one."""
    seq = rng.integers(0, VOCAB, size=n + 1)
    return seq[:-1].astype(np.int32), seq[1:].astype(np.int64)


# --------------------------------------------------------------------------------------
# calls
# --------------------------------------------------------------------------------------

def rpc_error(call, *args, **kwargs) -> grpc.StatusCode | None:
    """The status code a unary call fails with, or None when it succeeds."""
    try:
        call(*args, timeout=RPC_TIMEOUT_S, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    return None


def submit(stub, run_id: str, seq_id: int, **op) -> str:
    """Submits one operation (``forward_backward=batch(...)``, ``optim_step=adam(...)``, ...)."""
    return stub.Submit(pb.SubmitRequest(run_id=run_id, seq_id=seq_id, **op), timeout=RPC_TIMEOUT_S).op_id


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def reordered_bytes(request: pb.SubmitRequest) -> bytes:
    """A forward_backward SubmitRequest encoded by hand in another field order, every
    loss_fn_inputs map in descending key order: the same message, other bytes."""
    fb = request.forward_backward
    assert request.WhichOneof("op") == "forward_backward" and not fb.loss_fn_config
    data = b""
    for d in fb.data:
        entries = b"".join(_field(2, _field(1, k.encode()) + _field(2, d.loss_fn_inputs[k].SerializeToString()))
                           for k in sorted(d.loss_fn_inputs, reverse=True))
        data += _field(1, entries + _field(1, d.model_input.SerializeToString()))
    body = _field(2, fb.loss_fn.encode()) + data
    return _varint(2 << 3) + _varint(request.seq_id) + _field(12, body) + _field(1, request.run_id.encode())


def submit_bytes(channel, raw: bytes) -> str:
    """Submit with a request already encoded."""
    call = channel.unary_unary("/lathe.v1.Lathe/Submit", request_serializer=lambda b: b,
                               response_deserializer=pb.SubmitResponse.FromString)
    return call(raw, timeout=RPC_TIMEOUT_S).op_id


def wait(stub, op_id: str, timeout: float = 60.0, metadata=None) -> pb.RetrieveResponse:
    """Long-polls Retrieve until the op is DONE or FAILED; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"op {op_id} still PENDING after {timeout:.0f} s")
        wait_ms = int(min(left, 5.0) * 1000)
        r = stub.Retrieve(pb.RetrieveRequest(op_id=op_id, wait_ms=wait_ms), metadata=metadata,
                          timeout=wait_ms / 1000 + RPC_TIMEOUT_S)
        if r.state != Retrieve.PENDING:
            return r


def result(stub, op_id: str, timeout: float = 60.0, metadata=None) -> pb.OpResult:
    """The op's result; fails the test with the op's error when it FAILED."""
    r = wait(stub, op_id, timeout, metadata)
    assert r.state == Retrieve.DONE, f"op {op_id} {Retrieve.State.Name(r.state)}: {r.error}"
    return r.result


def fb_op(*data, loss_fn="cross_entropy", config=None, forward=False) -> dict:
    """Submit keyword arguments of a forward_backward (or forward) on `data`."""
    return {"forward" if forward else "forward_backward": batch(data, loss_fn, config)}


def good_datum(n=5, **inputs) -> types.Datum:
    """A valid cross_entropy datum of n tokens, the same for the same n."""
    tokens, targets = random_sequence(np.random.default_rng(n), n)
    return datum(tokens, targets, **inputs)


def create_run(stub, rank: int = 8, seed: int = 3, **lora) -> str:
    """A LoRA run, initialised (``lora``: LoraConfig's other fields, e.g. train_mlp=False)."""
    created = stub.CreateRun(pb.CreateRunRequest(lora=types.LoraConfig(rank=rank, seed=seed, **lora)),
                             timeout=RPC_TIMEOUT_S)
    info = result(stub, created.init_op_id).init
    assert info.run_id == created.run_id and info.lora.rank == rank
    return created.run_id


def logprobs(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [tensor_array(o.tensors["logprobs"]) for o in output.loss_fn_outputs]


def tensor_array(t: types.TensorData) -> np.ndarray:
    dtype = {types.FLOAT32: "<f4", types.FLOAT64: "<f8", types.INT64: "<i8", types.INT32: "<i4"}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


def health_check_bytes(channel) -> bytes:
    """Raw response of the standard grpc.health.v1.Health/Check for the server as a whole."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda _: b"", response_deserializer=lambda b: b)
    return check(None, timeout=RPC_TIMEOUT_S)


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------

def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (mpirun's ranks get their own process groups)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            pids.append(int(name))
    return pids


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"<{e}>"


def _kill_session(sid: int, sig: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Deployment:
    """A coordinator and (optionally) its dp_worker job on loopback.

    ``start()`` waits (bounded) until Health says SERVING; ``close()`` sends SIGTERM to the
    coordinator, waits for both processes (bounded) and kills whatever remains. Logs go to
    ``<workdir>/coordinator.log`` and ``<workdir>/workers.log``.
    """

    def __init__(self, build_dir: str, model_dir: str, workdir: str, *, replicas: int = 2, ranks: int = 4,
                 ep: int = 2, max_runs: int = 1, workers: bool = True, coordinator_args=(), coordinator_env=None,
                 worker_env=None, api_key: str | None = None, collective_timeout_s: int = 20, tp: int = 1,
                 worker_args=(), worker_token: str | None = None, tls: dict | None = None,
                 dtype: str | None = None):
        """``worker_token``: the token both sides get (default: a fresh random one); ``tls``:
        ``{"cert", "key", "ca"}`` PEM paths (the coordinator serves TLS, the workers and
        ``self.channel`` verify it with ``ca``); ``dtype``: the workers' ``--dtype`` (None:
        their default)."""
        self.build_dir, self.model_dir, self.workdir = build_dir, model_dir, workdir
        self.replicas, self.ranks, self.ep, self.max_runs = replicas, ranks, ep, max_runs
        self.tp, self.worker_args = tp, list(worker_args) + (["--dtype", dtype] if dtype else [])
        self.with_workers = workers
        self.collective_timeout_s = collective_timeout_s
        self.coordinator_args, self.api_key = list(coordinator_args), api_key
        self.coordinator_env, self.worker_env = dict(coordinator_env or {}), dict(worker_env or {})
        self.worker_token = secrets.token_hex(32) if worker_token is None else worker_token
        self.tls = dict(tls) if tls else None
        os.makedirs(workdir, exist_ok=True)
        self.coordinator_log = os.path.join(workdir, "coordinator.log")
        self.workers_log = os.path.join(workdir, "workers.log")
        self.coordinator: subprocess.Popen | None = None
        self.workers: subprocess.Popen | None = None
        self.port = 0
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.LatheStub | None = None

    # ---- lifecycle --------------------------------------------------------------------

    def start(self, wait_serving: bool = True) -> "Deployment":
        try:
            self._start_coordinator()
            if self.with_workers:
                self.start_workers()
                if wait_serving:
                    self.wait_health(Health.SERVING, STARTUP_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        return self

    def _env(self, extra: dict) -> dict:
        env = dict(os.environ)
        env.update(SUBPROCESS_ENV)
        env.update(extra)
        return env

    def _start_coordinator(self) -> None:
        port_file = os.path.join(self.workdir, "port")
        if os.path.exists(port_file):
            os.remove(port_file)
        # A restart listens where the workers and clients already dial.
        cmd = [os.path.join(self.build_dir, "coordinator", "lathe_coordinator"), "--listen", f"127.0.0.1:{self.port}",
               "--port_file", port_file, "--replicas", str(self.replicas), "--heartbeat_interval_s", "0.5",
               "--heartbeat_timeout_s", "3", "--max_runs", str(self.max_runs), *self.coordinator_args]
        if self.tls:
            cmd += ["--tls_cert", self.tls["cert"], "--tls_key", self.tls["key"]]
        env = self._env({"LATHE_WORKER_TOKEN": self.worker_token, **self.coordinator_env})
        with open(self.coordinator_log, "ab") as log:
            self.coordinator = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=env, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self._read_port(port_file):
            if self.coordinator.poll() is not None:
                raise AssertionError(f"lathe_coordinator exited {self.coordinator.returncode} at start\n"
                                     + self.log_tails())
            if time.monotonic() > deadline:
                raise AssertionError("lathe_coordinator wrote no port file within 20 s\n" + self.log_tails())
            time.sleep(0.05)
        if self.tls:
            with open(self.tls["ca"], "rb") as f:
                self.channel = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(f.read()))
        else:
            self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.LatheStub(self.channel)

    def _read_port(self, port_file: str) -> bool:
        try:
            with open(port_file) as f:
                text = f.read()
        except OSError:
            return False
        if not text.endswith("\n"):
            return False
        self.port = int(text)
        return True

    def start_workers(self) -> None:
        cmd = ["mpirun", "--oversubscribe", "-np", str(self.ranks),
               os.path.join(self.build_dir, "dp_worker", "dp_worker"), "--coordinator", self.address,
               "--model", self.model_dir, "--replicas", str(self.replicas), "--ep", str(self.ep),
               "--collective_timeout_s", str(self.collective_timeout_s), "--max_runs", str(self.max_runs),
               "--connect_timeout_s", "30", "--tp", str(self.tp), *self.worker_args]
        if self.tls:
            cmd += ["--tls_ca", self.tls["ca"]]
        env = {"LATHE_WORKER_TOKEN": self.worker_token, **self.worker_env}
        with open(self.workers_log, "ab") as log:
            self.workers = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self._env(env), start_new_session=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metadata(self):
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None

    def run_op(self, run_id: str, seq_id: int, timeout: float = 120.0, **op) -> pb.OpResult:
        """Submits one operation with the deployment's key and returns its result (the test
        fails when it FAILED or is still pending after `timeout` s)."""
        md = self.metadata()
        op_id = self.stub.Submit(pb.SubmitRequest(run_id=run_id, seq_id=seq_id, **op), metadata=md,
                                 timeout=RPC_TIMEOUT_S).op_id
        return result(self.stub, op_id, timeout, md)

    def health(self) -> pb.HealthResponse:
        return self.stub.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)

    def wait_health(self, state: int, timeout: float) -> pb.HealthResponse:
        deadline = time.monotonic() + timeout
        h = None
        while time.monotonic() < deadline:
            for name, proc in (("lathe_coordinator", self.coordinator), ("mpirun", self.workers)):
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode} while waiting for "
                                         f"{Health.State.Name(state)}\n" + self.log_tails())
            try:
                h = self.health()
            except grpc.RpcError as e:
                h = e
            if isinstance(h, pb.HealthResponse) and h.state == state:
                return h
            time.sleep(0.1)
        raise AssertionError(f"Health not {Health.State.Name(state)} within {timeout:.0f} s; last: {h}\n"
                             + self.log_tails())

    def worker_pids(self) -> dict[int, int]:
        """{OMPI_COMM_WORLD_RANK: pid} of the live dp_worker ranks."""
        if self.workers is None:
            return {}
        out = {}
        for pid in _session_pids(self.workers.pid):
            rank = _environ(pid).get("OMPI_COMM_WORLD_RANK")
            if rank is not None and pid != self.workers.pid:
                out[int(rank)] = pid
        return out

    def stop_coordinator(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM to the coordinator; its exit code, or None when it did not exit in time."""
        if self.coordinator is None:
            return None
        if self.coordinator.poll() is None:
            os.killpg(self.coordinator.pid, signal.SIGTERM)
        try:
            return self.coordinator.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_coordinator(self) -> None:
        """kill -9 of the coordinator (nothing of its own runs); waits (bounded) until it is gone."""
        os.killpg(self.coordinator.pid, signal.SIGKILL)
        self.coordinator.wait(10)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def restart_coordinator(self, wait_serving: bool = True) -> None:
        """Starts the coordinator again with the same flags on the same port; with `wait_serving`
        waits (bounded) until the workers registered again and Health says SERVING."""
        self._start_coordinator()
        if wait_serving:
            self.wait_health(Health.SERVING, STARTUP_TIMEOUT_S)

    def wait_workers(self, timeout: float) -> int | None:
        """mpirun's exit code, or None when it is still running after `timeout` s."""
        if self.workers is None:
            return None
        try:
            return self.workers.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Stops everything (bounded), killing what does not stop. Idempotent."""
        if self.coordinator is not None:
            self.stop_coordinator()
        if self.workers is not None:
            self.wait_workers(STOP_TIMEOUT_S if self.coordinator is not None else 0)
        for proc in (self.coordinator, self.workers):
            if proc is None:
                continue
            _kill_session(proc.pid, signal.SIGKILL)  # the session holds mpirun's ranks too
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def log_tails(self, lines: int = 40) -> str:
        return (f"--- {self.coordinator_log} (tail) ---\n{_tail(self.coordinator_log, lines)}"
                f"--- {self.workers_log} (tail) ---\n{_tail(self.workers_log, lines)}")


@contextlib.contextmanager
def http_door(build_dir: str, model_dir: str, workdir: str, key: str, max_runs: int = 4, coordinator_args=(),
              worker_args=(), **kwargs):
    """A started deployment with API keys on (`key` only) and the HTTP door on a free port,
    checkpoints under `workdir`: yields (deployment, base_url); closed on exit. `coordinator_args`
    and `worker_args` are added to the coordinator's and dp_worker's flags; other keyword
    arguments go to `Deployment`."""
    port_file, root = os.path.join(workdir, "http_port"), os.path.join(workdir, "checkpoints")
    d = Deployment(build_dir, model_dir, workdir, max_runs=max_runs, api_key=key, coordinator_env={"LATHE_API_KEYS": key},
                   worker_args=["--checkpoint_root", root, *worker_args],
                   coordinator_args=["--auth", "on", "--http_port", "0", "--http_port_file", port_file,
                                     "--checkpoint_root", root, *coordinator_args], **kwargs)
    d.start()
    try:
        with open(port_file) as f:
            yield d, f"http://127.0.0.1:{int(f.read())}"
    finally:
        d.close()


def http_json(url: str, path: str, data: bytes | None = None, headers: dict | None = None):
    """POST `data` (or GET without it) to url + path as JSON: (status, the JSON reply), also for
    error statuses."""
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class ReplicaJobs(Deployment):
    """A coordinator and one ``mpirun`` job per replica (``dp_worker --replica_index i``), each
    of ``ranks`` ranks: the replicas' cross-replica groups are Gloo groups on loopback. Logs of
    job i go to ``<workdir>/replica-<i>.log``; ``self.jobs[i]`` is job i's mpirun (None once
    stopped)."""

    def __init__(self, build_dir: str, model_dir: str, workdir: str, *, replicas: int = 2, ranks: int = 1,
                 ep: int = 1, **kwargs):
        super().__init__(build_dir, model_dir, workdir, replicas=replicas, ranks=ranks, ep=ep, **kwargs)
        self.jobs: list[subprocess.Popen | None] = [None] * replicas

    def start_workers(self) -> None:
        for i in range(self.replicas):
            self.start_replica(i)

    def start_replica(self, i: int) -> None:
        """Starts (or starts again) the job of replica i."""
        cmd = ["mpirun", "--oversubscribe", "-np", str(self.ranks),
               os.path.join(self.build_dir, "dp_worker", "dp_worker"), "--coordinator", self.address,
               "--model", self.model_dir, "--replicas", str(self.replicas), "--replica_index", str(i),
               "--gloo_hostname", "127.0.0.1", "--ep", str(self.ep), "--tp", str(self.tp),
               "--collective_timeout_s", str(self.collective_timeout_s), "--max_runs", str(self.max_runs),
               "--connect_timeout_s", "30", *self.worker_args]
        if self.tls:
            cmd += ["--tls_ca", self.tls["ca"]]
        env = {"LATHE_WORKER_TOKEN": self.worker_token, **self.worker_env}
        with open(self.replica_log(i), "ab") as log:
            self.jobs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self._env(env), start_new_session=True)

    def replica_log(self, i: int) -> str:
        return os.path.join(self.workdir, f"replica-{i}.log")

    def replica_pids(self, i: int) -> dict[int, int]:
        """{rank in the job: pid} of replica i's live dp_worker ranks."""
        job = self.jobs[i]
        if job is None:
            return {}
        out = {}
        for pid in _session_pids(job.pid):
            rank = _environ(pid).get("OMPI_COMM_WORLD_RANK")
            if rank is not None and pid != job.pid:
                out[int(rank)] = pid
        return out

    def wait_job(self, i: int, timeout: float) -> int | None:
        """Job i's exit code, or None when it still runs after `timeout` s."""
        try:
            return self.jobs[i].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        super().close()
        for job in self.jobs:
            if job is None:
                continue
            try:
                job.wait(STOP_TIMEOUT_S if job.poll() is None else 0)
            except subprocess.TimeoutExpired:
                pass
            _kill_session(job.pid, signal.SIGKILL)
            try:
                job.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def log_tails(self, lines: int = 40) -> str:
        out = f"--- {self.coordinator_log} (tail) ---\n{_tail(self.coordinator_log, lines)}"
        for i in range(self.replicas):
            out += f"--- {self.replica_log(i)} (tail) ---\n{_tail(self.replica_log(i), lines)}"
        return out
