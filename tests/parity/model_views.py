"""Small pieces the latent-attention parity tests share: lathe_model_config on a config.json
(what lathe reads from it), and a wrapper's text tower seen as a causal LM."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch


def model_config_binary() -> str:
    build = os.environ.get("LATHE_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
    exe = os.path.join(build, "tests", "lathe_model_config")
    if not os.path.exists(exe):
        pytest.skip(f"lathe_model_config not built (looked for {exe}; set LATHE_BUILD_DIR)")
    return exe


def read_config(config: dict, tmp_path) -> subprocess.CompletedProcess:
    """lathe_model_config on a folder holding ``config`` as its config.json."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return subprocess.run([model_config_binary(), str(d)], capture_output=True, text=True, timeout=60)


class TextView(torch.nn.Module):
    """A wrapper's text tower seen as a causal LM's ``.model`` (what min_routing_margin walks)."""

    def __init__(self, text):
        super().__init__()
        self.model = text
        self.config = text.config

    def forward(self, input_ids, **kw):
        return self.model(input_ids=input_ids, **kw)
