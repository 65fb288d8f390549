"""The runtime on a CUDA device against the same runtime on the CPU (itself held to
transformers/peft by the rest of this suite): a LoRA training step, a PEFT export and
seeded sampling. Marked ``gpu``; skipped, with the reason, where torch sees no CUDA device
(the CPU build's test command), and run by the CUDA build's (LATHE_CUDA=1 scripts/test.sh).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import make_tiny_models
import reference as R

KINDS = make_tiny_models.KINDS
LORA = dict(rank=4, alpha=8, seed=0, train_attn=True, train_mlp=True, train_unembed=True)
PROMPT = [3, 17, 42, 8, 99, 5]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device visible to torch (the gpu tests need the CUDA build on a GPU machine)"),
]


def vocab_of(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["vocab_size"]


def both(harness, model_dir, request):
    """The same request on the CPU and on CUDA device 0."""
    return harness(model_dir, dict(request, device="cpu")), harness(model_dir, dict(request, device="cuda"))


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_on_cuda_equals_the_cpu_step(kind, tiny_models, harness, tmp_path):
    d = tiny_models[kind]
    ad = R.random_adapter(d, LORA, seed=11)
    path = R.save_adapter(ad, str(tmp_path / "adapter.safetensors"))
    data = R.random_batch(5, vocab_of(d), lengths=(6, 13, 9))
    ops = [{"op": "forward_backward", "loss_fn": "cross_entropy", "loss_fn_config": {}, "data": data},
           {"op": "dump", "prefix": "g"}, {"op": "optim_step", "adam": {"learning_rate": 1e-3}},
           {"op": "dump", "prefix": "p"}]
    cpu, gpu = both(harness, d, {"lora": LORA, "adapter": path, "ops": ops})
    R.assert_bit_identical(gpu.params("init"), cpu.params("init"), f"{kind}: the adapter as loaded")
    for i in range(len(data)):
        torch.testing.assert_close(gpu.logprobs(0, i), cpu.logprobs(0, i), atol=1e-4, rtol=0)
    R.assert_tensors_rel_close(gpu.grads("g"), cpu.grads("g"), 1e-4, f"{kind}: grads on CUDA vs CPU")
    for name, want in cpu.params("p").items():
        torch.testing.assert_close(gpu.params("p")[name], want, atol=1e-5, rtol=0, msg=f"{kind}: {name} after a step")


def test_peft_export_on_cuda_equals_the_cpu_export(tiny_models, harness, tmp_path):
    d = tiny_models["qwen3_moe"]
    files = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"export_{device}")
        harness(d, {"lora": LORA, "device": device, "ops": [{"op": "export_peft", "dir": out, "merged": True}]})
        files[device] = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert files["cuda"].keys() == files["cpu"].keys()
    for k in files["cpu"]:
        assert torch.equal(files["cuda"][k], files["cpu"][k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_on_cuda_repeats_and_greedy_equals_the_cpu(kind, tiny_models, harness):
    d = tiny_models[kind]
    sample = {"op": "generate", "prompt": PROMPT, "num_samples": 3, "max_tokens": 10, "temperature": 1.0,
              "top_k": 50, "top_p": 0.95, "seed": 7}
    greedy = {"op": "generate", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    cpu, gpu = both(harness, d, {"lora": {"rank": 0}, "ops": [sample, sample, greedy]})
    for n in range(3):
        first = gpu.tensors[f"op0.sample{n}.tokens"].long().tolist()
        assert gpu.tensors[f"op1.sample{n}.tokens"].long().tolist() == first, "same seed on CUDA, other tokens"
        torch.testing.assert_close(gpu.tensors[f"op0.sample{n}.logprobs"][:1], cpu.tensors[f"op0.sample{n}.logprobs"][:1],
                                   atol=1e-4, rtol=0)
    assert gpu.tensors["op2.sample0.tokens"].long().tolist() == cpu.tensors["op2.sample0.tokens"].long().tolist()
