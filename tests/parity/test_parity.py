"""Parity of lathe_harness (C++ runtime) with transformers / peft on tiny Qwen3 models.

Each harness test computes its reference first (reference.py), then runs the harness; the
``test_reference_*`` tests check the reference itself and need no harness.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import make_tiny_models
import reference as R

KINDS = (make_tiny_models.KINDS + make_tiny_models.HYBRID_KINDS + make_tiny_models.MLA_KINDS
         + make_tiny_models.DSA_KINDS)
MOE_KINDS = tuple(k for k in KINDS if "moe" in k or k in make_tiny_models.MLA_KINDS)
LORA = dict(rank=4, alpha=8, seed=0, train_attn=True, train_mlp=True, train_unembed=True)
KIND_SEED = {k: 100 * i for i, k in enumerate(KINDS)}

FWD_ATOL = 1e-4     # logprobs / elementwise loss
GRAD_RTOL = 1e-4    # per tensor ||g - g_ref|| / ||g_ref||
ADAM_ATOL = 1e-6    # params after optim_step
LOSS_RTOL = 1e-4


# --------------------------------------------------------------------------------------
# request helpers
# --------------------------------------------------------------------------------------

def fwd_bwd(data, loss_fn="cross_entropy", cfg=None):
    return {"op": "forward_backward", "loss_fn": loss_fn, "loss_fn_config": cfg or {}, "data": data}


def fwd(data, loss_fn="cross_entropy", cfg=None):
    return {"op": "forward", "loss_fn": loss_fn, "loss_fn_config": cfg or {}, "data": data}


def optim(**adam):
    return {"op": "optim_step", "adam": adam}


def dump(prefix):
    return {"op": "dump", "prefix": prefix}


def adapter_for(model_dir, tmp_path, seed):
    ad = R.random_adapter(model_dir, LORA, seed=seed)
    path = R.save_adapter(ad, str(tmp_path / f"adapter_{seed}.safetensors"))
    return ad, path


def reference_for(mode, model_dir, tmp_path, seed):
    """(Reference, request-head) for mode 'lora' (random adapter file) or 'full'."""
    if mode == "full":
        return R.Reference(model_dir), {"lora": None}
    ad, path = adapter_for(model_dir, tmp_path, seed)
    return R.Reference(model_dir, lora=LORA, adapter=ad), {"lora": LORA, "adapter": path}


def check_forward_outputs(res, op, want, what):
    for j, (lp_w, el_w) in enumerate(zip(want["logprobs"], want["elementwise_loss"])):
        lp = res.logprobs(op, j)
        assert tuple(lp.shape) == tuple(lp_w.shape), f"{what} datum {j}: logprobs shape {tuple(lp.shape)}"
        d = float((lp - lp_w).abs().max())
        assert d <= FWD_ATOL, f"{what} datum {j}: logprobs max abs diff {d:.3g}"
        el = res.elementwise_loss(op, j)
        assert tuple(el.shape) == tuple(el_w.shape), f"{what} datum {j}: elementwise_loss shape {tuple(el.shape)}"
        d = float((el - el_w).abs().max())
        assert d <= FWD_ATOL * max(1.0, float(el_w.abs().max())), f"{what} datum {j}: elementwise max abs diff {d:.3g}"
    check_loss_sum(res.metrics(op)["loss:sum"], want, what)


def check_loss_sum(got, want, what):
    scale = max(1.0, sum(float(e.abs().sum()) for e in want["elementwise_loss"]))
    assert abs(got - want["loss_sum"]) <= LOSS_RTOL * scale, f"{what}: loss:sum {got} vs {want['loss_sum']}"


# --------------------------------------------------------------------------------------
# 1. forward logprobs
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_forward_logprobs_match_transformers(kind, tiny_models, harness):
    d = tiny_models[kind]
    ref = R.Reference(d)
    data = R.pick_batch(ref, KIND_SEED[kind] + 1, lengths=(5, 11, 17))
    want = ref.run(data, backward=False)
    res = harness(d, {"lora": None, "ops": [fwd(data)]})
    check_forward_outputs(res, 0, want, f"{kind} forward")


# --------------------------------------------------------------------------------------
# 2. / 3. gradients (LoRA through peft, full fine-tuning through transformers autograd)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_lora_grads_match_peft(kind, tiny_models, harness, tmp_path):
    d = tiny_models[kind]
    ad, path = adapter_for(d, tmp_path, KIND_SEED[kind] + 2)
    ref = R.Reference(d, lora=LORA, adapter=ad)
    data = R.pick_batch(ref, KIND_SEED[kind] + 3, lengths=(6, 13, 9), ignore_positions=(3,))
    want = ref.run(data)
    g_ref = ref.grads()
    # every A and B gets a gradient (experts no token was routed to excepted)
    zero = [k for k, g in g_ref.items() if float(g.norm()) == 0]
    assert not [k for k in zero if ".mlp.experts." not in k], f"zero reference grads: {zero}"
    assert len(zero) <= len(g_ref) // 4, f"too many idle experts: {zero}"

    res = harness(d, {"lora": LORA, "adapter": path, "ops": [fwd_bwd(data), dump("g")]})
    R.assert_bit_identical(res.params("init"), ad, f"{kind}: init.param vs adapter file")
    check_forward_outputs(res, 0, want, f"{kind} lora forward_backward")
    R.assert_tensors_rel_close(res.grads("g"), g_ref, GRAD_RTOL, f"{kind}: LoRA grads")


@pytest.mark.parametrize("kind", KINDS)
def test_full_finetune_grads_match_transformers(kind, tiny_models, harness):
    d = tiny_models[kind]
    ref = R.Reference(d)
    data = R.pick_batch(ref, KIND_SEED[kind] + 4, lengths=(6, 13, 9), ignore_positions=(3,))
    want = ref.run(data)
    g_ref = ref.grads()

    res = harness(d, {"lora": None, "ops": [fwd_bwd(data), dump("g")]})
    # names follow the HF checkpoint (per-expert), values are the checkpoint's
    R.assert_bit_identical(res.params("init"), ref.params(), f"{kind}: init.param vs checkpoint")
    check_forward_outputs(res, 0, want, f"{kind} full forward_backward")
    R.assert_tensors_rel_close(res.grads("g"), g_ref, GRAD_RTOL, f"{kind}: full fine-tuning grads")


@pytest.mark.parametrize("kind", KINDS)
def test_grads_accumulate_and_forward_leaves_them(kind, tiny_models, harness, tmp_path):
    d = tiny_models[kind]
    ref, head = reference_for("lora", d, tmp_path, KIND_SEED[kind] + 5)
    b1 = R.pick_batch(ref, KIND_SEED[kind] + 6, lengths=(8, 5))
    b2 = R.pick_batch(ref, KIND_SEED[kind] + 7, lengths=(12,))
    ref.run(b1)
    g_a = ref.grads()
    want_fwd = ref.run(b2, backward=False)
    ref.run(b2)
    g_c = ref.grads()

    res = harness(d, dict(head, ops=[fwd_bwd(b1), dump("a"), fwd(b2), dump("b"), fwd_bwd(b2), dump("c")]))
    R.assert_tensors_rel_close(res.grads("a"), g_a, GRAD_RTOL, f"{kind}: grads after one call")
    R.assert_bit_identical(res.grads("b"), res.grads("a"), f"{kind}: forward must not touch grads")
    R.assert_bit_identical(res.params("b"), res.params("a"), f"{kind}: forward must not touch params")
    check_forward_outputs(res, 2, want_fwd, f"{kind} forward between forward_backward calls")
    R.assert_tensors_rel_close(res.grads("c"), g_c, GRAD_RTOL, f"{kind}: accumulated grads")


# --------------------------------------------------------------------------------------
# 4. AdamW
# --------------------------------------------------------------------------------------

ADAM = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.01, grad_clip_norm=0.0)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_adamw_steps_match_torch(kind, mode, tiny_models, harness, tmp_path):
    """Two steps.  The optimizer is checked by replaying torch.optim.AdamW on the harness's
    own dumped gradients (so near-zero gradient elements, where Adam's first step is
    ~lr*sign(g), cannot turn rounding noise into 1e-3 differences); the gradients
    themselves are checked against the reference separately."""
    d = tiny_models[kind]
    ref, head = reference_for(mode, d, tmp_path, KIND_SEED[kind] + 8)
    b1 = R.pick_batch(ref, KIND_SEED[kind] + 9, lengths=(7, 15, 10))
    ref.run(b1)
    g1 = ref.grads()
    ref.optim_step(ADAM)
    b2 = R.pick_batch(ref, KIND_SEED[kind] + 10, lengths=(9, 4))
    ref.run(b2)
    g2 = ref.grads()

    ops = [fwd_bwd(b1), dump("s1"), optim(**ADAM), dump("s2"), fwd_bwd(b2), dump("s3"), optim(**ADAM), dump("s4")]
    res = harness(d, dict(head, ops=ops))
    init = res.params("init")
    R.assert_bit_identical(res.params("s1"), init, f"{kind}/{mode}: forward_backward changed params")
    R.assert_tensors_rel_close(res.grads("s1"), g1, GRAD_RTOL, f"{kind}/{mode}: step-1 grads")

    want, norms = R.adamw_reference(init, [res.grads("s1"), res.grads("s3")], [ADAM, ADAM])
    R.assert_tensors_abs_close(res.params("s2"), want[0], ADAM_ATOL, f"{kind}/{mode}: params after step 1")
    zeros = {k: torch.zeros_like(v) for k, v in init.items()}
    R.assert_bit_identical(res.grads("s2"), zeros, f"{kind}/{mode}: grads must be zero after optim_step")
    R.assert_bit_identical(res.params("s3"), res.params("s2"), f"{kind}/{mode}: forward_backward changed params")
    # after one step the two trajectories may differ by rounding; allow 10x
    R.assert_tensors_rel_close(res.grads("s3"), g2, 10 * GRAD_RTOL, f"{kind}/{mode}: step-2 grads")
    R.assert_tensors_abs_close(res.params("s4"), want[1], ADAM_ATOL, f"{kind}/{mode}: params after step 2")
    for op, n in ((2, norms[0]), (6, norms[1])):
        got = R.grad_norm_metric(res.metrics(op))
        assert math.isclose(got, n, rel_tol=1e-4), f"{kind}/{mode}: op{op} grad_norm {got} vs {n}"


@pytest.mark.parametrize("kind", KINDS)
def test_adamw_grad_clipping(kind, tiny_models, harness, tmp_path):
    d = tiny_models[kind]
    ref, head = reference_for("lora", d, tmp_path, KIND_SEED[kind] + 11)
    b1 = R.pick_batch(ref, KIND_SEED[kind] + 12, lengths=(7, 15, 10))
    b2 = R.pick_batch(ref, KIND_SEED[kind] + 13, lengths=(6,))
    ref.run(b1)
    clip = 0.3 * R.global_norm(ref.grads())
    adam = dict(ADAM, grad_clip_norm=clip)

    ops = [fwd_bwd(b1), dump("s1"), optim(**adam), dump("s2"), fwd_bwd(b2), dump("s3"), optim(**adam), dump("s4")]
    res = harness(d, dict(head, ops=ops))
    init = res.params("init")
    gs = [res.grads("s1"), res.grads("s3")]
    want, norms = R.adamw_reference(init, gs, [adam, adam])
    unclipped, _ = R.adamw_reference(init, gs, [ADAM, ADAM])
    # the test must be able to tell clipping from no clipping
    assert norms[0] > clip
    sep = max(float((want[1][k] - unclipped[1][k]).abs().max()) for k in init)
    assert sep > 20 * ADAM_ATOL, f"clipping barely changes the result ({sep:.2g}); test not discriminative"

    R.assert_tensors_abs_close(res.params("s2"), want[0], ADAM_ATOL, f"{kind}: clipped step 1")
    R.assert_tensors_abs_close(res.params("s4"), want[1], ADAM_ATOL, f"{kind}: clipped step 2")
    got = R.grad_norm_metric(res.metrics(2))
    assert math.isclose(got, norms[0], rel_tol=1e-4), f"grad_norm metric {got} should be the pre-clip norm {norms[0]}"


# --------------------------------------------------------------------------------------
# 5. a short SFT run
# --------------------------------------------------------------------------------------

SFT_ADAM = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)


def _sft_batch(seed, vocab):
    data = R.random_batch(seed, vocab, lengths=(9, 16, 12), signed_weights=False)
    for datum in data:  # prompt tokens weight 0, completion weight 1
        n = len(datum["tokens"])
        datum["loss_fn_inputs"]["weights"] = [0.0] * (n // 3) + [1.0] * (n - n // 3)
    return data


def _sft_reference(model_dir, adapter, seed, steps=3, min_margin=1e-4):
    for s in range(seed, seed + 32):
        ref = R.Reference(model_dir, lora=LORA, adapter=adapter)
        data = _sft_batch(s, ref.dims["vocab"])
        losses = []
        for _ in range(steps):
            if R.min_routing_margin(ref.model, data) < min_margin:
                break
            losses.append(ref.run(data)["loss_sum"])
            ref.optim_step(SFT_ADAM)
        else:
            return data, losses
    raise AssertionError("no SFT batch with a safe routing margin along the trajectory")


@pytest.mark.parametrize("kind", KINDS)
def test_sft_three_steps_loss_trajectory(kind, tiny_models, harness, tmp_path):
    d = tiny_models[kind]
    ad, path = adapter_for(d, tmp_path, KIND_SEED[kind] + 14)
    data, losses = _sft_reference(d, ad, KIND_SEED[kind] + 15)
    assert losses[-1] < losses[0], f"reference SFT did not reduce the loss: {losses}"

    ops = []
    for _ in range(3):
        ops += [fwd_bwd(data), optim(**SFT_ADAM)]
    res = harness(d, {"lora": LORA, "adapter": path, "ops": ops})
    got = [res.metrics(2 * i)["loss:sum"] for i in range(3)]
    for i, (g, w) in enumerate(zip(got, losses)):
        assert math.isclose(g, w, rel_tol=LOSS_RTOL), f"{kind}: step {i} loss {g} vs reference {w} (all: {got} vs {losses})"


# --------------------------------------------------------------------------------------
# LoRA defaults (no adapter file)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_lora_default_init_is_identity_and_seeded(kind, tiny_models, harness):
    d = tiny_models[kind]
    ref = R.Reference(d)
    data = R.pick_batch(ref, KIND_SEED[kind] + 16, lengths=(6, 10))
    want = ref.run(data, backward=False)
    shapes = {k: tuple(v.shape) for k, v in R.Reference(d, lora=LORA).params().items()}

    res = harness(d, {"lora": LORA, "ops": [fwd(data)]})
    init = res.params("init")
    assert {k: tuple(v.shape) for k, v in init.items()} == shapes
    for k, v in init.items():
        if ".lora_B." in k:
            assert float(v.abs().max()) == 0.0, f"{k}: B must start at zero"
        else:  # kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(v.shape[1])
            assert float(v.abs().max()) <= bound * (1 + 1e-6), f"{k}: outside the kaiming bound"
            assert float(v.std()) > 0.3 * bound, f"{k}: A looks degenerate"
    check_forward_outputs(res, 0, want, f"{kind} identity LoRA forward")

    again = harness(d, {"lora": LORA, "ops": []}).params("init")
    R.assert_bit_identical(again, init, f"{kind}: same seed, same LoRA init")
    other = harness(d, {"lora": dict(LORA, seed=1), "ops": []}).params("init")
    a_keys = [k for k in init if ".lora_A." in k]
    assert any(not torch.equal(other[k], init[k]) for k in a_keys), "seed must change the LoRA init"


# --------------------------------------------------------------------------------------
# reference self-checks (no harness needed)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MOE_KINDS)
def test_reference_expert_lora_matches_per_expert_hook(kind, tiny_models):
    """PEFT's fused ParamWrapper LoRA, mapped to per-expert tensors, equals an independent
    per-expert LoRA added by replacing only the experts' forward of the plain model."""
    d = tiny_models[kind]
    ad = R.random_adapter(d, LORA, seed=7)
    ad_experts = {k: (v if ".mlp.experts." in k else torch.zeros_like(v)) for k, v in ad.items()}
    ref = R.Reference(d, lora=LORA, adapter=ad_experts)
    data = R.pick_batch(ref, 5, lengths=(9, 14))
    want = ref.run(data)
    g_peft = {k: v for k, v in ref.grads().items() if ".mlp.experts." in k}

    model = R.load_hf_model(d)
    for p in model.parameters():
        p.requires_grad_(False)
    leaves = R.install_per_expert_lora_hooks(model, ad, LORA["alpha"] / LORA["rank"])
    total = 0.0
    for datum in data:
        tokens, inputs = R.datum_tensors(datum)
        lp, mask = R.gather_logprobs(model(input_ids=tokens[None]).logits[0], inputs["target_tokens"])
        total = total + R.elementwise_loss("cross_entropy", lp, mask, inputs).sum()
    total.backward()
    assert math.isclose(float(total.detach()), want["loss_sum"], rel_tol=1e-6)
    g_hook = {k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in leaves.items()}
    R.assert_tensors_rel_close(g_hook, g_peft, 1e-5, f"{kind}: hook vs peft")


