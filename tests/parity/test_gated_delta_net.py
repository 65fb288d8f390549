"""Parity of lathe's Gated DeltaNet math (tensor/gated_delta_net.h) with transformers'
``Qwen3_5GatedDeltaNet`` in fp32.

transformers' torch path ignores packing, so each document is a separate transformers run;
lathe gets the documents packed back to back (through ``lathe_gdn_harness``). The core (the
input of ``out_proj``) is compared, and the gradients of sum(core * G) for a random G with
respect to the projections' outputs and the layer's own parameters.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5 as M

OUT_TOL = 1e-5    # max abs diff, relative to max(1, max |ref|)
GRAD_RTOL = 1e-4  # per tensor ||g - g_ref|| / ||g_ref||
HIDDEN = 64
PROJ = ("qkv", "z", "b", "a")


def harness_path() -> str:
    build = os.environ.get("LATHE_BUILD_DIR", "/work/main/build")
    return os.path.join(build, "tests", "lathe_gdn_harness")


def make_layer(hk: int, hv: int, seed: int) -> M.Qwen3_5GatedDeltaNet:
    cfg = Qwen3_5TextConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            linear_num_key_heads=hk, linear_num_value_heads=hv,
                            linear_key_head_dim=16, linear_value_head_dim=16)
    torch.manual_seed(seed)
    layer = M.Qwen3_5GatedDeltaNet(cfg, layer_idx=0).float()
    with torch.no_grad():  # move the parameters off their init values
        layer.dt_bias.add_(0.5 * torch.randn_like(layer.dt_bias))
        layer.norm.weight.add_(0.2 * torch.randn_like(layer.norm.weight))
        layer.conv1d.weight.mul_(2.0)
    return layer


def dims_of(layer, hk=None, hv=None) -> dict:
    return dict(num_k_heads=hk or layer.num_k_heads, num_v_heads=hv or layer.num_v_heads,
                head_k_dim=layer.head_k_dim, head_v_dim=layer.head_v_dim,
                conv_kernel=layer.conv_kernel_size, norm_eps=layer.layer_norm_epsilon)


def params_of(layer) -> dict[str, torch.Tensor]:
    return {"conv_weight": layer.conv1d.weight, "a_log": layer.A_log, "dt_bias": layer.dt_bias,
            "norm_weight": layer.norm.weight}


def _hf_pass(layer, hs, given=None):
    """transformers over each document of `hs` alone, with the projections' outputs made
    leaves (replaced by `given`'s values, cast to the layer's dtype, when set)."""
    leaves, cores, outputs = {n: [] for n in PROJ}, [], []
    for i, h in enumerate(hs):
        doc = {}

        def leaf(name):
            def hook(mod, inp, out):
                src = out if given is None else given[name][i]
                doc[name] = src.detach().to(out.dtype).requires_grad_(True)
                return doc[name]
            return hook

        handles = [getattr(layer, f"in_proj_{n}").register_forward_hook(leaf(n)) for n in PROJ]
        handles.append(layer.out_proj.register_forward_pre_hook(lambda m, args: doc.__setitem__("core", args[0])))
        outputs.append(layer(h.to(layer.out_proj.weight.dtype))[0])
        for hd in handles:
            hd.remove()
        for n in PROJ:
            leaves[n].append(doc[n])
        cores.append(doc["core"][0])
    return leaves, torch.cat(cores), torch.cat(outputs)


def _grads(layer, leaves, core, grad_out):
    layer.zero_grad()
    (core * grad_out.to(core.dtype)).sum().backward()
    grads = {n: torch.cat([x.grad[0] for x in leaves[n]]) for n in PROJ}
    grads.update({k: v.grad.clone() for k, v in params_of(layer).items()})
    return grads


def hf_documents(layer, lengths, seed):
    """Runs each document through transformers alone (fp32). Returns the packed projections,
    the packed core, the module outputs, the upstream gradient G, transformers' fp32
    gradients of sum(core * G), and the same gradients in fp64 for the same (fp32) inputs."""
    gen = torch.Generator().manual_seed(seed)
    hs = [torch.randn(1, length, HIDDEN, generator=gen) for length in lengths]
    leaves, core, outputs = _hf_pass(layer, hs)
    grad_out = torch.randn(core.shape, generator=gen)
    grads = _grads(layer, leaves, core, grad_out)
    exact = copy.deepcopy(layer).double()
    leaves64, core64, _ = _hf_pass(exact, hs, given=leaves)
    grads64 = _grads(exact, leaves64, core64, grad_out)
    packed = {n: torch.cat([x[0] for x in leaves[n]]).detach() for n in PROJ}
    return packed, core.detach(), outputs.detach(), grad_out, (grads, grads64)


def run_harness(tmp_path, tensors, meta, expect_ok=True):
    exe = harness_path()
    if not os.access(exe, os.X_OK):
        pytest.skip(f"lathe_gdn_harness not built (looked for {exe}; set LATHE_BUILD_DIR)")
    n = len(list(tmp_path.glob("in*.safetensors")))
    src, dst = str(tmp_path / f"in{n}.safetensors"), str(tmp_path / f"out{n}.safetensors")
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, src,
              metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    proc = subprocess.run([exe, src, dst], capture_output=True, text=True, timeout=120)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, f"lathe_gdn_harness exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    with safe_open(dst, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_close(got, want, what, tol=OUT_TOL):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    d = float((got - want).abs().max())
    assert d <= tol * max(1.0, float(want.abs().max())), f"{what}: max abs diff {d:.3g}"


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))


def assert_grad(got, want, what):
    """`want` = (transformers fp32, fp64) gradients. lathe must be within GRAD_RTOL of
    transformers, or, where the gradient is so ill-conditioned that transformers' own fp32
    rounding error reaches GRAD_RTOL/2 (the a_log / dt_bias sums), no further from the fp64
    gradient than GRAD_RTOL plus twice transformers' own error."""
    hf, exact = want
    assert got.shape == hf.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(hf.shape)}"
    rel, hf_err, own = rel_err(got, hf), rel_err(hf, exact), rel_err(got, exact)
    if rel <= GRAD_RTOL:
        return
    assert hf_err >= GRAD_RTOL / 2 and own <= GRAD_RTOL + 2 * hf_err, (
        f"{what}: relative error {rel:.3g} against transformers; against fp64 {own:.3g} "
        f"(transformers' own: {hf_err:.3g})")


