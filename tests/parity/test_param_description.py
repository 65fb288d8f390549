"""The parameter descriptions (params/) against the runtime's loaders and the checkpoints
transformers writes: for every tiny model kind, lathe_describe_check
(tests/params/describe_check_main.cc) checks that the checkpoint's text-model tensors are
the described ones and sum to the description's parameter count (what ``lathe plan``
counts), and that the runtime loads exactly the described tensors, at their full shapes,
cut on every rank of tp 2 / ep 2 as the description says, training what it counts."""

from __future__ import annotations

import os
import subprocess
import warnings

import pytest

import make_tiny_models

KINDS = (make_tiny_models.KINDS + make_tiny_models.EXTRA_KINDS + make_tiny_models.QWEN3_5_KINDS
         + make_tiny_models.MLA_KINDS + make_tiny_models.DSA_KINDS + make_tiny_models.ROPE_BIAS_KINDS)


def binary() -> str:
    build = os.environ.get("LATHE_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
    exe = os.path.join(build, "tests", "params", "lathe_describe_check")
    if not os.path.exists(exe):
        pytest.skip(f"lathe_describe_check not built (looked for {exe}; set LATHE_BUILD_DIR)")
    return exe


def check(model_dir: str) -> None:
    proc = subprocess.run([binary(), "--model", model_dir], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS"), proc.stdout[-4000:]


@pytest.mark.parametrize("kind", KINDS)
def test_description_is_what_loads(kind, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model(kind, str(tmp_path / kind), seed=0)
    check(str(tmp_path / kind))


@pytest.mark.parametrize("tie_flag", [False, None])
def test_kimi_wrapper_description_is_what_loads(tie_flag, tmp_path):
    # The K2.5 / K2.6 layout: text weights under language_model., a vision tower and an MTP
    # layer the description leaves out (as the loader skips them).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model("deepseek_v3", str(tmp_path / "text"), seed=0)
        make_tiny_models.write_kimi_layout(str(tmp_path / "text"), str(tmp_path / "kimi"), tie_flag=tie_flag)
    check(str(tmp_path / "kimi"))


def test_a_drifted_description_is_caught(tmp_path):
    # The check fails when checkpoint and description disagree: an extra tensor is named.
    from safetensors.torch import load_file, save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model("qwen3", str(tmp_path / "m"), seed=0)
    path = str(tmp_path / "m" / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    proc = subprocess.run([binary(), "--model", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "model.layers.0.self_attn.extra.weight is not described" in proc.stdout
