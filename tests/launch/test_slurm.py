"""launch/slurm_submit.sh and slurm.sbatch on a real single-node slurm that
the test starts (munged, slurmctld, slurmd with a private config; Debian's
slurmd, slurmctld, slurm-client and munge packages): the job serves a
training run on the tiny model through `srun --mpi=pmix`, and stops when
its batch shell is signalled. Skipped, with the reason, where slurm cannot
be started here (packages missing, not root, daemons not coming up)."""
import os
import shutil
import socket
import subprocess
import time

import pytest

from test_launch import CLI, ENV, ROOT, run, tiny_model  # noqa: F401 (a fixture)

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(d):
    host = socket.gethostname()
    for name in ("state", "spool", "log"):
        os.makedirs(d / name, exist_ok=True)
    for i in range(2):
        (d / f"gpu{i}").touch()  # gres files: slurm counts them, nothing opens them
    (d / "gres.conf").write_text(f"NodeName={host} Name=gpu File={d}/gpu[0-1]\n")
    (d / "slurm.conf").write_text(f"""ClusterName=lathetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")


def stop_daemons(d):
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = d / f"{name}.pid"
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in DAEMONS if shutil.which(b) is None]
    if missing:
        pytest.skip(f"slurm not installed ({', '.join(missing)} missing; apt-get install slurmd slurmctld "
                    "slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("a private slurmd needs root")
    d = tmp_path_factory.mktemp("slurm")
    write_config(d)
    (d / "munge.key").write_bytes(os.urandom(1024))
    os.chmod(d / "munge.key", 0o600)
    env = dict(ENV, SLURM_CONF=str(d / "slurm.conf"))
    try:
        started = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30) for cmd in (
            ["munged", "--force", f"--key-file={d}/munge.key", f"--socket={d}/munge.sock",
             f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed"],
            ["slurmctld", "-f", str(d / "slurm.conf"), "-i"],
            ["slurmd", "-f", str(d / "slurm.conf")])]
        failed = [r for r in started if r.returncode != 0]
        if failed:
            pytest.skip(f"slurm daemons did not start: {failed[0].args[0]}: {failed[0].stderr.strip()[-300:]}")
        deadline = time.time() + 30
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
            if state.stdout.strip() == "idle":
                break
            if time.time() > deadline:
                log = (d / "log" / "slurmctld.log").read_text()[-500:] if (d / "log" / "slurmctld.log").exists() else ""
                pytest.skip(f"the slurm node did not become idle ({state.stdout.strip() or state.stderr.strip()}): "
                            f"{log}")
            time.sleep(0.5)
        yield d, env
    finally:
        stop_daemons(d)


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
