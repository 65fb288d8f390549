"""A DeepSeek-V3 model (latent attention, sigmoid-routed experts) through the service with
tensor and expert parallelism, as a plain DeepseekV3ForCausalLM folder and as the Kimi-K2.5 /
K2.6 wrapper with INT4 pack-quantized experts (dequantized on load): LoRA training steps, a
checkpoint whose resumed run repeats the straight run's next loss exactly, and greedy
sampling with the trained adapter (each rank decoding its heads from the latent cache) that
equals peft + transformers' ``generate`` on the exported sampler weights (on the exact
dequantization of the INT4 wrapper). The merged export of an adapter on the INT4 experts is
refused, naming an expert, with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from typing import NamedTuple

import numpy as np
import pytest

import latent_service as L
import service_client as sc
from checkpoint_run import Run
from service_client import batch, datum, pb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))

import make_tiny_models  # noqa: E402
import quantize_checkpoint as Q  # noqa: E402

PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]
VOCAB = 157


class Base(NamedTuple):
    served: str      # the folder the deployment loads
    reference: str   # the folder transformers loads (the exact dequantization of a quantized one)
    kimi: bool       # Kimi_K25ForConditionalGeneration, not AutoModelForCausalLM
    quantized: list  # names of the quantized weights (empty: a plain base)


@pytest.fixture(scope="module")
def deepseek_model(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("deepseek") / "deepseek_v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model("deepseek_v3", out, seed=0)
    return out


@pytest.fixture(scope="module")
def kimi_int4(deepseek_model, tmp_path_factory) -> Base:
    """The tiny model in the Kimi wrapper's hub layout (vision tower, MTP layer, untied head)
    with its routed experts INT4 pack-quantized, group 32, the config under text_config as the
    hub has it."""
    root = tmp_path_factory.mktemp("kimi")
    wrapper, q, d = str(root / "wrapper"), str(root / "int4"), str(root / "deq")
    make_tiny_models.write_kimi_layout(deepseek_model, wrapper, tie_flag=False)
    done = Q.write_int4(wrapper, q, 32, dequantized_dir=d, placement="text")
    assert done and all(".mlp.experts." in n for n in done)
    return Base(q, d, True, done)


@pytest.fixture(scope="module", params=["plain", "kimi_int4"])
def base(request, deepseek_model) -> Base:
    if request.param == "plain":
        return Base(deepseek_model, deepseek_model, False, [])
    return request.getfixturevalue("kimi_int4")


def _load(base: Base, folder: str | None = None):
    """transformers' model of ``folder`` (default: the base's reference folder)."""
    import torch
    import transformers

    cls = transformers.Kimi_K25ForConditionalGeneration if base.kimi else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Kimi wrapper's tiny vision tower is not in the checkpoint
        return cls.from_pretrained(folder or base.reference, dtype=torch.float32, attn_implementation="eager",
                                   experts_implementation="eager")


@pytest.mark.parametrize("tp,ep", [(2, 2)])
def test_train_checkpoint_resume_and_greedy_equal_peft_generate(make_deployment, base, tmp_path, tp, ep):
    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]
    d = make_deployment("deepseek", model_dir=base.served, replicas=1, ranks=4, tp=tp, ep=ep, max_runs=2,
                        worker_args=args, coordinator_args=args).start()

    def refusal(message):  # names an INT4 expert
        assert ".mlp.experts." in message, message

    def names(adapter):
        assert any(".mlp.experts." in n for n in adapter), "the adapter should cover the routed experts"
        if base.kimi:
            assert all(n.startswith(("base_model.model.model.language_model.", "base_model.model.lm_head."))
                       for n in adapter), adapter[:4]

    L.check_against_peft(d, root, L.random_batches(3, (14, 9), VOCAB), L.random_datum(5, 16, VOCAB), PROMPT,
                         lambda: _load(base), adapter_names=names,
                         merge_refusal=refusal if base.quantized else None)


def test_merged_export_of_the_int4_wrapper_keeps_its_experts_packed(make_deployment, kimi_int4, tmp_path):
    """An adapter on the full-precision modules only (attention, head) merges into the INT4
    wrapper: the packed experts, their scales and quantization_config are copied as they are,
    and the merged folder, its experts dequantized exactly, is the run's model in transformers."""
    import torch
    from safetensors.torch import load_file, save_file

    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]
    d = make_deployment("kimi_merged", model_dir=kimi_int4.served, replicas=1, ranks=4, tp=2, ep=2,
                        worker_args=args, coordinator_args=args).start()
    run = Run(d.stub, rank=8, seed=4, train_mlp=False)
    run.steps(L.random_batches(2, (14, 9), VOCAB), lr=3e-2)
    probe = L.random_datum(5, 16, VOCAB)
    lathe_lp = sc.logprobs(run.ok(forward=batch([datum(*probe)])).forward_backward)[0]
    run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="m", merged=True))

    merged_dir = os.path.join(root, run.id, "sampler_weights", "m", "merged")
    merged = load_file(os.path.join(merged_dir, "model.safetensors"))
    stored = load_file(os.path.join(kimi_int4.served, "model.safetensors"))
    assert merged.keys() == stored.keys()
    packed = [k for k in stored if k.endswith(("_packed", "_scale", "_shape"))]
    assert len(packed) == 3 * len(kimi_int4.quantized)
    for k in packed:
        assert merged[k].dtype == stored[k].dtype and torch.equal(merged[k], stored[k]), k
    attn = "language_model.model.layers.1.self_attn.q_a_proj.weight"
    assert not torch.equal(merged[attn], stored[attn]), "the adapter should be merged into the attention"
    with open(os.path.join(merged_dir, "config.json")) as f:
        assert json.load(f)["text_config"]["quantization_config"]["format"] == "pack-quantized"

    # transformers reads no INT4 wrapper: the merged tensors with the experts' exact dequantization
    deq = load_file(os.path.join(kimi_int4.reference, "model.safetensors"))
    plain = {k: v for k, v in merged.items() if k not in packed}
    plain.update({k: deq[k] for k in kimi_int4.quantized})
    folder = str(tmp_path / "merged_deq")
    os.makedirs(folder)
    shutil.copy(os.path.join(kimi_int4.reference, "config.json"), folder)
    save_file(plain, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    np.testing.assert_allclose(lathe_lp, L.logprobs(_load(kimi_int4, folder).eval(), *probe), atol=1e-4, rtol=0)
