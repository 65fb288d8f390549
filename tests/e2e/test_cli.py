"""The C++ client library through the `lathe` CLI against a live deployment:
info, a short SFT run whose loss must fall, and the refusals a user sees."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np

import service_client as sc

CLI_TIMEOUT_S = 120


def _lathe(build_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(build_dir, "client", "lathe"), *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def _sft_data(path: str, count: int = 32, length: int = 48) -> None:
    """Sequences that follow t[i+1] = t[i] + stride (mod vocab): learnable in a few steps."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(count):
            start, stride = int(rng.integers(0, sc.VOCAB)), int(rng.integers(1, 4))
            f.write(json.dumps({"tokens": [(start + i * stride) % sc.VOCAB for i in range(length)]}) + "\n")


def test_info_train_and_checkpoints(deployment, build_dir, tmp_path):
    address = f"127.0.0.1:{deployment.port}"
    info = _lathe(build_dir, "info", "--address", address, "--wait_s", "30")
    assert info.returncode == 0, info.stderr
    assert "SERVING" in info.stdout and "tiny" in info.stdout, info.stdout
    # A readable summary, one fact per line, not a protobuf dump.
    assert re.search(r"^deployment: SERVING, 2 of 2 replica\(s\) registered$", info.stdout, re.M), info.stdout
    assert re.search(r"^layout: 2 replica\(s\) x 1 node\(s\) x 2 device\(s\) per node, tp 1, ep 2$", info.stdout,
                     re.M), info.stdout
    assert "{" not in info.stdout, info.stdout

    data = str(tmp_path / "sft.jsonl")
    _sft_data(data)
    train = _lathe(build_dir, "train", "--address", address, "--data", data, "--steps", "12", "--batch_size", "8",
                   "--learning_rate", "1e-2", "--lora_rank", "16", "--min_loss_drop", "0.05")
    assert train.returncode == 0, train.stdout + train.stderr
    steps = re.findall(r"step +(\d+)/12 +loss ([0-9.]+) +grad_norm [0-9.]+ +(\d+) tokens/s +eta (\d+)s", train.stdout)
    assert [int(s[0]) for s in steps] == list(range(1, 13)), train.stdout
    assert float(steps[-1][1]) < float(steps[0][1]), train.stdout
    run_id = re.search(r"run (run-[0-9a-f]+)", train.stdout).group(1)

    described = _lathe(build_dir, "info", "--address", address, "--run_id", run_id)
    assert described.returncode == 0, described.stderr
    assert "step: 12" in described.stdout and "LoRA rank: 16" in described.stdout, described.stdout

    checkpoints = _lathe(build_dir, "checkpoints", "--address", address, "--run_id", run_id)
    # This deployment was started without a checkpoint root: a clear refusal, at save and at listing.
    assert checkpoints.returncode == 1 and "--checkpoint_root" in checkpoints.stderr, checkpoints.stderr
    unsaved = _lathe(build_dir, "train", "--address", address, "--data", data, "--steps", "1", "--save", "x")
    assert unsaved.returncode == 1 and "--checkpoint_root" in unsaved.stderr, unsaved.stderr


def test_cli_refusals(deployment, build_dir, tmp_path):
    address = f"127.0.0.1:{deployment.port}"
    missing = _lathe(build_dir, "train", "--address", address, "--data", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 1 and str(tmp_path / "none.jsonl") in missing.stderr, missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 2, 999]}\n')  # 999 is outside the vocabulary
    refused = _lathe(build_dir, "train", "--address", address, "--data", str(bad), "--steps", "1")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr, refused.stderr
    assert _lathe(build_dir, "frobnicate", "--address", address).returncode == 2
    nobody = _lathe(build_dir, "info", "--address", "127.0.0.1:1", "--wait_s", "1")
    assert nobody.returncode == 1 and "not serving" in nobody.stderr, nobody.stderr