@pytest.mark.parametrize("kind", KINDS)
def test_reference_checkpoint_roundtrip_and_names(kind, tmp_path):
    out = str(tmp_path / kind)
    model = make_tiny_models.make_model(kind, out, seed=0)
    layout = make_tiny_models.checkpoint_layout(out)
    assert layout == ("per_expert" if kind in MOE_KINDS else "dense")
    saved = {k: v.value() for k, v in R._full_views(model).items()}
    R.assert_bit_identical(R.Reference(out).params(), saved, f"{kind}: save/load round trip")
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        # the router's score correction bias (DeepSeek-V3) is a buffer and GLM-5's indexer runs
        # without autograd: neither is ever trained
        on_disk = {k: f.get_tensor(k) for k in f.keys()
                   if not k.endswith(".e_score_correction_bias") and ".self_attn.indexer." not in k}
    R.assert_bit_identical(on_disk, saved, f"{kind}: lathe full-FT names are the checkpoint names")


@pytest.mark.parametrize("kind", KINDS)
def test_reference_zero_b_adapter_is_identity(kind, tiny_models):
    d = tiny_models[kind]
    ad = R.random_adapter(d, LORA, seed=3)
    ad = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in ad.items()}
    base, lora = R.Reference(d), R.Reference(d, lora=LORA, adapter=ad)
    tokens = torch.randint(0, base.dims["vocab"], (11,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base.logits(tokens), lora.logits(tokens))
