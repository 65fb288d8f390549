"""tinker-cookbook 0.5.8's ``recipes/sl_loop.py`` and ``recipes/rl_loop.py``, unchanged and
offline, against a lathe deployment through the HTTP door (docs/http-api.md, "Tested with").

The recipes run as ``python -m tinker_cookbook.recipes.<name> key=value ...`` (their chz
command line) with the interpreter of ``.venv-cookbook`` (scripts/setup.sh), in a folder
that cookbook_fixtures.py fills with what they load by name: the tokenizer of
``Qwen/Qwen3-8B``, the datasets ``HuggingFaceH4/no_robots`` and ``openai/gsm8k`` (all
written here, no network), and the tiny model the deployment serves under that name.
Only the config is lowered (batch size, steps, tokens); the recipes' code is the wheel's.
"""
from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import subprocess

import pytest

import service_client as sc
from lathe.v1 import service_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PYTHON = os.path.join(REPO, ".venv-cookbook", "bin", "python")
KEY = "tml-lathe-cookbook-key"  # the SDK requires the tml- prefix
FIXTURE_TIMEOUT_S = 120
RECIPE_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cookbook(tmp_path_factory) -> dict:
    """The folder the recipes run in, with the tokenizer, datasets and model written."""
    if not os.access(PYTHON, os.X_OK):
        pytest.fail(f"{PYTHON} is missing: scripts/setup.sh installs tinker-cookbook==0.5.8 there")
    folder = str(tmp_path_factory.mktemp("cookbook"))
    proc = subprocess.run([PYTHON, os.path.join(HERE, "cookbook_fixtures.py"), folder], capture_output=True,
                          text=True, timeout=FIXTURE_TIMEOUT_S)
    assert proc.returncode == 0, f"cookbook_fixtures.py failed:\n{proc.stderr[-3000:]}"
    return {"dir": folder, **json.loads(proc.stdout.strip().splitlines()[-1])}


def test_recipes_are_the_wheels(cookbook):
    """The recipes run below are byte for byte the ones tinker-cookbook 0.5.8 ships (its RECORD)."""
    records = glob.glob(os.path.join(REPO, ".venv-cookbook", "lib", "python3*", "site-packages",
                                     "tinker_cookbook-0.5.8.dist-info", "RECORD"))
    assert len(records) == 1, records
    site = os.path.dirname(os.path.dirname(records[0]))
    with open(records[0]) as f:
        hashes = dict(line.split(",")[:2] for line in f if line.count(",") == 2)
    for recipe in ("sl_loop", "rl_loop"):
        path = f"tinker_cookbook/recipes/{recipe}.py"
        with open(os.path.join(site, path), "rb") as f:
            digest = base64.urlsafe_b64encode(hashlib.sha256(f.read()).digest()).rstrip(b"=").decode()
        assert hashes[path] == f"sha256={digest}", path


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, cookbook):
    """A deployment of the fixture model, named as the cookbook knows it, with the HTTP door:
    (deployment, base_url). 2 data-parallel replicas of 1 rank."""
    with sc.http_door(build_dir, cookbook["model_dir"], str(tmp_path_factory.mktemp("cookbook_door")), KEY,
                      worker_args=["--base_model", cookbook["model_name"], "--devices_per_node", "1", "--cp", "1",
                                   "--max_seq_len", "4096"], replicas=2, ranks=2,
                      ep=1) as door_and_url:
        yield door_and_url


