"""launch/: the Kubernetes manifests render to YAML that validates against
the Kubernetes schemas (kubernetes-validate) with the fields a deployment
needs, and the pods' commands of lws-replicas run here; the mpirun and slurm
scripts print the commands of the plan; mpirun.sh serves a real training run
on the tiny model over TLS; srun's command line runs under mpirun; a task
that MPI started alone is refused. No Kubernetes cluster is used."""
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time

import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("LATHE_BUILD_DIR", os.path.join(ROOT, "build"))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
           LATHE_BIN=BUILD)
CLI = os.path.join(BUILD, "client", "lathe")


def tls_files(folder):
    """LATHE_TLS_* of a fresh CA and a server certificate it signed for 127.0.0.1/localhost."""
    def openssl(*args):
        r = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=lathe test ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return dict(LATHE_TLS_CERT=str(folder / "server.pem"), LATHE_TLS_KEY=str(folder / "server.key"),
                LATHE_TLS_CA=str(folder / "ca.pem"))


def run(args, timeout=60, **env):
    return subprocess.run(args, cwd=ROOT, env=dict(ENV, **env), capture_output=True, text=True, timeout=timeout)


def render(kind, **env):
    r = run(["bash", "launch/k8s/render.sh", kind], **env)
    assert r.returncode == 0, r.stderr
    return list(yaml.safe_load_all(r.stdout))


def validate(docs):
    """Every object against the Kubernetes schemas, unknown fields refused; the pod templates
    of the MPIJob and LeaderWorkerSet (custom resources, no schema here) as PodTemplates."""
    def check(obj):
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {e.message} at {list(e.path)}")

    for d in docs:
        if d["kind"] == "MPIJob":
            templates = {k: v["template"] for k, v in d["spec"]["mpiReplicaSpecs"].items()}
        elif d["kind"] == "LeaderWorkerSet":
            templates = {k: v for k, v in d["spec"]["leaderWorkerTemplate"].items() if k.endswith("Template")}
        else:
            check(d)
            continue
        assert templates
        for name, template in templates.items():
            check({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{d['metadata']['name']}-{name}"},
                   "template": template})


@pytest.mark.parametrize("kind", ["mpijob", "lws", "lws-replicas"])
def test_manifests_validate_against_the_kubernetes_schemas(kind):
    for insecure in ("0", "1"):
        validate(render(kind, LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_REPLICAS="2", LATHE_INSECURE_LISTEN=insecure))
    bad = render(kind, LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_PORT="grpc")  # the check can fail
    with pytest.raises(AssertionError, match="is not of type 'integer'"):
        validate(bad)


def test_lws_replicas_is_a_group_per_replica_and_a_coordinator_deployment():
    docs = render("lws-replicas", LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_REPLICAS="3", LATHE_NAME="q30",
                  LATHE_WORKER_TOKEN_SECRET="tok")
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "LeaderWorkerSet"]
    deployment, svc, lws = docs
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    coordinator = pod["spec"]["containers"][0]
    args = shlex.split(coordinator["args"][0])
    assert args[:4] == ["exec", "lathe_coordinator", "--listen", "0.0.0.0:7777"], args
    assert args[args.index("--replicas") + 1] == "3" and "--tls_cert" in args, args
    assert service_for(docs, pod["metadata"]["labels"])["metadata"]["name"] == "q30-coordinator"
    # One group per replica, each one MPI job on its replica's node_count pods.
    assert lws["spec"]["replicas"] == 3
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    assert tmpl["size"] == 1 and tmpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = tmpl["leaderTemplate"]["spec"]["containers"][0]
    env = {e["name"]: e for e in leader["env"]}
    assert env["REPLICA_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"
    # The worker token: one Secret for the coordinator and every group, never made in a pod.
    for c in (coordinator, leader):
        token = {e["name"]: e for e in c["env"]}["LATHE_WORKER_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "tok", "key": "worker-token"}
    script = leader["args"][0]
    assert "od -An" not in script and "lathe_coordinator" not in script, script
    mpirun = shlex.split(script[script.index("exec mpirun"):])
    assert mpirun[mpirun.index("-np") + 1] == "8"
    assert mpirun[mpirun.index("--replicas") + 1] == "3"
    assert mpirun[mpirun.index("--replica_index") + 1] == "$REPLICA_INDEX"
    # The coordinator's Service is the replicas' address and their rendezvous store's.
    assert mpirun[mpirun.index("--coordinator") + 1] == "q30-coordinator:7777"
    assert "-x" in mpirun and "LATHE_WORKER_TOKEN" in mpirun
    assert mpirun[mpirun.index("--tls_ca") + 1] == "/etc/lathe/tls/ca.crt"
    # Replicas of two nodes: the leader waits for its own group's worker, by its stable name.
    two = render("lws-replicas", LATHE_MODEL="Qwen/Qwen3.5-122B-A10B", LATHE_REPLICAS="2", LATHE_NAME="q122")
    tmpl = two[2]["spec"]["leaderWorkerTemplate"]
    assert two[2]["spec"]["replicas"] == 2 and tmpl["size"] == 2
    script = tmpl["leaderTemplate"]["spec"]["containers"][0]["args"][0]
    assert "seq 1 1" in script and "until ssh $ssh_opts q122-$REPLICA_INDEX-$i.q122 true" in script, script
    assert "-np 16" in script, script
    runs = render("lws-replicas", LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_MAX_RUNS="4")
    assert "--max_runs" not in docs[0]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--checkpoint_root /checkpoints --max_runs 4" in runs[0]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--max_runs 4 --replica_index" in runs[2]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"][
        "containers"][0]["args"][0]


def service_for(docs, labels):
    [svc] = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), (svc["spec"]["selector"], labels)
    return svc