@pytest.mark.parametrize("hk,hv,lengths", [
    (2, 4, [1, 63, 64, 65, 130]),   # grouped value heads, every chunk boundary case packed
    (2, 2, [130]),                  # one document, equal heads
    (2, 2, [3, 70, 5]),             # three documents
])
def test_packed_forward_backward_matches_separate_transformers_runs(tmp_path, hk, hv, lengths):
    layer = make_layer(hk, hv, seed=hk * 10 + hv)
    packed, core, outputs, grad_out, grads = hf_documents(layer, lengths, seed=len(lengths))
    tensors = dict(packed, **params_of(layer), grad_out=grad_out)
    res = run_harness(tmp_path, tensors, {"mode": "forward_backward", "dims": dims_of(layer), "lengths": lengths})
    assert_close(res["out"], core, "core output")
    with torch.no_grad():  # end to end: transformers' own out_proj over lathe's core
        assert_close(layer.out_proj(res["out"]), outputs, "module output")
    for name in grads[0]:
        assert_grad(res[f"grad.{name}"], (grads[0][name], grads[1][name]), f"grad of {name}")


def test_documents_do_not_leak_into_each_other(tmp_path):
    """Packing with wrong boundaries must change the result (the test above can fail)."""
    layer = make_layer(2, 2, seed=3)
    packed, core, _, grad_out, _ = hf_documents(layer, [40, 40], seed=5)
    tensors = dict(packed, **params_of(layer), grad_out=grad_out)
    res = run_harness(tmp_path, tensors, {"mode": "forward_backward", "dims": dims_of(layer), "lengths": [80]})
    diff = float((res["out"][40:] - core[40:]).abs().max())
    assert diff > 1e-3, "one 80-token sequence gave the second document's output unchanged"
    assert_close(res["out"][:40], core[:40], "first document (unaffected)")


def test_a_tensor_parallel_slice_of_heads_matches_that_slice(tmp_path):
    """A rank holding key head r and value heads 2r, 2r+1 computes exactly those heads."""
    layer = make_layer(2, 4, seed=7)
    lengths = [65, 20]
    packed, core, _, grad_out, grads = hf_documents(layer, lengths, seed=11)
    dk, dv, kd = layer.head_k_dim, layer.head_v_dim, layer.key_dim
    for r in range(2):
        qk = list(range(r * dk, (r + 1) * dk))
        vcols = list(range(2 * r * dv, (2 * r + 2) * dv))
        ch = qk + [kd + c for c in qk] + [2 * kd + c for c in vcols]
        heads = [2 * r, 2 * r + 1]
        p = params_of(layer)
        tensors = {"qkv": packed["qkv"][:, ch], "z": packed["z"][:, vcols], "b": packed["b"][:, heads],
                   "a": packed["a"][:, heads], "conv_weight": p["conv_weight"][ch], "a_log": p["a_log"][heads],
                   "dt_bias": p["dt_bias"][heads], "norm_weight": p["norm_weight"], "grad_out": grad_out[:, vcols]}
        res = run_harness(tmp_path, tensors, {"mode": "forward_backward", "dims": dims_of(layer, hk=1, hv=2),
                                              "lengths": lengths})
        assert_close(res["out"], core[:, vcols], f"rank {r} core")
        pick = {"qkv": (slice(None), ch), "z": (slice(None), vcols), "b": (slice(None), heads),
                "a": (slice(None), heads), "conv_weight": (ch,), "a_log": (heads,), "dt_bias": (heads,)}
        for name, index in pick.items():
            assert_grad(res[f"grad.{name}"], tuple(g[name][index] for g in grads), f"rank {r} grad of {name}")


