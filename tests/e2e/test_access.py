"""Who may reach a deployment, and with how much: the coordinator reads no request body
before the caller's API key is checked, refuses messages over --max_request_bytes, serves
TLS that the workers, the CLI and Python clients verify, and refuses plaintext off loopback
unless told --insecure_listen.
"""

from __future__ import annotations

import os
import subprocess
import time

import grpc
import pytest

import service_client as sc
from service_client import Health

Code = grpc.StatusCode
MIB = 1 << 20
NO_SEND_LIMIT = [("grpc.max_send_message_length", -1)]


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _raw_submit(channel, body: bytes, metadata=None) -> Code | None:
    call = channel.unary_unary("/lathe.v1.Lathe/Submit", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    try:
        call(body, metadata=metadata, timeout=60)
    except grpc.RpcError as e:
        return e.code()
    return None


def _submit_of(size: int) -> bytes:
    """A SubmitRequest of about `size` bytes: run_id plus one opaque forward_backward field."""
    varint = bytearray()
    n = size
    while True:
        varint.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return b"\x0a\x03run" + b"\x62" + bytes(varint) + b"x" * size


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A CA, a server certificate it signed for 127.0.0.1/localhost, and an unrelated CA."""
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        r = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                "-days", "2", "-subj", f"/CN=lathe {ca}")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return {"cert": str(d / "server.pem"), "key": str(d / "server.key"), "ca": str(d / "ca.pem"),
            "other_ca": str(d / "other-ca.pem")}


# --------------------------------------------------------------------------------------
# request size and authentication before the body
# --------------------------------------------------------------------------------------

def test_unauthenticated_bodies_are_not_read(make_deployment):
    d = make_deployment("unread", workers=False, coordinator_args=["--auth", "on"],
                        coordinator_env={"LATHE_API_KEYS": "k1"}).start()
    channel = grpc.insecure_channel(d.address, options=NO_SEND_LIMIT)
    body = _submit_of(150 * MIB)
    before = _peak_rss_mib(d.coordinator.pid)
    t0 = time.monotonic()
    assert _raw_submit(channel, body) == Code.UNAUTHENTICATED
    assert _raw_submit(channel, body, (("authorization", "Bearer wrong"),)) == Code.UNAUTHENTICATED
    elapsed = time.monotonic() - t0
    growth = _peak_rss_mib(d.coordinator.pid) - before
    print(f"unauthenticated 2 x 150 MiB Submit: coordinator peak RSS {before:.0f} -> {before + growth:.0f} MiB, "
          f"{elapsed:.2f} s")
    assert growth < 32, f"the coordinator's peak RSS grew by {growth:.0f} MiB for refused requests"
    # With the key the same request is read and refused for its size (default limit 64 MiB).
    assert _raw_submit(channel, body, (("authorization", "Bearer k1"),)) == Code.RESOURCE_EXHAUSTED
    assert d.coordinator.poll() is None


def test_messages_over_max_request_bytes_are_refused(make_deployment):
    d = make_deployment("limit", workers=False, coordinator_args=["--auth", "on", "--max_request_bytes", str(MIB)],
                        coordinator_env={"LATHE_API_KEYS": "k1"}).start()
    channel = grpc.insecure_channel(d.address, options=NO_SEND_LIMIT)
    key = (("authorization", "Bearer k1"),)
    assert _raw_submit(channel, _submit_of(2 * MIB), key) == Code.RESOURCE_EXHAUSTED
    # Under the limit it is read and answered (no replicas yet: UNAVAILABLE, or refused as malformed).
    assert _raw_submit(channel, _submit_of(MIB // 2), key) in (Code.UNAVAILABLE, Code.INVALID_ARGUMENT)
    assert d.health().state == Health.STARTING


# --------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------

def _cli(d, *args, **env):
    return subprocess.run([os.path.join(d.build_dir, "client", "lathe"), "info", "--address", d.address, *args],
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=60)


def test_tls_is_verified_by_workers_cli_and_python(make_deployment, tls_files):
    d = make_deployment("tls", tls=tls_files).start()  # SERVING: the workers verified the certificate
    run_id = sc.create_run(d.stub, rank=4)  # a round trip to the replicas, over TLS both ways
    assert run_id
    with open(tls_files["other_ca"], "rb") as f:
        strangers = grpc.secure_channel(d.address, grpc.ssl_channel_credentials(f.read()))
    plain = grpc.insecure_channel(d.address)
    for channel in (strangers, plain):
        health = channel.unary_unary("/lathe.v1.Lathe/Health", request_serializer=lambda _: b"",
                                     response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            health(None, timeout=5)
        assert e.value.code() == Code.UNAVAILABLE
    ok = _cli(d, "--tls_ca", tls_files["ca"])
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    assert _cli(d, LATHE_TLS_CA=tls_files["ca"]).returncode == 0
    assert _cli(d).returncode != 0
    assert _cli(d, "--tls_ca", tls_files["other_ca"]).returncode != 0


def _coordinator(build_dir, tmp_path, *args, timeout=10):
    """Starts lathe_coordinator; (started, output). Stopped again when it started."""
    port_file = tmp_path / "port"
    log = tmp_path / "coordinator.log"
    cmd = [os.path.join(build_dir, "coordinator", "lathe_coordinator"), "--port_file", str(port_file), *args]
    env = dict(os.environ, LATHE_WORKER_TOKEN="t" * 32, LATHE_API_KEYS="k1")
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while p.poll() is None and not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return port_file.exists(), log.read_text()
    finally:
        p.terminate()
        p.wait(10)


def test_plaintext_off_loopback_needs_insecure_listen(build_dir, tls_files, tmp_path):
    started, out = _coordinator(build_dir, tmp_path, "--listen", "0.0.0.0:0")
    assert not started and "--insecure_listen" in out and "--tls_cert" in out, out
    started, out = _coordinator(build_dir, tmp_path, "--listen", "0.0.0.0:0", "--insecure_listen")
    assert started, out
    os.remove(tmp_path / "port")
    started, out = _coordinator(build_dir, tmp_path, "--listen", "0.0.0.0:0", "--tls_cert", tls_files["cert"],
                                "--tls_key", tls_files["key"])
    assert started, out


def test_coordinator_without_worker_token_refuses_to_start(build_dir, tmp_path):
    cmd = [os.path.join(build_dir, "coordinator", "lathe_coordinator"), "--listen", "127.0.0.1:0"]
    env = {k: v for k, v in os.environ.items() if k != "LATHE_WORKER_TOKEN"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "worker token is required" in r.stderr, r.stderr
