"""Parity of lathe_harness under ``"dtype": "bfloat16"`` with transformers + peft in bf16.

The reference is the model loaded with ``dtype=torch.bfloat16`` (sdpa attention, transformers'
default), a LoRA adapter in fp32 (peft's ``autocast_adapter_dtype``), the loss on logits
upcast to fp32, and for full fine-tuning an fp32 master copy of every weight stepped by
torch's AdamW (Megatron's mixed precision).  The tolerances below are derived in
docs/runtime.md ("Precision"); ``LATHE_PRECISION_REPORT=1`` prints the measured errors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import make_tiny_models
import reference as R

KINDS = (make_tiny_models.KINDS + make_tiny_models.HYBRID_KINDS + make_tiny_models.MLA_KINDS
         + make_tiny_models.DSA_KINDS)
LORA = dict(rank=4, alpha=8, seed=0, train_attn=True, train_mlp=True, train_unembed=True)
KIND_SEED = {k: 100 * i for i, k in enumerate(KINDS)}
ADAM = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0)

# bf16 (unit roundoff u = 2^-8): see docs/runtime.md, "Precision".
BF16_LOGPROB_ATOL = 0.05   # per token, nats
BF16_LOSS_RTOL = 0.01      # loss:sum, relative
BF16_GRAD_RTOL = 0.05      # per tensor ||g - g_ref|| / ||g_ref||
ADAM_ATOL = 1e-6           # fp32 masters after one step, given the same gradients
# The merged bf16 model is another bf16 rounding of the trained model (each adapted weight
# rounded after the sum, where lathe adds the fp32 adapter's output to the bf16 product):
# two bf16 models of one fp32 model, each up to the bf16-vs-fp32 error (0.047) off it.
MERGED_LOGPROB_ATOL = 0.1
# Routing decisions must not hinge on rounding: the reference's k-th and (k+1)-th router
# probabilities differ by more than bf16 can move them.
MIN_ROUTING_MARGIN = 2e-3

REPORT = os.environ.get("LATHE_PRECISION_REPORT") == "1"


def fwd_bwd(data):
    return {"op": "forward_backward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": data}


def fwd(data):
    return {"op": "forward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": data}


def floats(tensors: dict) -> dict:
    return {k: v.float() for k, v in tensors.items()}


def max_logprob_diff(res, op: int, want: dict) -> float:
    worst = 0.0
    for j, lp_w in enumerate(want["logprobs"]):
        lp = res.logprobs(op, j)
        assert lp.shape == lp_w.shape
        worst = max(worst, float((lp - lp_w.float()).abs().max()))
    return worst


def max_logprob_diff_ref(got: dict, want: dict) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(got["logprobs"], want["logprobs"]))


def worst_rel(got: dict, want: dict) -> tuple[float, str]:
    """The largest per-tensor relative error over the tensors whose reference is not ~zero."""
    total = R.global_norm(want)
    worst, name = 0.0, ""
    for k, w in want.items():
        # Tensors that carry a negligible share of the gradient (an expert that got one
        # token) are compared against the whole gradient's norm instead of their own.
        e = float((got[k] - w).norm()) / max(float(w.norm()), 1e-3 * total)
        if e > worst:
            worst, name = e, k
    return worst, name


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_matches_transformers_and_peft_in_bf16(kind, mode, tiny_models, harness, tmp_path):
    d = tiny_models[kind]
    seed = KIND_SEED[kind] + (0 if mode == "lora" else 50)
    if mode == "lora":
        adapter = R.random_adapter(d, LORA, seed=seed)
        path = R.save_adapter(adapter, str(tmp_path / "adapter.safetensors"))
        ref = R.Reference(d, lora=LORA, adapter=adapter, dtype=torch.bfloat16)
        head = {"lora": LORA, "adapter": path}
        for name, p in ref.model.named_parameters():
            if ".lora_" in name:
                assert p.dtype == torch.float32, f"peft kept {name} in {p.dtype}"
    else:
        ref = R.Reference(d, dtype=torch.bfloat16)
        head = {"lora": None}
    data = R.pick_batch(ref, seed + 1, min_margin=MIN_ROUTING_MARGIN, tries=512, lengths=(6, 9, 5),
                        ignore_positions=(3,))
    after = R.pick_batch(ref, seed + 600, min_margin=MIN_ROUTING_MARGIN, tries=512, lengths=(7, 4))
    init_ref = floats(ref.params())
    want = ref.run(data)
    g_ref = floats(ref.grads())

    ops = [fwd_bwd(data), {"op": "dump", "prefix": "g"}, {"op": "optim_step", "adam": ADAM},
           {"op": "dump", "prefix": "s"}, fwd(after)]
    res = harness(d, {**head, "dtype": "bfloat16", "ops": ops})

    # Trainable values start as the reference's: the adapter as given, or each base
    # weight rounded to bf16 exactly as transformers rounds it on load.
    R.assert_bit_identical(res.params("init"), init_ref, f"{kind}/{mode}: init.param")

    lp = max_logprob_diff(res, 0, want)
    loss = abs(res.metrics(0)["loss:sum"] - want["loss_sum"]) / max(1.0, abs(want["loss_sum"]))
    grad, grad_name = worst_rel(res.grads("g"), g_ref)

    # One AdamW step on the fp32 masters: exactly torch's fp32 AdamW given lathe's gradients.
    stepped, _ = R.adamw_reference(res.params("init"), [res.grads("g")], [ADAM])
    R.assert_tensors_abs_close(res.params("s"), stepped[0], ADAM_ATOL, f"{kind}/{mode}: params after optim_step")
    # The forward after the step reads the updated weights (bf16 copies refreshed from the masters).
    ref.set_params(res.params("s"))
    want_after = ref.run(after, backward=False)
    lp_after = max_logprob_diff(res, 4, want_after)

    if REPORT:
        print(f"\n{kind}/{mode}: logprob {lp:.3g}, loss {loss:.3g}, grad {grad:.3g} ({grad_name}), "
              f"logprob after step {lp_after:.3g}")
    assert lp <= BF16_LOGPROB_ATOL, f"{kind}/{mode}: logprobs differ by {lp:.3g}"
    assert loss <= BF16_LOSS_RTOL, f"{kind}/{mode}: loss:sum differs by {loss:.3g} (relative)"
    assert grad <= BF16_GRAD_RTOL, f"{kind}/{mode}: gradient {grad_name} differs by {grad:.3g} (relative)"
    assert lp_after <= BF16_LOGPROB_ATOL, f"{kind}/{mode}: logprobs after the step differ by {lp_after:.3g}"


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"])
def test_bf16_differs_from_fp32_by_rounding_only(kind, tiny_models, harness):
    """The harness under bfloat16 really computes in bf16 (it is not the fp32 model) and
    stays as close to fp32 as the derivation says."""
    d = tiny_models[kind]
    ref32 = R.Reference(d)
    data = R.pick_batch(ref32, KIND_SEED[kind] + 7, min_margin=MIN_ROUTING_MARGIN, tries=512, lengths=(6, 9))
    want32 = ref32.run(data, backward=False)
    res = harness(d, {"lora": None, "dtype": "bfloat16", "ops": [fwd(data)]})
    diff = max_logprob_diff(res, 0, want32)
    # transformers' own bf16 error on this batch: lathe's bf16 may be no further from
    # fp32 than that plus what two bf16 implementations may differ by (BF16_LOGPROB_ATOL).
    ref_diff = max_logprob_diff_ref(R.Reference(d, dtype=torch.bfloat16).run(data, backward=False), want32)
    if REPORT:
        print(f"\n{kind}: bf16 vs fp32 logprob {diff:.3g} (transformers bf16 vs fp32 {ref_diff:.3g})")
    assert 1e-4 < diff <= ref_diff + BF16_LOGPROB_ATOL, \
        f"{kind}: bf16 vs fp32 logprobs differ by {diff:.3g} (transformers' bf16: {ref_diff:.3g})"
    if kind in make_tiny_models.KINDS:
        # The Qwen3 models' bf16 error is also bounded a priori (docs/runtime.md, "Precision");
        # the hybrids' is not (see "bf16 on the hybrids" there): only the reference bounds it.
        assert diff <= BF16_LOGPROB_ATOL * 2, f"{kind}: bf16 vs fp32 logprobs differ by {diff:.3g}"


def test_unknown_dtype_is_refused(tiny_models, harness):
    res = harness(tiny_models["qwen3"], {"lora": None, "dtype": "float16", "ops": []}, expect_rc=1)
    assert "'float16'" in res.stderr and "bfloat16" in res.stderr, res.stderr


@pytest.mark.parametrize("kind", ["qwen3_tied", "qwen3_moe_sparse"])
def test_bf16_export_adapter_in_fp32_merged_model_in_bf16(kind, tiny_models, harness, tmp_path):
    """The PEFT adapter of a bfloat16 run is fp32 (the trained values, exactly); the merged
    model is bf16 throughout, each adapted weight rounded once from W + scale·B·A, and
    transformers alone on it gives lathe's bf16 logprobs."""
    from safetensors import safe_open

    d = tiny_models[kind]
    out = str(tmp_path / "export")
    ref = R.Reference(d, lora=LORA, dtype=torch.bfloat16)
    batch = R.pick_batch(ref, KIND_SEED[kind] + 900, min_margin=MIN_ROUTING_MARGIN, tries=512, lengths=(7, 5))
    probe = R.pick_batch(ref, KIND_SEED[kind] + 950, min_margin=MIN_ROUTING_MARGIN, tries=512, lengths=(9,))
    ops = [fwd_bwd(batch), {"op": "optim_step", "adam": dict(ADAM, learning_rate=2e-2)}, {"op": "dump", "prefix": "s"},
           fwd(probe), {"op": "export_peft", "dir": out, "merged": True}]
    res = harness(d, {"lora": LORA, "dtype": "bfloat16", "ops": ops})
    trained = res.params("s")
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        adapter = {k[len("base_model.model."):]: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    R.assert_bit_identical(adapter, trained, f"{kind}: exported adapter")

    merged_dir = os.path.join(out, "merged")
    assert json.load(open(os.path.join(merged_dir, "config.json")))["torch_dtype"] == "bfloat16"
    with safe_open(os.path.join(merged_dir, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(d, "model.safetensors"), "pt") as b:
        merged = {k: f.get_tensor(k) for k in f.keys()}
        assert {v.dtype for v in merged.values()} == {torch.bfloat16}
        name = "model.layers.0.self_attn.q_proj"
        w = b.get_tensor(f"{name}.weight").float()
        a, bb = trained[f"{name}.lora_A.weight"], trained[f"{name}.lora_B.weight"]
        want = (w + (bb @ a) * (LORA["alpha"] / LORA["rank"])).to(torch.bfloat16)
        diff = float((merged[f"{name}.weight"].float() - want.float()).abs().max())
        assert diff <= float(want.float().abs().max()) * 2 ** -8, f"{kind}: merged {name} off by {diff}"
    model = R.load_hf_model(merged_dir, torch.bfloat16)
    worst = 0.0
    for j, datum in enumerate(probe):
        tokens, inputs = R.datum_tensors(datum)
        with torch.no_grad():
            lp, _ = R.gather_logprobs(model(input_ids=tokens[None, :]).logits[0].float(), inputs["target_tokens"])
        worst = max(worst, float((lp - res.logprobs(3, j)).abs().max()))
    if REPORT:
        print(f"\n{kind}: merged bf16 model vs lathe bf16 logprob {worst:.3g}")
    assert worst <= MERGED_LOGPROB_ATOL, f"{kind}: the merged bf16 model is off lathe by {worst:.3g}"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_recompute_is_bitwise_and_logprob_chunks_within_rounding(mode, tiny_models, harness):
    """Per-layer recompute runs the same bf16 operations again: logprobs and gradients are
    bitwise the plain pass's. Logprobs in chunks sum the head's bf16 gradient chunk by
    chunk: within the bf16 gradient tolerance of the plain pass."""
    d = tiny_models["qwen3_moe_sparse"]
    ref = R.Reference(d, dtype=torch.bfloat16)
    data = R.pick_batch(ref, 77, min_margin=MIN_ROUTING_MARGIN, tries=512, lengths=(9, 6, 12))
    head = {"lora": LORA if mode == "lora" else None, "dtype": "bfloat16"}
    ops = [fwd_bwd(data), {"op": "dump", "prefix": "g"}]
    plain = harness(d, {**head, "ops": ops})
    recomputed = harness(d, {**head, "recompute": "on", "ops": ops})
    chunked = harness(d, {**head, "recompute": "on", "logprob_chunk_tokens": 5, "ops": ops})
    for j in range(len(data)):
        assert torch.equal(plain.logprobs(0, j), recomputed.logprobs(0, j)), f"datum {j}"
        diff = float((plain.logprobs(0, j) - chunked.logprobs(0, j)).abs().max())
        assert diff <= BF16_LOGPROB_ATOL, f"datum {j}: chunked logprobs differ by {diff}"
    R.assert_bit_identical(recomputed.grads("g"), plain.grads("g"), f"{mode}: recomputed gradients")
    grad, name = worst_rel(chunked.grads("g"), plain.grads("g"))
    assert grad <= BF16_GRAD_RTOL, f"{mode}: chunked gradient {name} differs by {grad:.3g}"
