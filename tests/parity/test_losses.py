"""Loss functions and input validation of lathe_harness.

The expected per-token losses are written out here, independently of reference.py's
``elementwise_loss``, on top of transformers' logprobs of the peft-wrapped model.
"""

from __future__ import annotations

import re

import pytest
import torch

import reference as R

LORA = dict(rank=4, alpha=8, seed=0, train_attn=True, train_mlp=True, train_unembed=True)
KINDS = ("qwen3", "qwen3_moe")
EXIT_REFUSED = 3


def _lp(ref, datum):
    tokens, inputs = R.datum_tensors(datum)
    return R.gather_logprobs(ref.logits(tokens), inputs["target_tokens"]), inputs


def _expected(case, lp, mask, x, cfg):
    """The formulas, spelled out (Tinker semantics)."""
    if case.startswith("cross_entropy"):
        el = -lp * x["weights"]
    elif case == "importance_sampling":
        el = -torch.exp(lp - x["logprobs"]) * x["advantages"]
    elif case.startswith("ppo"):
        r = torch.exp(lp - x["logprobs"])
        lo = x.get("clip_low_threshold", torch.full_like(lp, cfg.get("clip_low_threshold", 0.8)))
        hi = x.get("clip_high_threshold", torch.full_like(lp, cfg.get("clip_high_threshold", 1.2)))
        a = x["advantages"]
        el = -torch.minimum(r * a, torch.clamp(r, lo, hi) * a)
    elif case == "cispo":
        r = torch.exp(lp - x["logprobs"])
        lo, hi = cfg.get("clip_low_threshold", 0.0), cfg.get("clip_high_threshold", 4.0)
        el = -torch.clamp(r, lo, hi).detach() * lp * x["advantages"]
    elif case == "dro":
        beta = cfg.get("beta", 0.05)
        q = x["logprobs"]
        el = -(lp * x["advantages"] - 0.5 * beta * (lp - q) ** 2)
    elif case.startswith("gspo"):
        # the geometric mean of the token ratios over the marked loss tokens (1 if none),
        # as a constant, times p/sg(p) for each token's own gradient
        marked = (x["sequence_ratio_mask"] != 0) & mask
        token_ratios = torch.exp(lp.detach() - x["logprobs"])[marked]
        s = torch.prod(token_ratios) ** (1.0 / len(token_ratios)) if len(token_ratios) else torch.tensor(1.0)
        r = s * torch.exp(lp - lp.detach())
        lo = x.get("clip_low_threshold", torch.full_like(lp, cfg.get("clip_low_threshold", 0.8)))
        hi = x.get("clip_high_threshold", torch.full_like(lp, cfg.get("clip_high_threshold", 1.2)))
        a = x["advantages"]
        el = -torch.minimum(r * a, torch.clamp(r, lo, hi) * a)
    else:
        raise AssertionError(case)
    return torch.where(mask, el, torch.zeros_like(el))


# case -> (loss_fn, loss_fn_config, datum kwargs)
CASES = {
    "cross_entropy": ("cross_entropy", {}, dict(ignore_positions=(2,))),
    "cross_entropy_2d": ("cross_entropy", {}, dict(k=3)),
    "importance_sampling": ("importance_sampling", {}, {}),
    "ppo_config": ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.15}, {}),
    # per-token thresholds win over the config's
    "ppo_per_token": ("ppo", {"clip_low_threshold": 0.1, "clip_high_threshold": 10.0}, dict(per_token_clip=True)),
    "cispo": ("cispo", {}, {}),
    "dro": ("dro", {"beta": 0.3}, {}),
    "gspo": ("gspo", {}, {}),
    "gspo_config": ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}, dict(ignore_positions=(3,))),
    "gspo_per_token": ("gspo", {"clip_low_threshold": 0.1, "clip_high_threshold": 10.0}, dict(per_token_clip=True)),
    # datum 0 has no token in the ratio, datum 1 no loss token at all
    "gspo_empty": ("gspo", {}, {}),
}

# Per datum, the mean log-ratio over the marked tokens that a gspo batch is shifted to:
# one sequence ratio inside [0.8, 1.2], one above, one below.
GSPO_LOG_RATIOS = (0.01, 0.3, -0.3)


