"""Quantized base checkpoints, dequantized on load: block FP8 (GLM-5.2-FP8, DeepSeek-V3) and
compressed-tensors pack-quantized INT4 (Kimi-K2 experts).

The tiny Qwen3 / Qwen3-MoE models are quantized by quantize_checkpoint.py exactly as the formats
define; lathe_harness runs the quantized folder, transformers the exact dequantized weights
(computed in Python, float32). Under bfloat16 lathe must give the same bits on the quantized
folder as on the dequantized one (one rounding of the exact value to bf16)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import make_tiny_models
import quantize_checkpoint as Q
import reference as R
import sharded_parity
from model_views import TextView

REL_TOL = 1e-5  # logprobs, relative to the largest reference logprob magnitude


def fwd(data):
    return {"op": "forward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": data}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_bases")
    dirs = {}
    for kind in ("qwen3", "qwen3_moe", "deepseek_v3", "glm_moe_dsa"):
        dirs[kind] = str(root / kind)
        make_tiny_models.make_model(kind, dirs[kind], seed=0)
    return dirs


def assert_matches_dequantized(harness, quant_dir: str, deq_dir: str, seed: int) -> None:
    ref = R.Reference(deq_dir)
    data = R.pick_batch(ref, seed, min_margin=1e-3, lengths=(7, 13))
    want = ref.run(data, backward=False)
    res = harness(quant_dir, {"lora": None, "ops": [fwd(data)]})
    scale = max(float(w.abs().max()) for w in want["logprobs"])
    worst = max(float((res.logprobs(0, j) - w).abs().max()) for j, w in enumerate(want["logprobs"]))
    assert worst <= REL_TOL * scale, f"logprobs off transformers on the dequantized weights by {worst:.3g}"
    bf16_q = harness(quant_dir, {"lora": None, "dtype": "bfloat16", "ops": [fwd(data)]})
    bf16_d = harness(deq_dir, {"lora": None, "dtype": "bfloat16", "ops": [fwd(data)]})
    for j in range(len(data)):
        assert torch.equal(bf16_q.logprobs(0, j), bf16_d.logprobs(0, j)), f"bf16 datum {j} differs"


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "deepseek_v3", "glm_moe_dsa"])
@pytest.mark.parametrize("block", [(32, 48), None], ids=["block32x48", "default128"])
def test_fp8_block_matches_dequantized_reference(kind, block, bases, harness, tmp_path):
    """Partial edge blocks both ways: 32 x 48 blocks cut 64 and 96 columns unevenly, and the
    default 128 x 128 blocks are all partial on these tiny matrices."""
    q, d = str(tmp_path / "fp8"), str(tmp_path / "deq")
    done = Q.write_fp8(bases[kind], q, block, dequantized_dir=d)
    assert any(".experts." in n for n in done) == (kind != "qwen3") and any("self_attn" in n for n in done)
    assert_matches_dequantized(harness, q, d, seed=11)


def test_fp8_dequantization_is_the_one_transformers_applies(bases, tmp_path):
    """transformers loads the FP8 folder itself (on CPU it dequantizes on load) into the
    same weights as the reference dequantization (blocks that divide the weights: its
    dequantizer does not take partial blocks)."""
    from transformers import AutoModelForCausalLM

    q, d = str(tmp_path / "fp8"), str(tmp_path / "deq")
    done = Q.write_fp8(bases["qwen3_moe"], q, (16, 32), dequantized_dir=d)
    model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items()}
    deq = load_file(os.path.join(d, "model.safetensors"))
    checked = 0
    for name in done:
        if ".experts." in name:
            continue  # fused in memory by transformers
        assert torch.equal(state[name].float(), deq[name]), name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_int4_pack_quantized_matches_dequantized_reference(kind, bases, harness, tmp_path):
    q, d = str(tmp_path / "int4"), str(tmp_path / "deq")
    done = Q.write_int4(bases[kind], q, 32, dequantized_dir=d)
    assert done and all((".experts." in n) == (kind == "qwen3_moe") for n in done)
    names = load_file(os.path.join(q, "model.safetensors")).keys()
    assert not any(n in names for n in done), "quantized modules must be stored packed only"
    assert_matches_dequantized(harness, q, d, seed=12)


def test_int4_dequantization_is_the_one_compressed_tensors_applies(bases, tmp_path):
    """transformers with compressed-tensors decompresses the INT4 folder (dense MLP linears:
    it does not quantize transformers' fused expert modules) into the bf16 rounding of the
    reference dequantization: compressed-tensors multiplies in the scale's dtype, bf16, where
    lathe keeps the exact product (fp32 runs) or rounds it once (bf16 runs, identical)."""
    pytest.importorskip("compressed_tensors", reason="requirements-dev.txt installs compressed-tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    q, d = str(tmp_path / "int4"), str(tmp_path / "deq")
    done = Q.write_int4(bases["qwen3"], q, 32, dequantized_dir=d)
    with warnings.catch_warnings():
        # "the model you're loading already has a quantization_config": only dequantize is taken from ours
        warnings.filterwarnings("ignore", message=r".*already has a `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    deq = load_file(os.path.join(d, "model.safetensors"))
    for name in done:
        assert torch.equal(state[name], deq[name].to(torch.bfloat16).float()), name
        assert not torch.equal(state[name], deq[name]), f"{name}: the bf16 products should round somewhere"


def _edit(dir_: str, config=None, tensors=None) -> None:
    if config is not None:
        path = os.path.join(dir_, "config.json")
        c = json.load(open(path))
        config(c)
        json.dump(c, open(path, "w"))
    if tensors is not None:
        path = os.path.join(dir_, "model.safetensors")
        t = load_file(path)
        tensors(t)
        save_file(t, path)


def _refused(harness, dir_: str, *needles: str) -> None:
    res = harness(dir_, {"lora": None, "ops": []}, expect_rc=None)
    assert res.rc != 0, "a broken quantized checkpoint was loaded"
    for n in needles:
        assert n in res.stderr, f"{n!r} not in:\n{res.stderr[-2000:]}"


FP8_NAME = "model.layers.1.mlp.down_proj"
INT4_NAME = "model.layers.0.mlp.experts.3.up_proj"


@pytest.mark.parametrize("case", ["missing_scale", "bad_scale_shape", "no_config", "unknown_method",
                                  "not_converted", "scale_on_bf16", "int4_missing_scale", "int4_zero_point",
                                  "int4_bad_group", "int4_format"])
def test_broken_quantized_checkpoints_are_refused_by_name(case, bases, harness, tmp_path):
    d = str(tmp_path / case)
    if case.startswith("int4"):
        Q.write_int4(bases["qwen3_moe"], d, 32)
    else:
        Q.write_fp8(bases["qwen3"], d, (32, 48))
    if case == "missing_scale":
        _edit(d, tensors=lambda t: t.pop(FP8_NAME + ".weight_scale_inv"))
        _refused(harness, d, FP8_NAME + ".weight", "scale", "missing")
    elif case == "bad_scale_shape":
        _edit(d, tensors=lambda t: t.update({FP8_NAME + ".weight_scale_inv": torch.ones(2, 3)}))
        _refused(harness, d, FP8_NAME + ".weight", "[2, 3]", "[2, 2]")
    elif case == "no_config":
        _edit(d, config=lambda c: c.pop("quantization_config"))
        _refused(harness, d, ".weight'", "quantization_config", "absent")
    elif case == "unknown_method":
        _edit(d, config=lambda c: c["quantization_config"].update(quant_method="gptq"))
        _refused(harness, d, "quantization_config.quant_method", "gptq")
    elif case == "not_converted":
        _edit(d, config=lambda c: c["quantization_config"].update(modules_to_not_convert=["down_proj"]))
        _refused(harness, d, "down_proj.weight'", "not converted")
    elif case == "scale_on_bf16":
        _edit(d, tensors=lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1, 1)}))
        _refused(harness, d, "model.norm.weight")
    elif case == "int4_missing_scale":
        _edit(d, tensors=lambda t: t.pop(INT4_NAME + ".weight_scale"))
        _refused(harness, d, INT4_NAME + ".weight_packed", "weight_scale")
    elif case == "int4_zero_point":
        _edit(d, tensors=lambda t: t.update({INT4_NAME + ".weight_zero_point": torch.zeros(4, 2, dtype=torch.int32)}))
        _refused(harness, d, INT4_NAME, "zero point")
    elif case == "int4_bad_group":
        _edit(d, config=lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=16))
        _refused(harness, d, ".weight_packed", "groups of 16")
    elif case == "int4_format":
        _edit(d, config=lambda c: c["quantization_config"].update(format="float-quantized"))
        _refused(harness, d, "quantization_config.format", "float-quantized")


# Sharded: each rank dequantizes only its cut (blocks and groups cut by the boundary), and the
# run must match the single process on the whole weights at the harness's tolerances.
SHARDED = [
    ("fp8", "qwen3", ["--tp", "2"]),
    ("fp8", "qwen3_moe", ["--tp", "2", "--ep", "2"]),
    ("int4", "qwen3", ["--tp", "2"]),
    ("int4", "qwen3_moe", ["--tp", "2"]),
    ("int4", "qwen3_moe", ["--tp", "2", "--ep", "2"]),
]


@pytest.mark.parametrize("fmt,kind,flags", [pytest.param(*c, id=f"{c[0]}-{c[1]}-{'_'.join(c[2][::2])}")
                                            for c in SHARDED])
def test_sharded_quantized_load_matches_one_process(fmt, kind, flags, bases, tmp_path):
    d = str(tmp_path / fmt)
    if fmt == "fp8":
        Q.write_fp8(bases[kind], d, (32, 48))
    else:
        Q.write_int4(bases[kind], d, 32)
    ranks = 1
    for f, v in zip(flags[::2], flags[1::2]):
        ranks *= int(v) if f in ("--tp", "--ep") else 1
    last = sharded_parity.run(d, ranks, flags)
    assert last.startswith("PASS: 0 failures"), last


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_merged_export_of_a_quantized_base(fmt, bases, harness, tmp_path):
    """An adapter on quantized modules cannot be merged without re-quantizing: refused, naming
    the tensor, with no merged model written. An adapter on full-precision modules only
    (attention, left unquantized by modules_to_not_convert and the int4 ignore list)
    merges, and the quantized tensors are copied as they are."""
    d = str(tmp_path / fmt)
    if fmt == "fp8":
        Q.write_fp8(bases["qwen3"], d, (32, 48), not_convert=[r".*self_attn"])
    else:
        Q.write_int4(bases["qwen3"], d, 32)
    lora_all = dict(rank=2, alpha=4, seed=0, train_attn=True, train_mlp=True, train_unembed=False)
    out = str(tmp_path / "all")
    res = harness(d, {"lora": lora_all, "ops": [{"op": "export_peft", "dir": out, "merged": True}]}, expect_rc=None)
    assert res.rc != 0 and "mlp." in res.stderr and "proj" in res.stderr and "quantized" in res.stderr, \
        res.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "merged", "model.safetensors"))
    lora_attn = dict(lora_all, train_mlp=False)
    out = str(tmp_path / "attn")
    harness(d, {"lora": lora_attn, "ops": [{"op": "export_peft", "dir": out, "merged": True}]})
    base = load_file(os.path.join(d, "model.safetensors"))
    merged = load_file(os.path.join(out, "merged", "model.safetensors"))
    assert merged.keys() == base.keys()
    quantized = [k for k in base if base[k].dtype in (torch.float8_e4m3fn, torch.int32) or "_scale" in k]
    assert quantized
    for k in quantized:
        assert merged[k].dtype == base[k].dtype and torch.equal(merged[k].view(torch.uint8), base[k].view(torch.uint8)), k
    assert json.load(open(os.path.join(out, "merged", "config.json")))["quantization_config"]["quant_method"] in (
        "fp8", "compressed-tensors")


# --------------------------------------------------------------------------------------
# The Kimi-K2.5 / K2.6 wrapper with its INT4 experts
# --------------------------------------------------------------------------------------

KIMI_LORA = dict(rank=4, alpha=8, seed=0, train_attn=True, train_mlp=True, train_unembed=True)
KIMI_EXPERT = "language_model.model.layers.1.mlp.experts.3.up_proj"


@pytest.fixture(scope="module")
def kimi(bases, tmp_path_factory):
    """The tiny DeepSeek-V3 text model in the Kimi wrapper's hub layout (vision tower, MTP
    layer, untied head) and the same text model with the wrapper's INT4 expert rounding
    applied, as a plain DeepseekV3ForCausalLM folder (the gradient reference)."""
    root = tmp_path_factory.mktemp("kimi")
    wrapper = str(root / "wrapper")
    make_tiny_models.write_kimi_layout(bases["deepseek_v3"], wrapper, tie_flag=False)
    q, d = str(root / "int4"), str(root / "deq")
    done = Q.write_int4(wrapper, q, 32, dequantized_dir=d, placement="text")
    assert done and all(n.startswith("language_model.model.layers.") and ".mlp.experts." in n for n in done)
    text = str(root / "deq_text")
    os.makedirs(text)
    with open(os.path.join(bases["deepseek_v3"], "config.json")) as f:
        config = json.load(f)
    json.dump(config, open(os.path.join(text, "config.json"), "w"))
    mtp = f"language_model.model.layers.{config['num_hidden_layers']}."
    deq = load_file(os.path.join(d, "model.safetensors"))
    save_file({k[len("language_model."):]: v for k, v in deq.items()
               if k.startswith("language_model.") and not k.startswith(mtp)},
              os.path.join(text, "model.safetensors"), metadata={"format": "pt"})
    return {"wrapper": wrapper, "int4": q, "deq": d, "deq_text": text, "done": done}


def _load_kimi(path: str):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()


def _kimi_logprobs(model, datum) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([datum["tokens"]])).logits[0].float()
    lp, _ = R.gather_logprobs(logits, torch.tensor(datum["loss_fn_inputs"]["target_tokens"]))
    return lp


@pytest.mark.parametrize("placement", ["text", "top", "both"])
def test_kimi_wrapper_int4_matches_transformers_on_the_dequantized_wrapper(placement, kimi, harness, tmp_path):
    """quantization_config under text_config (where the hub's Kimi-K2.5 / K2.6 keep it), at the
    top level, or in both places: the wrapper's packed experts are dequantized on load and
    lathe's logprobs are Kimi_K25ForConditionalGeneration's on the dequantized weights; under
    bf16 the quantized folder gives the dequantized folder's bits."""
    q = str(tmp_path / "int4")
    Q.write_int4(kimi["wrapper"], q, 32, placement=placement)
    config = json.load(open(os.path.join(q, "config.json")))
    assert ("quantization_config" in config) == (placement != "text")
    assert ("quantization_config" in config["text_config"]) == (placement != "top")
    names = load_file(os.path.join(q, "model.safetensors")).keys()
    assert not any(n in names for n in kimi["done"]), "quantized experts must be stored packed only"
    hf = _load_kimi(kimi["deq"])
    data = R.random_batch(5, 157, lengths=(7, 12))
    res = harness(q, {"lora": None, "ops": [fwd(data)]})
    for j, datum in enumerate(data):
        worst = float((res.logprobs(0, j) - _kimi_logprobs(hf, datum)).abs().max())
        assert worst <= 1e-4, f"datum {j}: logprobs off transformers by {worst:.3g}"
    bf16_q = harness(q, {"lora": None, "dtype": "bfloat16", "ops": [fwd(data)]})
    bf16_d = harness(kimi["deq"], {"lora": None, "dtype": "bfloat16", "ops": [fwd(data)]})
    for j in range(len(data)):
        assert torch.equal(bf16_q.logprobs(0, j), bf16_d.logprobs(0, j)), f"bf16 datum {j} differs"


def test_kimi_wrapper_int4_lora_grads_match_peft(kimi, harness, tmp_path):
    """LoRA on every linear (the quantized experts included) of the INT4 wrapper: lathe's
    gradients are peft's on the dequantized text model (fp32, 1e-4 relative per tensor)."""
    ad = R.random_adapter(kimi["deq_text"], KIMI_LORA, seed=7)
    # lathe names the wrapper's parameters as its checkpoint does (language_model.*)
    path = R.save_adapter({"language_model." + k: v for k, v in ad.items()}, str(tmp_path / "adapter.safetensors"))
    ref = R.Reference(kimi["deq_text"], lora=KIMI_LORA, adapter=ad)
    data = R.pick_batch(ref, 17, lengths=(6, 13, 9), ignore_positions=(3,))
    want = ref.run(data)
    g_ref = ref.grads()
    assert any(".mlp.experts." in k and float(g.norm()) > 0 for k, g in g_ref.items())
    res = harness(kimi["int4"], {"lora": KIMI_LORA, "adapter": path,
                                 "ops": [{"op": "forward_backward", "loss_fn": "cross_entropy",
                                          "loss_fn_config": {}, "data": data}, {"op": "dump", "prefix": "g"}]})
    for j, w in enumerate(want["logprobs"]):
        assert float((res.logprobs(0, j) - w).abs().max()) <= 1e-4, j
    grads = {k[len("language_model."):]: v for k, v in res.grads("g").items()}
    assert len(grads) == len(res.grads("g"))
    R.assert_tensors_rel_close(grads, g_ref, 1e-4, "INT4 Kimi wrapper: LoRA grads")


def test_kimi_wrapper_int4_lora_training_exports_what_peft_loads(kimi, harness, tmp_path):
    """Two LoRA steps on the INT4 wrapper, then export: the adapter names the wrapper's modules
    (model.language_model.*, lm_head), and peft loads it onto Kimi_K25ForConditionalGeneration
    of the dequantized wrapper to give lathe's logprobs. The merged export is refused (the
    adapter covers quantized experts), naming an expert, with nothing written."""
    from peft import PeftModel
    from safetensors import safe_open

    ops = []
    for seed in (0, 1):
        ops += [{"op": "forward_backward", "loss_fn": "cross_entropy", "data": R.random_batch(seed, 157)},
                {"op": "optim_step", "adam": {"learning_rate": 2e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}}]
    probes = [R.random_batch(60 + i, 157, lengths=(7, 13)) for i in range(4)]
    first = len(ops)
    ops += [fwd(p) for p in probes]
    out = str(tmp_path / "export")
    ops.append({"op": "export_peft", "dir": out})
    res = harness(kimi["int4"], {"lora": KIMI_LORA, "ops": ops})
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(".mlp.experts." in n for n in names)
    assert all(n.startswith(("base_model.model.model.language_model.", "base_model.model.lm_head.")) for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(_load_kimi(kimi["deq"]), out).eval()
    base = _load_kimi(kimi["deq"])
    view = TextView(base.model.language_model)
    usable = [i for i, p in enumerate(probes) if R.min_routing_margin(view, p) >= 1e-4]
    assert usable
    i = usable[0]
    moved = max(float((res.logprobs(first + i, j) - _kimi_logprobs(base, d)).abs().max())
                for j, d in enumerate(probes[i]))
    assert moved > 1e-2, "the adapter barely changes the logprobs: the comparison proves nothing"
    for j, d in enumerate(probes[i]):
        assert float((res.logprobs(first + i, j) - _kimi_logprobs(peft_model, d)).abs().max()) <= 1e-4, j
    merged = str(tmp_path / "merged")
    bad = harness(kimi["int4"], {"lora": KIMI_LORA, "ops": [{"op": "export_peft", "dir": merged, "merged": True}]},
                  expect_rc=None)
    assert bad.rc != 0 and ".mlp.experts." in bad.stderr and "quantized" in bad.stderr, bad.stderr[-2000:]
    assert not os.path.exists(os.path.join(merged, "merged", "model.safetensors"))




def _set_weights(c, **fields):
    for where in (c, c.get("text_config", {})):
        if "quantization_config" in where:
            where["quantization_config"]["config_groups"]["group_0"]["weights"].update(fields)


@pytest.mark.parametrize("case", ["bad_group", "shape_mismatch", "bits3", "missing_scale", "contradiction",
                                  "contradicting_ignore", "ignored_by_wrapper_name", "ignored_by_text_name"])
def test_hostile_kimi_wrapper_quantization_is_refused_by_name(case, kimi, harness, tmp_path):
    d = str(tmp_path / case)
    Q.write_int4(kimi["wrapper"], d, 32, placement="both" if case.startswith("contradict") else "text")
    text_field = "text_config.quantization_config"
    if case == "bad_group":
        _edit(d, config=lambda c: _set_weights(c, group_size=16))
        _refused(harness, d, ".mlp.experts.", ".weight_packed", "groups of 16", "group_size")
    elif case == "shape_mismatch":
        _edit(d, tensors=lambda t: t.update({KIMI_EXPERT + ".weight_shape": torch.tensor([32, 32])}))
        _refused(harness, d, KIMI_EXPERT, "[32, 32]")
    elif case == "bits3":
        _edit(d, config=lambda c: _set_weights(c, num_bits=3))
        _refused(harness, d, text_field + ".config_groups.group_0.weights.num_bits", "2, 4 or 8")
    elif case == "missing_scale":
        _edit(d, tensors=lambda t: t.pop(KIMI_EXPERT + ".weight_scale"))
        _refused(harness, d, KIMI_EXPERT + ".weight_packed", "weight_scale")
    elif case == "contradiction":
        _edit(d, config=lambda c: c["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]
              .update(group_size=64))
        _refused(harness, d, text_field + ".weights.group_size", "64", "32")
    elif case == "contradicting_ignore":
        _edit(d, config=lambda c: c["quantization_config"]["ignore"].pop())
        _refused(harness, d, text_field + ".ignore")
    elif case == "ignored_by_wrapper_name":
        _edit(d, config=lambda c: c["text_config"]["quantization_config"]["ignore"].append(KIMI_EXPERT))
        _refused(harness, d, KIMI_EXPERT, "not converted")
    elif case == "ignored_by_text_name":
        _edit(d, config=lambda c: c["text_config"]["quantization_config"]["ignore"]
              .append(KIMI_EXPERT[len("language_model."):]))
        _refused(harness, d, KIMI_EXPERT, "not converted")


@pytest.mark.parametrize("flags", [["--tp", "2"], ["--tp", "2", "--ep", "2"]], ids=["tp", "tp_ep"])
def test_sharded_kimi_wrapper_int4_matches_one_process(flags, kimi):
    """The INT4 wrapper sharded: each rank dequantizes its cut of the packed experts (groups of
    32 cut by tp's column split of down_proj) and the run matches the single process."""
    ranks = 1
    for f, v in zip(flags[::2], flags[1::2]):
        ranks *= int(v)
    last = sharded_parity.run(kimi["int4"], ranks, flags)
    assert last.startswith("PASS: 0 failures"), last