def test_mpijob_is_sized_from_the_preset():
    docs = render("mpijob", LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_REPLICAS="2", LATHE_NAME="q30",
                  LATHE_CHECKPOINT_PVC="ckpt", LATHE_API_KEY_SECRET="keys")
    job = docs[0]
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
    spec = job["spec"]
    assert spec["slotsPerWorker"] == 8
    worker = spec["mpiReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2  # 2 replicas x 1 node
    wpod = worker["template"]["spec"]
    assert wpod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"claimName": "ckpt"} in [v.get("persistentVolumeClaim") for v in wpod["volumes"]]
    assert {"medium": "Memory"} in [v.get("emptyDir") for v in wpod["volumes"]]
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]
    container = launcher["spec"]["containers"][0]
    args = shlex.split(container["args"][0])
    assert args[args.index("-np") + 1] == "16"
    assert args[args.index("--replicas") + 1] == "2"
    assert args[args.index("--coordinator") + 1] == "q30-coordinator:7777"
    assert args[args.index("--base_model") + 1] == "Qwen/Qwen3-30B-A3B"
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e} == \
        {"LATHE_API_KEYS": "keys"}
    svc = service_for(docs, launcher["metadata"]["labels"])
    assert svc["metadata"]["name"] == "q30-coordinator"
    # TLS by default: the coordinator holds the key, the worker pods only the CA; the
    # workers' token is made in the pod and passed to the ranks in their environment.
    script = container["args"][0]
    assert "--tls_cert /etc/lathe/tls/tls.crt --tls_key /etc/lathe/tls/tls.key" in script, script
    assert args[args.index("--tls_ca") + 1] == "/etc/lathe/tls/ca.crt"
    assert "export LATHE_WORKER_TOKEN=" in script and "-x LATHE_WORKER_TOKEN" in script, script
    assert "tcpSocket" in container["readinessProbe"]
    [ca] = [v for v in wpod["volumes"] if v["name"] == "tls-ca"]
    assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert {"name": "tls-ca", "mountPath": "/etc/lathe/tls", "readOnly": True} in wpod["containers"][0]["volumeMounts"]
    plain = render("mpijob", LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_INSECURE_LISTEN="1")
    plain_launcher = plain[0]["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert "--insecure_listen" in plain_launcher["args"][0] and "--tls" not in plain_launcher["args"][0]
    assert "grpc" in plain_launcher["readinessProbe"]


def test_leaderworkerset_is_one_group_of_every_node():
    docs = render("lws", LATHE_MODEL="Qwen3-8B", LATHE_REPLICAS="3", LATHE_NAME="q8")
    lws = docs[0]
    assert (lws["apiVersion"], lws["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert lws["spec"]["replicas"] == 1
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    assert tmpl["size"] == 3  # 3 replicas x 1 node
    leader = tmpl["leaderTemplate"]["spec"]["containers"][0]
    worker = tmpl["workerTemplate"]["spec"]["containers"][0]
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    script = leader["args"][0]
    assert "seq 1 2" in script and "-np 24" in script and "--replicas 3" in script
    # New pods have unknown host keys: mpirun's ssh must not ask, and the leader waits for every worker.
    assert '--mca plm_rsh_args "$ssh_opts"' in script and "StrictHostKeyChecking=no" in script, script
    assert script.index("until ssh $ssh_opts q8-0-$i.q8 true") < script.index("mpirun"), script
    assert [m["mountPath"] for m in worker["volumeMounts"]] == [m["mountPath"] for m in leader["volumeMounts"]]
    assert "--tls_cert /etc/lathe/tls/tls.crt" in script and "--tls_ca /etc/lathe/tls/ca.crt" in script, script
    assert script.index("export LATHE_WORKER_TOKEN=") < script.index("lathe_coordinator"), script
    assert {m["name"] for m in leader["volumeMounts"]} - {m["name"] for m in worker["volumeMounts"]} == {"tls"}
    service_for(docs, {"leaderworkerset.sigs.k8s.io/name": "q8", "leaderworkerset.sigs.k8s.io/worker-index": "0"})


def test_model_outside_the_presets_needs_a_layout():
    r = run(["bash", "launch/k8s/render.sh", "mpijob"], LATHE_MODEL="my-model")
    assert r.returncode != 0 and "not in the preset table" in r.stderr, r.stderr
    docs = render("mpijob", LATHE_MODEL="my-model", LATHE_LAYOUT_FLAGS="--devices_per_node 4 --tp 2")
    assert docs[0]["spec"]["slotsPerWorker"] == 4


def test_unverified_preset_renders_for_planning():
    docs = render("mpijob", LATHE_MODEL="deepseek-ai/DeepSeek-V4-Flash")
    assert docs[0]["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] > 1


def test_slurm_batch_script_prints_srun_with_pmix_and_nccl(tmp_path):
    r = run(["bash", "launch/slurm.sbatch"], LATHE_DRY_RUN="1", LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_REPLICAS="2",
            LATHE_MODEL_DIR="/m/q30", LATHE_HOME=ROOT, SLURM_JOB_ID="42", NCCL_SOCKET_IFNAME="ib0")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "srun --mpi=pmix" in out and "--ntasks=16" in out and "--ntasks-per-node=8" in out, out
    assert "export NCCL_SOCKET_IFNAME=ib0" in out and "export NCCL_DEBUG=WARN" in out, out
    assert ":20042 " in out.split("workers:")[1]  # the coordinator's port on the first node
    assert "--insecure_listen" not in out and "--tls" not in out, out  # neither: the coordinator will refuse
    assert "LATHE_WORKER_TOKEN" not in out and "--worker_token" not in out, out  # environment only
    tls = run(["bash", "launch/slurm.sbatch"], LATHE_DRY_RUN="1", LATHE_MODEL="Qwen/Qwen3-30B-A3B",
              LATHE_MODEL_DIR="/m/q30", LATHE_HOME=ROOT, LATHE_TLS_CERT="/etc/c.pem", LATHE_TLS_KEY="/etc/k.pem",
              LATHE_TLS_CA="/etc/ca.pem")
    assert "--tls_cert /etc/c.pem --tls_key /etc/k.pem" in tls.stdout.split("workers:")[0], tls.stdout
    assert "--tls_ca /etc/ca.pem" in tls.stdout.split("workers:")[1], tls.stdout
    plain = run(["bash", "launch/slurm.sbatch"], LATHE_DRY_RUN="1", LATHE_MODEL="Qwen/Qwen3-30B-A3B",
                LATHE_MODEL_DIR="/m/q30", LATHE_HOME=ROOT, LATHE_INSECURE_LISTEN="1")
    assert "--insecure_listen" in plain.stdout, plain.stdout
    sub = run(["bash", "launch/slurm_submit.sh", "--partition", "gpu"], LATHE_DRY_RUN="1",
              LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_REPLICAS="2")
    assert sub.returncode == 0, sub.stderr
    assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in sub.stdout and "--partition gpu" in sub.stdout


def test_slurm_replica_steps_are_printed_one_per_replica():
    env = dict(LATHE_DRY_RUN="1", LATHE_REPLICA_JOBS="1", LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_REPLICAS="2",
               LATHE_MODEL_DIR="/m/q30", LATHE_HOME=ROOT, SLURM_JOB_ID="42", SLURMD_NODENAME="gpu07",
               SLURM_JOB_NODELIST="gpu07,gpu08", LATHE_GLOO_HOSTNAME="10.0.0.9", LATHE_SRUN_ARGS="--gpus-per-task=1")
    r = run(["bash", "launch/slurm.sbatch"], **env)
    assert r.returncode == 0, r.stderr
    assert "workers:" not in r.stdout, r.stdout
    for i, node in enumerate(("gpu07", "gpu08")):
        [line] = [l for l in r.stdout.splitlines() if l.startswith(f"replica {i}: ")]
        args = shlex.split(line.split(": ", 1)[1])
        assert args[:3] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1"], args
        for flag in (f"--job-name=lathe-replica-{i}", "--nodes=1", f"--nodelist={node}", "--ntasks=8",
                     "--ntasks-per-node=8", "--gpus-per-task=1"):
            assert flag in args, (flag, args)
        assert args[args.index("--replica_index") + 1] == str(i)
        assert args[args.index("--gloo_hostname") + 1] == "10.0.0.9"
        assert args[args.index("--coordinator") + 1] == "gpu07:20042"  # the batch host
    few = run(["bash", "launch/slurm.sbatch"], **dict(env, SLURM_JOB_NODELIST="gpu07"))
    assert few.returncode == 2 and "the allocation has 1 (gpu07), the plan 2" in few.stderr, few.stderr
    sub = run(["bash", "launch/slurm_submit.sh"], LATHE_DRY_RUN="1", LATHE_REPLICA_JOBS="1",
              LATHE_MODEL="Qwen/Qwen3-30B-A3B", LATHE_REPLICAS="2")
    assert "--nodes=2 " in sub.stdout and "--no-kill" in sub.stdout, sub.stdout
    one = run(["bash", "launch/slurm_submit.sh"], LATHE_DRY_RUN="1", LATHE_MODEL="Qwen/Qwen3-30B-A3B")
    assert "--no-kill" not in one.stdout, one.stdout


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    model = str(d / "tiny-qwen3-moe")
    r = run([os.path.join(BUILD, "runtime", "lathe_sft"), "--make_tiny_model", model, "--make_data",
             str(d / "data.jsonl")], timeout=120)
    assert r.returncode == 0, r.stderr
    return model, str(d / "data.jsonl")


def test_srun_command_line_runs_under_mpirun(tiny_model):
    model, _ = tiny_model
    r = run(["bash", "launch/slurm.sbatch"], LATHE_DRY_RUN="1", LATHE_MODEL="tiny", LATHE_REPLICAS="2",
            LATHE_LAYOUT_FLAGS="--devices_per_node 2 --ep 2", LATHE_MODEL_DIR=model, LATHE_HOME=ROOT)
    assert r.returncode == 0, r.stderr
    srun = shlex.split(r.stdout.split("workers: ")[1].splitlines()[0])
    worker = next(i for i, a in enumerate(srun) if a.endswith("dp_worker"))
    ntasks = int(next(a for a in srun if a.startswith("--ntasks=")).split("=")[1])
    args = srun[worker:]
    p = run(["mpirun", "--oversubscribe", "-np", str(ntasks)] + args + ["--dry_run"], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    places = sorted(l for l in p.stdout.splitlines() if l.startswith("place "))
    assert len(places) == 4
    assert "rank=3 world_size=4 replica=1" in "\n".join(places) and "ep=2" in places[0]


def test_slurm_replica_step_command_lines_run_under_mpirun(tiny_model):
    model, _ = tiny_model
    r = run(["bash", "launch/slurm.sbatch"], LATHE_DRY_RUN="1", LATHE_REPLICA_JOBS="1", LATHE_MODEL="tiny",
            LATHE_REPLICAS="2", LATHE_LAYOUT_FLAGS="--devices_per_node 2 --tp 2", LATHE_MODEL_DIR=model,
            LATHE_HOME=ROOT, SLURM_JOB_NODELIST="n0,n1")
    assert r.returncode == 0, r.stderr
    for i in (0, 1):
        srun = shlex.split(r.stdout.split(f"replica {i}: ")[1].splitlines()[0])
        worker = next(k for k, a in enumerate(srun) if a.endswith("dp_worker"))
        ntasks = int(next(a for a in srun if a.startswith("--ntasks=")).split("=")[1])
        p = run(["mpirun", "--oversubscribe", "-np", str(ntasks)] + srun[worker:] + ["--dry_run"], timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        places = sorted(l for l in p.stdout.splitlines() if l.startswith("place "))
        assert len(places) == 2 and all(f"world_size=2 replica={i} " in p and "tp=2" in p for p in places), places


def test_a_task_mpi_started_alone_is_refused(tiny_model):
    model, _ = tiny_model
    # srun without --mpi=pmix: the task is an MPI world of one, slurm says 2.
    r = run([os.path.join(BUILD, "dp_worker", "dp_worker"), "--model", model, "--replicas", "1", "--dry_run"],
            SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_NODEID="0", SLURM_NNODES="1")
    assert r.returncode != 0
    assert "--mpi=pmix" in r.stderr, r.stderr


def test_mpirun_script_serves_a_training_run(tiny_model, tmp_path):
    model, data = tiny_model
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=8\n")
    env = dict(LATHE_MODEL="tiny-qwen3-moe", LATHE_REPLICAS="2", LATHE_LAYOUT_FLAGS="--devices_per_node 2 --ep 2",
               LATHE_MODEL_DIR=model, LATHE_HOSTFILE=str(hostfile), LATHE_PORT="0", LATHE_COORDINATOR_HOST="127.0.0.1",
               LATHE_MAP_BY="slot", LATHE_MPIRUN_ARGS="--oversubscribe", LATHE_LOG_DIR=str(tmp_path / "logs"))
    dry = run(["bash", "launch/mpirun.sh"], LATHE_DRY_RUN="1", **env)
    assert dry.returncode == 0, dry.stderr
    assert "mpirun -np 4 --map-by slot --bind-to none --hostfile" in dry.stdout, dry.stdout
    assert "-x LATHE_WORKER_TOKEN" in dry.stdout, dry.stdout
    # The coordinator listens on 0.0.0.0: without TLS (or the explicit
    # insecure flag) it refuses to start, and the script says where to look.
    plaintext = run(["bash", "launch/mpirun.sh"], timeout=60, **env)
    assert plaintext.returncode != 0 and "coordinator did not start" in plaintext.stderr, plaintext.stderr
    assert "--insecure_listen" in plaintext.stderr, plaintext.stderr
    env.update(tls_files(tmp_path))
    # With TLS, API keys are still required off loopback.
    keyless = run(["bash", "launch/mpirun.sh"], timeout=60, **env)
    assert keyless.returncode != 0 and "API keys are required" in keyless.stderr, keyless.stderr
    key_file = tmp_path / "key"
    key_file.write_text("k-launch\n")
    env["LATHE_API_KEY_FILE"] = str(key_file)
    env["LATHE_MPIRUN_ARGS"] = "--oversubscribe -x OMP_NUM_THREADS"
    launcher = subprocess.Popen(["bash", "launch/mpirun.sh"], cwd=ROOT, env=dict(ENV, **env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        port_file = tmp_path / "logs" / "port"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.time() < deadline and launcher.poll() is None, "coordinator did not start"
            time.sleep(0.2)
        address = "127.0.0.1:" + port_file.read_text().strip()
        ca = ["--tls_ca", env["LATHE_TLS_CA"]]
        refused = run([CLI, "info", "--address", address, "--wait_s", "5", *ca], timeout=60)
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stdout + refused.stderr
        plain = run([CLI, "info", "--address", address, "--api_key_file", str(key_file)], timeout=60)
        assert plain.returncode != 0, plain.stdout  # TLS only
        train = run([CLI, "train", "--address", address, "--api_key_file", str(key_file), "--wait_s", "90", *ca,
                     "--data", data, "--steps", "3", "--batch_size", "4", "--learning_rate", "5e-3"], timeout=240)
        assert train.returncode == 0, train.stdout + train.stderr
        assert "step 3" in train.stdout or "3/3" in train.stdout, train.stdout
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            raise


def _dp_worker_pids(replica_index):
    """pids of the live dp_worker processes started with --replica_index `replica_index`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and argv and argv[0].endswith(b"dp_worker") and b"--replica_index" in argv:
            if argv[argv.index(b"--replica_index") + 1] == str(replica_index).encode():
                out.append(int(name))
    return out


def _wait_for(path, text, timeout, launcher):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert launcher.poll() is None, f"the launcher exited {launcher.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"{path} does not say {text!r} within {timeout} s")


def test_mpirun_script_restarts_a_failed_replica_job(tiny_model, tmp_path):
    model, data = tiny_model
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=8\nlocalhost slots=8\n")
    key_file = tmp_path / "key"
    key_file.write_text("k-launch\n")
    logs = tmp_path / "logs"
    env = dict(LATHE_MODEL="tiny-qwen3-moe", LATHE_REPLICAS="2", LATHE_LAYOUT_FLAGS="--devices_per_node 1",
               LATHE_MODEL_DIR=model, LATHE_HOSTFILE=str(hostfile), LATHE_PORT="0", LATHE_COORDINATOR_HOST="127.0.0.1",
               LATHE_MAP_BY="slot", LATHE_MPIRUN_ARGS="--oversubscribe -x OMP_NUM_THREADS", LATHE_LOG_DIR=str(logs),
               LATHE_REPLICA_JOBS="1", LATHE_GLOO_HOSTNAME="127.0.0.1", LATHE_RESTART_DELAY_S="1", LATHE_MAX_RUNS="2",
               LATHE_API_KEY_FILE=str(key_file), **tls_files(tmp_path))
    dry = run(["bash", "launch/mpirun.sh"], LATHE_DRY_RUN="1", **env)
    assert dry.returncode == 0, dry.stderr
    for i in (0, 1):
        assert f"replica {i}: mpirun -np 1 " in dry.stdout and f"--hostfile {logs}/hosts-{i} " in dry.stdout, dry.stdout
        assert f"--replica_index {i} --gloo_hostname 127.0.0.1" in dry.stdout, dry.stdout
    short = tmp_path / "short"
    short.write_text("localhost slots=8\n")
    refused = run(["bash", "launch/mpirun.sh"], LATHE_DRY_RUN="1", **dict(env, LATHE_HOSTFILE=str(short)))
    assert refused.returncode == 2 and "a hostfile line per node" in refused.stderr, refused.stderr

    launcher = subprocess.Popen(["bash", "launch/mpirun.sh"], cwd=ROOT, env=dict(ENV, **env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        port_file = logs / "port"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.time() < deadline and launcher.poll() is None, "coordinator did not start"
            time.sleep(0.2)
        address = "127.0.0.1:" + port_file.read_text().strip()
        client = ["--address", address, "--api_key_file", str(key_file), "--tls_ca", env["LATHE_TLS_CA"]]
        train = [CLI, "train", *client, "--wait_s", "90", "--data", data, "--batch_size", "4",
                 "--learning_rate", "5e-3"]
        first = run(train + ["--steps", "2"], timeout=240)
        assert first.returncode == 0, first.stdout + first.stderr
        coordinator_log = logs / "coordinator.log"
        [pid] = _dp_worker_pids(1)
        os.kill(pid, signal.SIGKILL)
        _wait_for(coordinator_log, "replica 1 left", 30, launcher)
        _wait_for(coordinator_log, "replica 1 registered again", 60, launcher)
        # The next run's operations admit it; both replicas then train.
        second = run(train + ["--steps", "2"], timeout=240)
        assert second.returncode == 0, second.stdout + second.stderr
        _wait_for(coordinator_log, "replica(s) joined with the state of every run", 10, launcher)
        assert len(_dp_worker_pids(0)) == 1 and len(_dp_worker_pids(1)) == 1
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            out, _ = launcher.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            raise
    assert "[mpirun] replica 1 exited" in out and "restart 1 in 1 s" in out, out
    assert launcher.returncode == 0, out


def _pod_pids(replica_index, address):
    """The live dp_worker ranks of replica `replica_index` that dial `address`."""
    out = []
    for pid in _dp_worker_pids(replica_index):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if address.encode() in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def test_lws_replica_pods_run_here_and_a_recreated_group_rejoins(tiny_model, tmp_path):
    """The containers' commands of lws-replicas, run here as Kubernetes would run them: the
    coordinator pod's, then each group leader's with its REPLICA_INDEX. A mount namespace gives
    them an /etc/hosts that resolves the coordinator's Service name here; the checkpoint volume's
    mount path is a folder here. A rank killed ends its leader's container with an error (what
    makes LWS recreate the group); the leader's command run again rejoins."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a mount namespace for the pods' /etc/hosts)")
    model, data = tiny_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    docs = render("lws-replicas", LATHE_MODEL="tiny", LATHE_REPLICAS="2", LATHE_LAYOUT_FLAGS="--devices_per_node 1",
                  LATHE_MODEL_DIR=model, LATHE_NAME="lt", LATHE_PORT=str(port), LATHE_INSECURE_LISTEN="1",
                  LATHE_MAX_RUNS="2")
    coordinator_script = docs[0]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    leader_script = docs[2]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["args"][0]
    hosts = tmp_path / "hosts"
    with open("/etc/hosts") as f:
        hosts.write_text(f.read() + "\n127.0.0.1 lt-coordinator\n")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    key = tmp_path / "key"
    key.write_text("k-lws\n")
    path = os.pathsep.join([os.path.join(BUILD, "coordinator"), os.path.join(BUILD, "dp_worker"), ENV["PATH"]])
    secrets = dict(LATHE_API_KEYS="k-lws", LATHE_WORKER_TOKEN="t" * 32)
    procs = []

    def pod(name, script, **env):
        script = script.replace("/checkpoints", str(checkpoints))
        log = open(tmp_path / f"{name}.log", "ab")
        p = subprocess.Popen(["unshare", "--mount", "bash", "-c", f'mount --bind {hosts} /etc/hosts && exec bash -c "$0"',
                              script], cwd=tmp_path, env=dict(ENV, PATH=path, LD_LIBRARY_PATH=os.environ.get(
                                  "LD_LIBRARY_PATH", ""), **env), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    def leader(g):
        folder = tmp_path / f"group-{g}"
        folder.mkdir(exist_ok=True)
        return pod(f"leader-{g}", leader_script, REPLICA_INDEX=str(g), TMPDIR=str(folder), NCCL_DEBUG="WARN",
                   NCCL_SOCKET_IFNAME="lo", LATHE_WORKER_TOKEN=secrets["LATHE_WORKER_TOKEN"])

    coordinator_log = tmp_path / "coordinator.log"
    address = f"127.0.0.1:{port}"
    cli = [CLI, "train", "--address", address, "--api_key_file", str(key), "--data", data, "--batch_size", "4",
           "--learning_rate", "5e-3"]
    try:
        pod("coordinator", coordinator_script, **secrets)
        leaders = [leader(0), leader(1)]
        first = run(cli + ["--wait_s", "90", "--steps", "2"], timeout=240)
        assert first.returncode == 0, first.stdout + first.stderr + coordinator_log.read_text()
        assert "lathe train: loss" in first.stdout, first.stdout
        [pid] = _pod_pids(1, f"lt-coordinator:{port}")
        os.kill(pid, signal.SIGKILL)
        assert leaders[1].wait(timeout=30) != 0  # the leader container fails: LWS recreates the group
        assert leaders[0].poll() is None
        _wait_for(coordinator_log, "replica 1 left", 30, procs[0])
        leaders[1] = leader(1)
        _wait_for(coordinator_log, "replica 1 registered again", 60, procs[0])
        second = run(cli + ["--steps", "2"], timeout=240)
        assert second.returncode == 0, second.stdout + second.stderr + coordinator_log.read_text()
        _wait_for(coordinator_log, "replica(s) joined with the state of every run", 10, procs[0])
        assert len(_pod_pids(0, f"lt-coordinator:{port}")) == 1 and len(_pod_pids(1, f"lt-coordinator:{port}")) == 1
        group1 = (tmp_path / "leader-1.log").read_text()
        assert "replica=1" in group1 and "replica=0" not in group1, group1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
