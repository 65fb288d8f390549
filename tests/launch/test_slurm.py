"""launch/slurm_submit.sh and slurm.sbatch on a real slurm that the test
starts on this machine (munged, slurmctld and two slurmd with a private
config: this host and a second node `lathe-n1` on 127.0.0.2; Debian's
slurmd, slurmctld, slurm-client and munge packages): the job serves a
training run on the tiny model through `srun --mpi=pmix`, and stops when
its batch shell is signalled; with LATHE_REPLICA_JOBS=1 each replica is a
job step of its own, and a step whose rank is killed is started again and
its replica rejoins. Skipped, with the reason, where slurm cannot be
started here (packages missing, not root, daemons not coming up)."""
import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np

import pytest

from test_launch import CLI, ENV, ROOT, _dp_worker_pids, run, tiny_model  # noqa: F401 (a fixture)

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECOND_NODE = "lathe-n1"  # a second slurmd on this machine, at 127.0.0.2


def write_config(d):
    host = socket.gethostname()
    for name in ("state", "log", "tmp"):
        os.makedirs(d / name, exist_ok=True)
    for i in range(4):
        (d / f"gpu{i}").touch()  # gres files: slurm counts them, nothing opens them
    (d / "gres.conf").write_text(f"NodeName={host} Name=gpu File={d}/gpu[0-1]\n"
                                 f"NodeName={SECOND_NODE} Name=gpu File={d}/gpu[2-3]\n")
    # Two nodes on one machine: each slurmd its own port, spool and pid file (%n: the node's
    # name). This host weighs less, so a one-node job runs here and its batch host resolves.
    (d / "slurm.conf").write_text(f"""ClusterName=lathetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
TmpFS={d}/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 Port={free_port()} Weight=1 CPUs={os.cpu_count()} RealMemory=1000 Gres=gpu:2 \
State=UNKNOWN
NodeName={SECOND_NODE} NodeHostname={SECOND_NODE} NodeAddr=127.0.0.2 Port={free_port()} Weight=2 \
CPUs={os.cpu_count()} RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")


def stop_daemons(d, env, slurmds):
    # Jobs first (their steps end through the slurmds), then the daemons.
    subprocess.run(["scancel", "--user=root"], env=env, timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True,
                                                    timeout=30).stdout.strip():
        time.sleep(0.5)
    for p in slurmds:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    for name in ("slurmctld", "munged"):
        pid_file = d / f"{name}.pid"
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except ProcessLookupError:
                pass


class SlurmUnavailable(Exception):
    """Why a private slurm cannot run here."""


@contextlib.contextmanager
def private_slurm(d):
    """munged, slurmctld and the two slurmd on the config written into folder `d`; yields the
    environment that reaches them (SLURM_CONF). Raises SlurmUnavailable with the reason where
    they cannot start. Also used by bench/slurm_replica_steps.py."""
    missing = [b for b in DAEMONS if shutil.which(b) is None]
    if missing:
        raise SlurmUnavailable(f"slurm not installed ({', '.join(missing)} missing; apt-get install slurmd "
                               "slurmctld slurm-client munge)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("a private slurmd needs root")
    write_config(d)
    (d / "munge.key").write_bytes(os.urandom(1024))
    os.chmod(d / "munge.key", 0o600)
    env = dict(ENV, SLURM_CONF=str(d / "slurm.conf"))
    slurmds = []
    try:
        started = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30) for cmd in (
            ["munged", "--force", f"--key-file={d}/munge.key", f"--socket={d}/munge.sock",
             f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed"],
            ["slurmctld", "-f", str(d / "slurm.conf"), "-i"])]
        failed = [r for r in started if r.returncode != 0]
        if failed:
            raise SlurmUnavailable(f"slurm daemons did not start: {failed[0].args[0]}: "
                                   f"{failed[0].stderr.strip()[-300:]}")
        # In the foreground (-D), each a child of this process, which stops them.
        for node in (socket.gethostname(), SECOND_NODE):
            slurmds.append(subprocess.Popen(["slurmd", "-D", "-f", str(d / "slurm.conf"), "-N", node], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))
        deadline = time.time() + 30
        while True:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True,
                                   timeout=30)
            if state.stdout.split() == ["idle", "idle"]:
                break
            if time.time() > deadline:
                log = (d / "log" / "slurmctld.log").read_text()[-500:] if (d / "log" / "slurmctld.log").exists() else ""
                raise SlurmUnavailable(f"the slurm nodes did not become idle "
                                       f"({state.stdout.strip() or state.stderr.strip()}): {log}")
            time.sleep(0.5)
        yield env
    finally:
        stop_daemons(d, env, slurmds)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    try:
        with private_slurm(d) as env:
            yield d, env
    except SlurmUnavailable as e:
        pytest.skip(str(e))


def job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    return next((w.split("=", 1)[1] for w in out.stdout.split() if w.startswith("JobState=")), "UNKNOWN")


def test_batch_script_serves_a_training_run(slurm, tiny_model, tmp_path):
    d, slurm_env = slurm
    model, data = tiny_model
    key = tmp_path / "key"
    key.write_text("k-slurm\n")
    port = free_port()
    env = dict(slurm_env, LATHE_MODEL="tiny", LATHE_REPLICAS="1", LATHE_LAYOUT_FLAGS="--devices_per_node 2 --ep 2",
               LATHE_MODEL_DIR=model, LATHE_API_KEY_FILE=str(key), LATHE_PORT=str(port), LATHE_INSECURE_LISTEN="1")
    submit = subprocess.run(["bash", "launch/slurm_submit.sh", f"--output={tmp_path}/job-%j.log", "--parsable"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"job-{job}.log"
    try:
        train = run([CLI, "train", "--address", f"127.0.0.1:{port}", "--api_key_file", str(key), "--wait_s", "90",
                     "--data", data, "--steps", "2", "--batch_size", "4"], timeout=240)
        job_log = log.read_text() if log.exists() else ""
        assert train.returncode == 0, train.stdout + train.stderr + job_log
        assert "lathe train: loss" in train.stdout, train.stdout
        assert f"coordinator on {socket.gethostname()}:{port}; 2 dp_worker ranks on 1 nodes" in job_log, job_log
        assert job_log.count("place rank=") == 2 and "source=mpi" in job_log, job_log
        # SIGTERM to the batch step (as a time limit with --signal=B:TERM@60 would): the job ends.
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=env, timeout=30, check=True)
        deadline = time.time() + 60
        while job_state(env, job) in ("RUNNING", "PENDING", "COMPLETING"):
            assert time.time() < deadline, "the job did not stop: " + log.read_text()
            time.sleep(0.5)
        assert "replica 0: deregistered" in log.read_text(), log.read_text()
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)


@pytest.fixture(scope="module")
def service_client(tmp_path_factory):
    """tests/e2e/service_client.py, with the lathe.v1 stubs it imports generated here."""
    out = tmp_path_factory.mktemp("stubs")
    protos = [os.path.join("proto", "lathe", "v1", f"{name}.proto") for name in ("types", "service", "replica")]
    r = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={out}",
                        f"--grpc_python_out={out}", *protos], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    sys.path[:0] = [str(out), os.path.join(ROOT, "tests", "e2e")]
    import service_client as sc
    return sc


class _Call(collections.namedtuple("_Call", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                             "compression")), grpc.ClientCallDetails):
    pass


class _ApiKey(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key):
        self.key = key

    def intercept_unary_unary(self, continuation, details, request):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {self.key}")]
        return continuation(_Call(details.method, details.timeout, metadata, details.credentials,
                                  details.wait_for_ready, details.compression), request)


def _wait_text(path, text, timeout, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} does not say {text!r} within {timeout} s {what}\n"
                         + (path.read_text(errors="replace")[-3000:] if path.exists() else "(no file)"))


def test_replica_steps_restart_a_killed_replica_which_rejoins(slurm, tiny_model, service_client, tmp_path):
    sc = service_client
    d, slurm_env = slurm
    model, _ = tiny_model
    key = tmp_path / "key"
    key.write_text("k-slurm\n")
    port = free_port()
    env = dict(slurm_env, LATHE_MODEL="tiny", LATHE_REPLICAS="2", LATHE_LAYOUT_FLAGS="--devices_per_node 1",
               LATHE_MODEL_DIR=model, LATHE_API_KEY_FILE=str(key), LATHE_PORT=str(port), LATHE_INSECURE_LISTEN="1",
               LATHE_REPLICA_JOBS="1", LATHE_GLOO_HOSTNAME="127.0.0.1", LATHE_RESTART_DELAY_S="2",
               # The batch host may be the second node, a name only slurm knows.
               LATHE_COORDINATOR_HOST="127.0.0.1",
               LATHE_LOG_DIR=str(tmp_path))
    submit = subprocess.run(["bash", "launch/slurm_submit.sh", f"--output={tmp_path}/job-%j.log", "--parsable"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"job-{job}.log"
    replica_log = [tmp_path / f"lathe-{job}-replica-{i}.log" for i in (0, 1)]
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), _ApiKey("k-slurm"))
    stub = sc.pb_grpc.LatheStub(channel)

    def replica_pids(i):  # this job's ranks of replica i
        return [p for p in _dp_worker_pids(i) if f"127.0.0.1:{port}".encode() in open(f"/proc/{p}/cmdline", "rb").read()]

    def op(run, seq, **kwargs):
        return sc.result(stub, sc.submit(stub, run, seq, **kwargs), timeout=120)

    try:
        _wait_text(log, "2 replica steps of 1 dp_worker ranks", 60, "(the job did not start)")
        deadline = time.time() + 120
        while True:
            try:
                if stub.Health(sc.pb.HealthRequest(), timeout=5).state == sc.Health.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.time() < deadline, "the replicas did not register:\n" + log.read_text() + "".join(
                p.read_text() for p in replica_log if p.exists())
            time.sleep(0.5)
        # Each replica is a step of its own, on its own node.
        steps = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%j %N"], env=env, capture_output=True,
                               text=True, timeout=30).stdout
        placed = dict(line.split() for line in steps.splitlines() if line.startswith("lathe-replica-"))
        assert sorted(placed) == ["lathe-replica-0", "lathe-replica-1"], steps
        assert sorted(placed.values()) == sorted([socket.gethostname(), SECOND_NODE]), steps
        rng = np.random.default_rng(5)
        batch = [sc.datum(*sc.random_sequence(rng, n)) for n in (7, 19, 4, 33)]
        opt = dict(optim_step=sc.adam(learning_rate=1e-2))
        run = sc.create_run(stub, rank=8, seed=3)
        op(run, 1, **sc.fb_op(*batch))
        op(run, 2, **opt)

        # The first restart will not launch (PMIx finds its step's folder taken), and srun
        # reports 0 for it: the supervisor starts the step again all the same.
        (d / "tmp" / f"spmix_appdir_{os.getuid()}_{job}.2").mkdir()
        [killed] = replica_pids(1)
        os.kill(killed, signal.SIGKILL)
        _wait_text(log, "replica 1 left", 30)
        # The run goes on with replica 0 while slurm's step of replica 1 is started again.
        h = stub.Health(sc.pb.HealthRequest(), timeout=10)
        assert h.state == sc.Health.SERVING and "1 of 2 replicas" in h.detail, h
        op(run, 3, **sc.fb_op(*batch))
        op(run, 4, **opt)
        _wait_text(log, "[slurm] replica 1 exited 137; restart 1 in 2 s", 30)
        _wait_text(log, "[slurm] replica 1 exited 0; restart 2 in 4 s", 60)
        _wait_text(log, "replica 1 registered again", 90)
        # The next operation admits it with the run's state, then both replicas train.
        op(run, 5, **sc.fb_op(*batch))
        _wait_text(log, "replica(s) joined with the state of every run", 30)
        op(run, 6, **opt)
        [restarted] = replica_pids(1)
        assert restarted != killed and len(replica_pids(0)) == 1
        # Two equal datums go one to each replica: equal parameters give equal logprobs.
        twin = batch[1]
        out = op(run, 7, **sc.fb_op(twin, twin, forward=True)).forward_backward
        x, y = sc.logprobs(out)
        assert np.array_equal(x, y), f"the replicas' logprobs differ by {np.max(np.abs(x - y))}"
        assert "of generation 3 formed: replica 1 of 2" in replica_log[1].read_text(), replica_log[1].read_text()
        steps_log = replica_log[1].read_text()
        assert "task 0: Killed" in steps_log and "task 0 launch failed" in steps_log, steps_log

        subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=env, timeout=30, check=True)
        deadline = time.time() + 60
        while job_state(env, job) in ("RUNNING", "PENDING", "COMPLETING"):
            assert time.time() < deadline, "the job did not stop: " + log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        assert "replica steps exited with status 0" in text and "restart 3" not in text, text
    finally:
        channel.close()
        subprocess.run(["scancel", job], env=env, timeout=30)
