"""A run that numbers its own seq_ids, and a checkpoint read back from its manifest's slices
(shared by the checkpoint tests)."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

import service_client as sc
from service_client import Retrieve, adam, pb


class Run:
    """A run that numbers its own seq_ids."""

    def __init__(self, stub, **lora):
        self.stub, self.id, self.seq = stub, sc.create_run(stub, **lora), 0

    def op(self, **kw):
        self.seq += 1
        return sc.wait(self.stub, sc.submit(self.stub, self.id, self.seq, **kw), timeout=60)

    def ok(self, **kw):
        r = self.op(**kw)
        assert r.state == Retrieve.DONE, r
        return r.result

    def steps(self, batches, lr=1e-2):
        losses = []
        for b in batches:
            losses.append(self.ok(forward_backward=b).forward_backward.metrics["loss:sum"])
            self.ok(optim_step=adam(learning_rate=lr))
        return losses

    def save(self, name, **kw):
        return self.ok(save_state=pb.SaveStateOp(name=name, **kw)).save_state.path


def assemble(root, path):
    """{(kind, name): full array} of a checkpoint, built from its manifest's slices."""
    run_id, _, name = path[len("lathe://"):].split("/")
    folder = os.path.join(root, run_id, "weights", name)
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    files, out = {}, {}
    for e in manifest["tensors"]:
        if e["file"] not in files:
            files[e["file"]] = load_file(os.path.join(folder, e["file"]))
        src = files[e["file"]][e["tensor"]]
        full = out.setdefault((e["kind"], e["name"]), np.full(e["global_shape"], np.nan, np.float32))
        index = [slice(None)] * len(e["global_shape"])
        if e["shard_dim"] >= 0:
            index[e["shard_dim"]] = slice(e["begin"], e["begin"] + src.shape[e["shard_dim"]])
        full[tuple(index)] = src
    for key, full in out.items():
        assert not np.isnan(full).any(), f"{path}: {key} not fully covered"
    return manifest, out


def assert_bitwise_equal(a, b, what):
    assert a.keys() == b.keys(), f"{what}: tensors differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert np.array_equal(a[key].view(np.uint32), b[key].view(np.uint32)), f"{what}: {key} differs"
