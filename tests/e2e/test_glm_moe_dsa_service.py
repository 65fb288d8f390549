"""A GLM-5 model (latent attention made sparse by the DeepSeek sparse-attention indexer,
sigmoid-routed experts) through the service with tensor and expert parallelism, on documents
longer than its index_topk (8), in full precision and with a block-FP8 base as GLM-5-FP8
stores it (every linear F8_E4M3 with a scale per 32 x 48 block, blocks cut by the tp split;
dequantized on load): LoRA training steps, a checkpoint whose resumed run repeats the
straight run's next loss exactly, and greedy sampling past index_topk with the trained
adapter (each rank decoding its heads from the latent and indexer caches) that equals peft +
transformers' ``generate`` on the exported sampler weights (on the exact dequantization of
the FP8 base). The merged export of an adapter on FP8 weights is refused, naming one, with
nothing written. LoRA steps with each document split over two ranks (context parallelism)
give one rank's losses."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

import latent_service as L
from checkpoint_run import Run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))

import make_tiny_models  # noqa: E402
import quantize_checkpoint as Q  # noqa: E402

PROMPT = [5, 17, 3, 42, 8, 99, 23, 61, 7, 130]
VOCAB = 167


@pytest.fixture(scope="module")
def glm_model(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("glm") / "glm_moe_dsa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_tiny_models.make_model("glm_moe_dsa", out, seed=0)
    return out


@pytest.fixture(scope="module", params=["plain", "fp8"])
def base(request, glm_model, tmp_path_factory) -> tuple[str, str, list]:
    """(the folder the deployment loads, the folder transformers loads, the quantized weights)."""
    if request.param == "plain":
        return glm_model, glm_model, []
    root = tmp_path_factory.mktemp("glm_fp8")
    q, d = str(root / "fp8"), str(root / "deq")
    done = Q.write_fp8(glm_model, q, (32, 48), dequantized_dir=d)
    assert any(".experts." in n for n in done) and any(".indexer." in n for n in done)
    return q, d, done


def test_train_checkpoint_resume_and_greedy_equal_peft_generate(make_deployment, base, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    served, reference, quantized = base
    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]
    d = make_deployment("glm", model_dir=served, replicas=1, ranks=4, tp=2, ep=2, max_runs=2,
                        worker_args=args, coordinator_args=args).start()

    def load():
        return AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager")

    def refusal(message):  # names one of the FP8 weights
        assert "F8_E4M3" in message and any(n in message for n in quantized), message

    L.check_against_peft(d, root, L.random_batches(3, (14, 9, 21), VOCAB), L.random_datum(5, 20, VOCAB), PROMPT,
                         load, merge_refusal=refusal if quantized else None)


def test_context_parallel_training_matches_one_rank(make_deployment, glm_model):
    """dp_worker --cp 2 splits each document over two ranks (with ep 2 over them): the indexer
    selects each rank's queries' keys among the gathered keys of the whole document, so the
    LoRA steps' losses equal one rank's."""
    batches = L.random_batches(3, (14, 9, 21), VOCAB)
    losses = {}
    for name, cp, layout in (("glm_cp1", 1, dict(ranks=1, ep=1)), ("glm_cp2", 2, dict(ranks=2, ep=2))):
        d = make_deployment(name, model_dir=glm_model, replicas=1, max_runs=1, worker_args=["--cp", str(cp)],
                            **layout).start()
        losses[name] = Run(d.stub, rank=8, seed=4).steps(batches, lr=3e-2)
        d.close()
    want, got = losses["glm_cp1"], losses["glm_cp2"]
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want)), (got, want)