def _batch_for(case, ref, seed):
    loss_fn, cfg, kw = CASES[case]
    data = R.pick_batch(ref, seed, lengths=(6, 11, 8), loss_fn=loss_fn, **kw)
    if loss_fn != "cross_entropy":
        # sampler logprobs near the model's so ratios straddle the clip ranges
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for datum in data:
                (lp, _), _ = _lp(ref, datum)
                q = lp + 0.6 * torch.randn(lp.shape, generator=g)
                datum["loss_fn_inputs"]["logprobs"] = q.tolist()
    if loss_fn == "gspo":
        _place_sequence_ratios(ref, data, case)
    return data


def _place_sequence_ratios(ref, data, case):
    """Shift each datum's sampler logprobs so that its sequence log-ratio is
    GSPO_LOG_RATIOS[j] (the token ratios keep their spread); for "gspo_empty", empty the
    ratio mask of datum 0 and ignore every target of datum 1."""
    if case == "gspo_empty":
        data[0]["loss_fn_inputs"]["sequence_ratio_mask"] = [0.0] * len(data[0]["tokens"])
        data[1]["loss_fn_inputs"]["target_tokens"] = [R.IGNORE_INDEX] * len(data[1]["tokens"])
    with torch.no_grad():
        for j, datum in enumerate(data):
            (lp, mask), x = _lp(ref, datum)
            marked = (x["sequence_ratio_mask"] != 0) & mask
            if not bool(marked.any()):
                continue
            shift = float((lp - x["logprobs"])[marked].mean()) - GSPO_LOG_RATIOS[j]
            datum["loss_fn_inputs"]["logprobs"] = (x["logprobs"] + shift).tolist()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_loss_fn_matches_formula(kind, case, tiny_models, harness, tmp_path):
    check_loss_case(kind, case, tiny_models, harness, tmp_path)


def check_loss_case(kind, case, tiny_models, harness, tmp_path, options=None):
    """Runs CASES[case] on the harness (with the request's extra `options`) and checks the
    elementwise losses, loss:sum and LoRA gradients against the formulas on peft's logprobs."""
    d = tiny_models[kind]
    loss_fn, cfg, _ = CASES[case]
    ad = R.random_adapter(d, LORA, seed=21)
    path = R.save_adapter(ad, str(tmp_path / "adapter.safetensors"))
    ref = R.Reference(d, lora=LORA, adapter=ad)
    data = _batch_for(case, ref, seed=31 + list(CASES).index(case))

    want_el, total = [], 0.0
    for datum in data:
        (lp, mask), x = _lp(ref, datum)
        el = _expected(case, lp, mask, x, cfg)
        want_el.append(el.detach())
        total = total + el.sum()
    total.backward()
    total = float(total.detach())
    g_ref = ref.grads()
    if case == "ppo_config":  # make sure both branches of the clip are exercised
        with torch.no_grad():
            r = torch.cat([torch.exp(_lp(ref, dd)[0][0] - torch.tensor(dd["loss_fn_inputs"]["logprobs"]))
                           for dd in data])
        assert bool(((r < 0.9) | (r > 1.15)).any()) and bool(((r >= 0.9) & (r <= 1.15)).any())
    if case.startswith("gspo"):  # the masks leave tokens out of the ratio, and tokens in it
        marks = torch.cat([torch.tensor(dd["loss_fn_inputs"]["sequence_ratio_mask"]) for dd in data])
        assert bool((marks == 0).any()) and bool((marks != 0).any())

    res = harness(d, {"lora": LORA, "adapter": path, **(options or {}), "ops": [
        {"op": "forward_backward", "loss_fn": loss_fn, "loss_fn_config": cfg, "data": data},
        {"op": "dump", "prefix": "g"}]})

    scale = 0.0
    for j, want in enumerate(want_el):
        got = res.elementwise_loss(0, j)
        assert tuple(got.shape) == tuple(want.shape), f"{case} datum {j}: shape {tuple(got.shape)}"
        diff = float((got - want).abs().max())
        assert diff <= 1e-4 * max(1.0, float(want.abs().max())), f"{case} datum {j}: elementwise diff {diff:.3g}"
        scale += float(want.abs().sum())
    got_sum = res.metrics(0)["loss:sum"]
    assert abs(got_sum - total) <= 1e-4 * max(1.0, scale), f"{case}: loss:sum {got_sum} vs {total}"
    R.assert_tensors_rel_close(res.grads("g"), g_ref, 1e-4, f"{kind}/{case}: LoRA grads")


# --------------------------------------------------------------------------------------
# validation: refused requests exit 3 and say which datum / field is wrong
# --------------------------------------------------------------------------------------