def _run_recipe(cookbook: dict, url: str, recipe: str, log_path: str, **config) -> None:
    """Runs the recipe to its end (bounded); fails with its output's tail otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TINKER_", "HF_"))}
    env.update(TINKER_BASE_URL=url, TINKER_API_KEY=KEY, TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HOME=os.path.join(cookbook["dir"], "hf-home"),
               TRANSFORMERS_VERBOSITY="error")
    args = [f"model_name={cookbook['model_name']}", f"log_path={log_path}",
            *(f"{k}={v}" for k, v in config.items())]
    cmd = [PYTHON, "-m", f"tinker_cookbook.recipes.{recipe}", *args]
    output = f"{log_path}.log"  # the recipe's stdout and stderr
    with open(output, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cookbook["dir"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(RECIPE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    with open(output, errors="replace") as f:
        tail = f.read()[-6000:]
    assert rc is not None, f"{recipe} did not finish within {RECIPE_TIMEOUT_S} s:\n{tail}"
    assert rc == 0, f"{recipe} exited {rc}:\n{tail}"


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run_of(tinker_path: str) -> str:
    assert tinker_path.startswith("tinker://"), tinker_path
    return tinker_path[len("tinker://"):].split("/")[0]


def _listed(d: sc.Deployment, run: str) -> set[str]:
    got = d.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run), metadata=d.metadata(),
                                 timeout=sc.RPC_TIMEOUT_S)
    return {c.id for c in got.checkpoints}


def _info(d: sc.Deployment, run: str) -> pb.RunInfo:
    return d.stub.GetInfo(pb.GetInfoRequest(run_id=run), metadata=d.metadata(), timeout=sc.RPC_TIMEOUT_S)


def test_sl_loop_trains_and_saves(door, cookbook, tmp_path):
    d, url = door
    log_path = str(tmp_path / "sl")
    # 16 rows / 4 = 4 steps; a save at step 2 and the final one.
    _run_recipe(cookbook, url, "sl_loop", log_path, batch_size=4, max_steps=4, learning_rate=1e-2, lora_rank=8,
                save_every=2, max_length=512)
    metrics = _jsonl(os.path.join(log_path, "metrics.jsonl"))
    nll = [m["train_mean_nll"] for m in metrics]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3], metrics
    assert all(m["num_sequences"] == 4 for m in metrics), metrics
    assert nll[-1] < nll[0] * 0.9, nll  # the loss the recipe computed from the door's logprobs fell
    saved = _jsonl(os.path.join(log_path, "checkpoints.jsonl"))
    assert [s["name"] for s in saved] == ["000002", "final"], saved
    run = _run_of(saved[0]["state_path"])
    assert saved[0]["state_path"] == f"tinker://{run}/weights/000002"
    assert saved[1]["state_path"] == f"tinker://{run}/weights/final"
    assert saved[1]["sampler_path"] == f"tinker://{run}/sampler_weights/final"
    assert _listed(d, run) >= {f"lathe://{run}/weights/000002", f"lathe://{run}/weights/final",
                               f"lathe://{run}/sampler_weights/final"}
    info = _info(d, run)
    assert (info.base_model, info.step, info.lora.rank) == (cookbook["model_name"], 4, 8)


def test_rl_loop_samples_trains_and_saves(door, cookbook, tmp_path):
    d, url = door
    log_path = str(tmp_path / "rl")
    # 8 questions / 4 = 2 steps of 4 groups of 4 samples; a save at step 1 and the final one.
    _run_recipe(cookbook, url, "rl_loop", log_path, batch_size=4, group_size=4, max_tokens=16, max_steps=2,
                lora_rank=8, save_every=1)
    metrics = _jsonl(os.path.join(log_path, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 1], metrics
    # The mean reward of the samples, graded from their decoded text: some answered right.
    rewards = [m["reward/total"] for m in metrics]
    assert all(0.0 < r < 1.0 for r in rewards), rewards
    saved = _jsonl(os.path.join(log_path, "checkpoints.jsonl"))
    assert [s["name"] for s in saved] == ["000001", "final"], saved
    run = _run_of(saved[0]["state_path"])
    assert saved[1]["sampler_path"] == f"tinker://{run}/sampler_weights/final"
    listed = _listed(d, run)
    assert listed >= {f"lathe://{run}/weights/000001", f"lathe://{run}/weights/final",
                      f"lathe://{run}/sampler_weights/final"}, listed
    # One ephemeral sampler save per step (save_weights_and_get_sampling_client).
    assert len([c for c in listed if "/sampler_weights/ephemeral-" in c]) == 2, listed
    info = _info(d, run)
    # Both steps trained: importance_sampling forward_backward + optim_step (a step whose groups
    # all had equal rewards would have skipped them).
    assert (info.base_model, info.step, info.policy_version) == (cookbook["model_name"], 2, 3), info
