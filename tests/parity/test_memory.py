"""The memory-saving paths of lathe_harness against transformers / peft and against lathe's
plain path: logprobs and losses computed in chunks of rows (``logprob_chunk_tokens``) and
decoder layers recomputed in the backward (``recompute``).

Chunks of a few tokens on the tiny models cut through datums and through packed
micro-batches, so every loss sees chunk boundaries inside its datums.
"""

from __future__ import annotations

import pytest

import reference as R
import test_losses as L
import test_parity as P

CHUNKED = {"logprob_chunk_tokens": 4}
RECOMPUTED = {"logprob_chunk_tokens": 4, "recompute": "on"}


@pytest.mark.parametrize("options", (CHUNKED, RECOMPUTED), ids=("chunked", "recomputed"))
@pytest.mark.parametrize("case", list(L.CASES))
@pytest.mark.parametrize("kind", L.KINDS)
def test_memory_modes_match_loss_formulas(kind, case, options, tiny_models, harness, tmp_path):
    L.check_loss_case(kind, case, tiny_models, harness, tmp_path, options)


def _ops(data):
    return [P.fwd(data), P.fwd_bwd(data), P.dump("g")]


def _compare_runs(got, want, what, rtol):
    for j in range(3):
        for out in ("logprobs", "elementwise_loss"):
            for op in (0, 1):
                a, b = getattr(got, out)(op, j), getattr(want, out)(op, j)
                assert tuple(a.shape) == tuple(b.shape), f"{what}: op {op} datum {j} {out} shape"
                d = float((a - b).abs().max())
                assert d <= rtol * max(1.0, float(b.abs().max())), f"{what}: op {op} datum {j} {out} diff {d:.3g}"
    R.assert_tensors_rel_close(got.grads("g"), want.grads("g"), rtol, f"{what}: grads")


@pytest.mark.parametrize("mode", ("lora", "full"))
@pytest.mark.parametrize("kind", ("qwen3", "qwen3_tied"))
def test_chunked_matches_transformers_and_plain_path(kind, mode, tiny_models, harness, tmp_path):
    """Tied and untied heads, LoRA (lm_head adapter included) and full fine-tuning (the
    embedding's gradient comes from the lookup and, tied, from every chunk of the head)."""
    d = tiny_models[kind]
    ref, head = P.reference_for(mode, d, tmp_path, P.KIND_SEED[kind] + 7)
    data = R.pick_batch(ref, P.KIND_SEED[kind] + 8, lengths=(6, 13, 9), ignore_positions=(3,))
    want = ref.run(data)
    g_ref = ref.grads()
    chunked = harness(d, {**head, **CHUNKED, "ops": _ops(data)})
    P.check_forward_outputs(chunked, 0, want, f"{kind}/{mode} chunked forward")
    P.check_forward_outputs(chunked, 1, want, f"{kind}/{mode} chunked forward_backward")
    R.assert_tensors_rel_close(chunked.grads("g"), g_ref, P.GRAD_RTOL, f"{kind}/{mode}: chunked grads")
    # Against the plain path: the same products on fewer rows, gradients summed per chunk.
    plain = harness(d, {**head, "ops": _ops(data)})
    _compare_runs(chunked, plain, f"{kind}/{mode} chunked vs plain", 1e-5)



def test_chunked_head_only_adapter_matches_peft(tiny_models, harness, tmp_path):
    """Only lm_head carries an adapter: the hidden states need no gradient, the head's
    chunks still do."""
    d = tiny_models["qwen3"]
    lora = dict(P.LORA, train_attn=False, train_mlp=False)
    ad = R.random_adapter(d, lora, seed=11)
    path = R.save_adapter(ad, str(tmp_path / "adapter.safetensors"))
    ref = R.Reference(d, lora=lora, adapter=ad)
    data = R.pick_batch(ref, 12, lengths=(6, 13, 9))
    want = ref.run(data)
    res = harness(d, {"lora": lora, "adapter": path, **CHUNKED, "ops": [P.fwd_bwd(data), P.dump("g")]})
    P.check_forward_outputs(res, 0, want, "head-only chunked")
    assert set(res.grads("g")) == set(ref.grads()), "head-only adapter: other tensors trained"
    R.assert_tensors_rel_close(res.grads("g"), ref.grads(), P.GRAD_RTOL, "head-only chunked grads")


@pytest.mark.parametrize("mode", ("lora", "full"))
@pytest.mark.parametrize("kind", ("qwen3_tied", "qwen3_moe_sparse"))
def test_recompute_is_bitwise_the_plain_pass(kind, mode, tiny_models, harness, tmp_path):
    """The recomputed layers repeat the first forward's operations on the same inputs and
    every gradient sums the same terms in the same order: identical bits, not just close."""
    d = tiny_models[kind]
    ref, head = P.reference_for(mode, d, tmp_path, P.KIND_SEED[kind] + 9)
    data = R.pick_batch(ref, P.KIND_SEED[kind] + 10, lengths=(6, 13, 9), ignore_positions=(3,))
    want = ref.run(data)
    recomputed = harness(d, {**head, **RECOMPUTED, "ops": _ops(data)})
    P.check_forward_outputs(recomputed, 1, want, f"{kind}/{mode} recomputed forward_backward")
    R.assert_tensors_rel_close(recomputed.grads("g"), ref.grads(), P.GRAD_RTOL, f"{kind}/{mode}: recomputed grads")
    plain = harness(d, {**head, **CHUNKED, "recompute": "off", "ops": _ops(data)})
    _compare_runs(recomputed, plain, f"{kind}/{mode} recomputed vs plain", 0.0)
    assert recomputed.metrics(1) == plain.metrics(1)