BAD_DATUM = 2  # the defect sits in datum 2 so that "0"/"1" in messages cannot match by chance


def _valid(ref, loss_fn="cross_entropy"):
    return R.random_batch(77, ref.dims["vocab"], lengths=(5, 7, 6, 4), loss_fn=loss_fn)


def _corrupt(case, ref):
    """(loss_fn, loss_fn_config, data, words that stderr must contain, names datum?)."""
    vocab = ref.dims["vocab"]
    if case == "token_out_of_vocab":
        data = _valid(ref)
        data[BAD_DATUM]["tokens"][3] = vocab
        return "cross_entropy", {}, data, ["token"], True
    if case == "target_out_of_vocab":
        data = _valid(ref)
        data[BAD_DATUM]["loss_fn_inputs"]["target_tokens"][1] = vocab + 5
        return "cross_entropy", {}, data, ["target_tokens"], True
    if case == "missing_advantages":
        data = _valid(ref, "importance_sampling")
        del data[BAD_DATUM]["loss_fn_inputs"]["advantages"]
        return "importance_sampling", {}, data, ["advantages"], True
    if case == "weights_wrong_length":
        data = _valid(ref)
        data[BAD_DATUM]["loss_fn_inputs"]["weights"].pop()
        return "cross_entropy", {}, data, ["weights"], True
    if case == "unknown_loss_fn":
        return "bogus_loss", {}, _valid(ref), ["bogus_loss"], False
    if case == "unknown_config_key":
        return "ppo", {"clip_lo_threshold": 0.5}, _valid(ref, "ppo"), ["clip_lo_threshold"], False
    if case == "nan_weight":
        # JSON has no NaN: the harness must read the strings "NaN", "Infinity", "-Infinity"
        # in a float list as those values.
        data = _valid(ref)
        data[BAD_DATUM]["loss_fn_inputs"]["weights"][2] = "NaN"
        return "cross_entropy", {}, data, ["weights"], True
    if case == "inf_weight":
        data = _valid(ref)  # 1e39 overflows float32 to +inf
        data[BAD_DATUM]["loss_fn_inputs"]["weights"][0] = 1e39
        return "cross_entropy", {}, data, ["weights"], True
    if case == "gspo_missing_mask":
        data = _valid(ref, "gspo")
        del data[BAD_DATUM]["loss_fn_inputs"]["sequence_ratio_mask"]
        return "gspo", {}, data, ["sequence_ratio_mask"], True
    if case == "gspo_nan_mask":
        data = _valid(ref, "gspo")
        data[BAD_DATUM]["loss_fn_inputs"]["sequence_ratio_mask"][1] = "NaN"
        return "gspo", {}, data, ["sequence_ratio_mask"], True
    if case == "gspo_inf_logprob":
        data = _valid(ref, "gspo")
        data[BAD_DATUM]["loss_fn_inputs"]["logprobs"][0] = "-Infinity"
        return "gspo", {}, data, ["logprobs"], True
    if case == "gspo_mask_beyond_float32":
        data = _valid(ref, "gspo")  # 3.5e38 is a double but not a float32
        data[BAD_DATUM]["loss_fn_inputs"]["sequence_ratio_mask"][2] = 3.5e38
        return "gspo", {}, data, ["sequence_ratio_mask"], True
    if case == "gspo_mask_wrong_length":
        data = _valid(ref, "gspo")
        data[BAD_DATUM]["loss_fn_inputs"]["sequence_ratio_mask"].append(1.0)
        return "gspo", {}, data, ["sequence_ratio_mask"], True
    if case == "gspo_config_beyond_float32":
        return "gspo", {"clip_high_threshold": 1e39}, _valid(ref, "gspo"), ["clip_high_threshold"], False
    if case == "empty_batch":
        return "cross_entropy", {}, [], [], False
    raise AssertionError(case)