def hf_final_state(layer, qkv, b, a):
    """transformers' token-by-token decode rule over one document: its final state."""
    with torch.no_grad():
        length = qkv.shape[0]
        mixed = F.silu(F.conv1d(qkv.t()[None], layer.conv1d.weight, padding=layer.conv_kernel_size - 1,
                                groups=layer.conv_dim)[..., :length]).transpose(1, 2)
        q, k, v = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
        q = q.reshape(1, length, -1, layer.head_k_dim)
        k = k.reshape(1, length, -1, layer.head_k_dim)
        v = v.reshape(1, length, -1, layer.head_v_dim)
        g = -layer.A_log.float().exp() * F.softplus(a[None].float() + layer.dt_bias)
        _, state = M.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=b[None].sigmoid(), output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    return state[0]


def test_prefill_then_single_steps_equals_one_pass(tmp_path):
    layer = make_layer(2, 4, seed=13)
    lengths, prefill = [5, 70, 130], [3, 65, 1]
    packed, core, _, _, _ = hf_documents(layer, lengths, seed=17)
    tensors = dict(packed, **params_of(layer))
    res = run_harness(tmp_path, tensors, {"mode": "decode", "dims": dims_of(layer), "lengths": lengths,
                                          "prefill": prefill})
    assert_close(res["out"], core, "decoded core output")
    start = 0
    k1 = layer.conv_kernel_size - 1
    for s, length in enumerate(lengths):
        rows = {n: packed[n][start:start + length].detach() for n in PROJ}
        window = F.pad(rows["qkv"], (0, 0, k1, 0))[-k1:]
        assert_close(res[f"state.conv.{s}"], window, f"sequence {s} conv window")
        assert_close(res[f"state.recurrent.{s}"], hf_final_state(layer, rows["qkv"], rows["b"], rows["a"]),
                     f"sequence {s} recurrent state")
        start += length


def test_lengths_that_do_not_cover_the_rows_are_refused(tmp_path):
    layer = make_layer(2, 2, seed=1)
    packed, _, _, grad_out, _ = hf_documents(layer, [10], seed=1)
    tensors = dict(packed, **params_of(layer), grad_out=grad_out)
    proc = run_harness(tmp_path, tensors, {"mode": "forward_backward", "dims": dims_of(layer), "lengths": [4, 5]},
                       expect_ok=False)
    assert proc.returncode == 1
    assert "qkv has shape [10, 96], expected [9, 96]" in proc.stderr, proc.stderr


def test_bfloat16_forward_matches_transformers(tmp_path):
    """A bf16 layer: the same casts as transformers, so only rounding-order differences
    (at most a few bf16 steps on a few elements) remain. (On the development machine the
    outputs are bitwise equal.)"""
    layer = make_layer(2, 4, seed=19).to(torch.bfloat16)
    lengths = [1, 63, 65, 130]
    gen = torch.Generator().manual_seed(23)
    cores, packed = [], {n: [] for n in PROJ}
    with torch.no_grad():
        for length in lengths:
            leaves, core, _ = _hf_pass(layer, [torch.randn(1, length, HIDDEN, generator=gen)])
            cores.append(core)
            for n in PROJ:
                packed[n].append(leaves[n][0][0])
    core = torch.cat(cores).float()
    tensors = {n: torch.cat(packed[n]).float() for n in PROJ}
    tensors.update({k: v.float() for k, v in params_of(layer).items()}, grad_out=torch.zeros_like(core))
    res = run_harness(tmp_path, tensors, {"mode": "forward_backward", "dims": dims_of(layer), "lengths": lengths,
                                          "bfloat16": "1"})
    assert torch.equal(res["out"], res["out"].bfloat16().float()), "the output is not bf16"
    diff = (res["out"] - core).abs()
    step = core.abs().clamp_min(2.0 ** -20) * 2.0 ** -7  # one bf16 step (upper bound) at each value
    assert float((diff > 2 * step).float().mean()) <= 1e-3, f"{int((diff > 2 * step).sum())} values off by > 2 steps"
    assert float(diff.max()) <= 4 * float(step.max()), f"max abs diff {float(diff.max()):.3g}"
    assert float(diff.mean()) <= 1e-3 * float(core.abs().mean()), f"mean abs diff {float(diff.mean()):.3g}"