VALIDATION_CASES = ["token_out_of_vocab", "target_out_of_vocab", "missing_advantages", "weights_wrong_length",
                    "unknown_loss_fn", "unknown_config_key", "nan_weight", "inf_weight", "empty_batch",
                    "gspo_missing_mask", "gspo_nan_mask", "gspo_inf_logprob", "gspo_mask_beyond_float32",
                    "gspo_mask_wrong_length", "gspo_config_beyond_float32"]


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_invalid_request_is_refused(case, tiny_models, harness):
    d = tiny_models["qwen3"]
    ref = R.Reference(d)
    loss_fn, cfg, data, words, names_datum = _corrupt(case, ref)
    res = harness(d, {"lora": LORA, "ops": [
        {"op": "forward_backward", "loss_fn": loss_fn, "loss_fn_config": cfg, "data": data}]}, expect_rc=None)
    assert res.rc == EXIT_REFUSED, f"{case}: exit {res.rc}, expected {EXIT_REFUSED}; stderr:\n{res.stderr}"
    msg = res.stderr
    assert msg.strip(), f"{case}: refused without a message"
    for w in words:
        assert w.lower() in msg.lower(), f"{case}: stderr does not name {w!r}:\n{msg}"
    if names_datum:
        assert re.search(rf"(?<![\w.]){BAD_DATUM}(?![\w.])", msg), f"{case}: stderr does not name datum {BAD_DATUM}:\n{msg}"


@pytest.mark.parametrize("kind", KINDS)
def test_refused_op_leaves_state_untouched(kind, tiny_models, harness, tmp_path):
    """A refused forward_backward in the middle of a request changes nothing: the datum
    at fault is the last one, so a runtime that computed the first datums before
    validating would show different grads in dump "b"."""
    d = tiny_models[kind]
    ref = R.Reference(d)
    good = R.random_batch(5, ref.dims["vocab"], lengths=(6, 9))
    bad = R.random_batch(6, ref.dims["vocab"], lengths=(7, 8, 5))
    bad[2]["loss_fn_inputs"]["weights"].append(1.0)
    ops = [
        {"op": "forward_backward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": good},
        {"op": "dump", "prefix": "a"},
        {"op": "forward_backward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": bad},
        {"op": "dump", "prefix": "b"},
        {"op": "forward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": good},
    ]
    res = harness(d, {"lora": LORA, "continue_on_error": True, "ops": ops})
    assert res.error(0) is None and res.error(4) is None, f"unexpected errors: {res.meta}"
    assert res.error(2), f"op2 should record an error; metadata: {sorted(res.meta)}"
    assert "weights" in res.error(2).lower()
    assert not any(k.startswith("op2.datum") for k in res.tensors), "a refused op must not report outputs"
    R.assert_bit_identical(res.grads("b"), res.grads("a"), f"{kind}: grads after a refused op")
    R.assert_bit_identical(res.params("b"), res.params("a"), f"{kind}: params after a refused op")
    for j in range(len(good)):  # the runtime still works after the refusal
        diff = float((res.logprobs(4, j) - res.logprobs(0, j)).abs().max())
        assert diff <= 1e-6, f"forward after a refused op differs by {diff:.3g}"


# --------------------------------------------------------------------------------------
# gspo: reference.py against the formula above and the closed-form gradient; no harness
# --------------------------------------------------------------------------------------

def test_reference_gspo_matches_formula_and_gradient():
    g = torch.Generator().manual_seed(5)
    for trial in range(6):
        n = 10
        targets = torch.randint(0, 50, (n,), generator=g)
        targets[trial % n] = R.IGNORE_INDEX
        mask = targets != R.IGNORE_INDEX
        lp0 = -(torch.rand(n, generator=g) * 3 + 0.05)
        x = {"target_tokens": targets, "logprobs": lp0 + 0.4 * torch.randn(n, generator=g),
             "advantages": torch.randn(n, generator=g),
             "sequence_ratio_mask": (torch.rand(n, generator=g) < 0.5).float() * (trial != 5)}
        cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
        lps = [lp0.clone().requires_grad_(True) for _ in range(2)]
        got = R.elementwise_loss("gspo", torch.where(mask, lps[0], 0.0), mask, x, cfg)
        want = _expected("gspo", torch.where(mask, lps[1], 0.0), mask, x, cfg)
        got.sum().backward()
        want.sum().backward()
        got, want = got.detach(), want.detach()
        assert torch.isfinite(got).all() and float((got - want).abs().max()) <= 1e-6, trial
        # d loss_t / d lp_t = -s A_t where the unclipped term is the minimum, else 0
        marked = (x["sequence_ratio_mask"] != 0) & mask
        s = float(torch.exp((lp0 - x["logprobs"])[marked].mean())) if bool(marked.any()) else 1.0
        a = x["advantages"]
        unclipped = (s * a <= min(max(s, 0.9), 1.1) * a) & mask
        grad = torch.where(unclipped, -s * a, torch.zeros_like(a))
        for lp in lps:
            assert float((lp.grad - grad).abs().max()) <= 1e-5, trial
