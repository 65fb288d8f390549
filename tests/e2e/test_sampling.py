"""Sampling through the service: the sampler's logprobs equal the trainer's forward,
seeds decide the tokens whichever replica serves them, greedy is greedy, and bad
requests are refused at submit."""

from __future__ import annotations

import struct
import time

import grpc
import numpy as np

import service_client as sc
from service_client import Retrieve, adam, batch, datum, pb, types

Code = grpc.StatusCode
PROMPT = [5, 17, 3, 42, 8, 99, 23, 61]


def _input(tokens):
    m = types.ModelInput()
    m.chunks.add().encoded_text.tokens = struct.pack(f"<{len(tokens)}i", *tokens)
    return m


def _ints(b):
    return list(struct.unpack(f"<{len(b) // 4}i", b))


def _floats(b):
    return np.frombuffer(b, dtype="<f4")


class Run:
    def __init__(self, stub):
        self.stub, self.id, self.seq = stub, sc.create_run(stub, rank=8, seed=4), 0

    def ok(self, **kw):
        self.seq += 1
        r = sc.wait(self.stub, sc.submit(self.stub, self.id, self.seq, **kw), timeout=60)
        assert r.state == Retrieve.DONE, r
        return r.result

    def sample(self, n=1, prompt_logprobs=False, policy_version=0, model_path="", base=False, current=False,
               **params):
        return self.ok(sample=self.op(n, prompt_logprobs, policy_version, model_path, base, current, **params)).sample

    @staticmethod
    def op(n=1, prompt_logprobs=False, policy_version=0, model_path="", base=False, current=False, **params):
        return pb.SampleOp(prompt=_input(PROMPT), num_samples=n, include_prompt_logprobs=prompt_logprobs,
                           policy_version=policy_version, model_path=model_path, base=base, current_weights=current,
                           params=pb.SamplingParams(**params))


def test_sampler_logprobs_equal_forward_and_seeds_decide(deployment):
    run = Run(deployment.stub)
    rng = np.random.default_rng(2)
    train = batch([datum(*sc.random_sequence(rng, n)) for n in (12, 20, 7)])
    run.ok(forward_backward=train)
    run.ok(optim_step=adam(learning_rate=1e-2))  # away from the base model

    first = run.sample(n=3, prompt_logprobs=True, max_tokens=10, seed=11, temperature=1.0, top_k=40)
    second = run.sample(n=3, max_tokens=10, seed=11, temperature=1.0, top_k=40)  # served by the other replica
    samples = [_ints(s.tokens) for s in first.sequences]
    assert [_ints(s.tokens) for s in second.sequences] == samples, "the same seed gave other tokens"
    assert len({tuple(s) for s in samples}) == 3, f"samples of one request should differ: {samples}"
    assert all(s.stop_reason == pb.LENGTH and len(_ints(s.tokens)) == 10 for s in first.sequences)

    for seq in first.sequences:
        tokens = PROMPT + _ints(seq.tokens)
        fwd = run.ok(forward=batch([datum(tokens[:-1], tokens[1:])])).forward_backward
        lp = sc.logprobs(fwd)[0]
        np.testing.assert_allclose(_floats(seq.logprobs), lp[len(PROMPT) - 1:], atol=1e-4, rtol=0)
        prompt_lp = _floats(first.prompt_logprobs)
        assert np.isnan(prompt_lp[0])
        np.testing.assert_allclose(prompt_lp[1:], lp[:len(PROMPT) - 1], atol=1e-4, rtol=0)

    topk = run.ok(sample=pb.SampleOp(prompt=_input(PROMPT), num_samples=1, topk_prompt_logprobs=5,
                                      params=pb.SamplingParams(max_tokens=1))).sample.topk_prompt_logprobs
    assert (topk.k, topk.prompt_length) == (5, len(PROMPT))
    ids, lps = np.array(_ints(topk.token_ids)).reshape(-1, 5), _floats(topk.logprobs).reshape(-1, 5)
    assert (ids[0] == 0).all() and (lps[0] == -99999).all()
    assert (np.diff(lps[1:], axis=1) <= 0).all(), "top-k logprobs should come sorted"
    prompt_lp = _floats(first.prompt_logprobs)
    for i in range(1, len(PROMPT)):  # the prompt's own token is in the top 5 exactly when it is likely enough
        if prompt_lp[i] > lps[i, -1] + 1e-4:
            assert PROMPT[i] in ids[i] and abs(lps[i][list(ids[i]).index(PROMPT[i])] - prompt_lp[i]) < 1e-4
    computed = _floats(run.ok(compute_logprobs=pb.ComputeLogprobsOp(prompt=_input(PROMPT))).compute_logprobs.logprobs)
    np.testing.assert_allclose(computed[1:], _floats(first.prompt_logprobs)[1:], atol=1e-6, rtol=0)

    greedy = [run.sample(n=2, max_tokens=6, temperature=0.0, seed=s) for s in (1, 2)]
    tokens = {tuple(_ints(seq.tokens)) for g in greedy for seq in g.sequences}
    assert len(tokens) == 1, f"greedy depends on the seed or the sample: {tokens}"
    stop = list(next(iter(tokens))[2:4])
    stopped = run.sample(max_tokens=6, temperature=0.0, stop_tokens=[_input(stop)]).sequences[0]
    assert stopped.stop_reason == pb.STOP and _ints(stopped.tokens)[-2:] == stop


def test_concurrent_requests_decode_together_and_answer_as_alone(deployment):
    run = Run(deployment.stub)
    rng = np.random.default_rng(5)
    run.ok(forward_backward=batch([datum(*sc.random_sequence(rng, n)) for n in (9, 14)]))
    run.ok(optim_step=adam(learning_rate=1e-2))
    requests = [pb.SampleOp(prompt=_input(PROMPT[: 2 + i % 6] + [i]), num_samples=1 + i % 3,
                            include_prompt_logprobs=i % 4 == 0,
                            params=pb.SamplingParams(max_tokens=3 + i, seed=100 + i,
                                                     temperature=0.0 if i % 5 == 0 else 1.0))
                for i in range(10)]
    alone = [run.ok(sample=r).sample for r in requests]
    # All submitted before any is collected: each replica finds several queued.
    ids = []
    for r in requests:
        run.seq += 1
        ids.append(sc.submit(run.stub, run.id, run.seq, sample=r))
    together = [sc.wait(run.stub, op_id, timeout=60) for op_id in ids]
    assert all(t.state == Retrieve.DONE for t in together), together
    together = [t.result.sample for t in together]
    assert max(t.batched_requests for t in together) > 1, "no two requests were decoded together"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert len(a.sequences) == len(b.sequences) == requests[i].num_samples
        for sa, sb in zip(a.sequences, b.sequences):
            # Bitwise: the batch (and the replica) changes nothing.
            assert (sa.tokens, sa.logprobs, sa.stop_reason) == (sb.tokens, sb.logprobs, sb.stop_reason), i
        assert a.prompt_logprobs == b.prompt_logprobs, i


def test_a_request_joins_a_running_decode_and_answers_first(deployment):
    run = Run(deployment.stub)
    long = pb.SampleOp(prompt=_input(PROMPT), num_samples=2,
                       params=pb.SamplingParams(max_tokens=1000, seed=1, temperature=1.0))
    short = pb.SampleOp(prompt=_input([3, 1, 4]), num_samples=1,
                        params=pb.SamplingParams(max_tokens=4, seed=2, temperature=1.0))
    # seq_ids 1 and 3 go to replica 1, seq_id 2 to replica 0.
    run.seq += 1
    long_id = sc.submit(run.stub, run.id, run.seq, sample=long)
    run.seq += 1
    other_id = sc.submit(run.stub, run.id, run.seq, sample=short)
    time.sleep(0.2)  # the long request is decoding (for seconds)
    run.seq += 1
    short_id = sc.submit(run.stub, run.id, run.seq, sample=short)
    joined = sc.wait(run.stub, short_id, timeout=60)
    assert joined.state == Retrieve.DONE, joined
    assert run.stub.Retrieve(pb.RetrieveRequest(op_id=long_id), timeout=10).state == Retrieve.PENDING, \
        "the short request should be answered while the long one still decodes"
    assert joined.result.sample.batched_requests == 2, joined.result.sample
    first = sc.wait(run.stub, long_id, timeout=120).result.sample
    assert all(len(_ints(s.tokens)) == 1000 for s in first.sequences)
    # Bitwise what it gets alone, on the other replica.
    alone = sc.wait(run.stub, other_id, timeout=60).result.sample
    assert alone.batched_requests == 1
    assert [(s.tokens, s.logprobs) for s in joined.result.sample.sequences] == \
        [(s.tokens, s.logprobs) for s in alone.sequences]


def test_bad_sampling_requests_are_refused(deployment):
    stub = deployment.stub
    run = sc.create_run(stub, rank=8, seed=4)
    good = dict(prompt=_input(PROMPT), num_samples=1)
    bad = {
        "top_p 0": dict(good, params=pb.SamplingParams(top_p=0.0)),
        "top_p 1.5": dict(good, params=pb.SamplingParams(top_p=1.5)),
        "top_k 0": dict(good, params=pb.SamplingParams(top_k=0)),
        "top_k -2": dict(good, params=pb.SamplingParams(top_k=-2)),
        "temperature -1": dict(good, params=pb.SamplingParams(temperature=-1.0)),
        "max_tokens 0": dict(good, params=pb.SamplingParams(max_tokens=0)),
        "num_samples 0": dict(good, num_samples=0),
        "empty prompt": dict(good, prompt=types.ModelInput()),
        "token outside vocabulary": dict(good, prompt=_input([1, 2, sc.VOCAB])),
        "prompt too long": dict(good, prompt=_input([1] * (sc.MAX_SEQ_LEN - 3)), params=pb.SamplingParams(max_tokens=4)),
        "empty stop sequence": dict(good, params=pb.SamplingParams(stop_tokens=[types.ModelInput()])),
    }
    for what, op in bad.items():
        req = pb.SubmitRequest(run_id=run, seq_id=1, sample=pb.SampleOp(**op))
        assert sc.rpc_error(stub.Submit, req) == Code.INVALID_ARGUMENT, what


def test_pinned_versions_checkpoints_and_base(make_deployment, tmp_path):
    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]
    # 2 replicas x tp 2: every rank gathers the vocabulary and draws the same tokens.
    d = make_deployment("pinning", max_runs=2, tp=2, ep=1, worker_args=args, coordinator_args=args).start()
    run = Run(d.stub)
    rng = np.random.default_rng(6)
    train = [batch([datum(*sc.random_sequence(rng, n)) for n in (12, 20, 7)]) for _ in range(3)]
    run.ok(forward_backward=train[0])
    run.ok(optim_step=adam(learning_rate=2e-2))
    v1 = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="v1")).save_weights_for_sampler
    assert v1.policy_version == 1
    pinned = run.sample(max_tokens=8, seed=3, policy_version=1)
    for b in train[1:]:
        run.ok(forward_backward=b)
        run.ok(optim_step=adam(learning_rate=2e-2))
    again = run.sample(max_tokens=8, seed=3, policy_version=1)
    live = run.sample(max_tokens=8, seed=3, current=True)
    by_path = run.sample(max_tokens=8, seed=3, model_path=v1.path)
    newest = run.sample(max_tokens=8, seed=3)  # unpinned: the newest published version, still 1
    for other in (again, by_path, newest):
        assert _ints(other.sequences[0].tokens) == _ints(pinned.sequences[0].tokens)
        assert other.sequences[0].logprobs == pinned.sequences[0].logprobs, "pinned weights moved"
    assert live.sequences[0].logprobs != pinned.sequences[0].logprobs, "training did not change the live weights"
    # Publishing version 2 with an unpinned request right behind it (not waited
    # for): the request follows version 2, which is the live weights of then.
    run.seq += 1
    publish = sc.submit(d.stub, run.id, run.seq, save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="v2"))
    run.seq += 1
    follows = sc.submit(d.stub, run.id, run.seq, sample=Run.op(max_tokens=8, seed=3))
    assert sc.wait(d.stub, publish, timeout=60).result.save_weights_for_sampler.policy_version == 2
    follows = sc.wait(d.stub, follows, timeout=60).result.sample
    v2 = run.sample(max_tokens=8, seed=3, policy_version=2)
    assert follows.sequences[0].logprobs == v2.sequences[0].logprobs == live.sequences[0].logprobs
    # Seeds decide, whichever replica serves (consecutive seq_ids alternate replicas).
    twice = [run.sample(n=4, max_tokens=8, seed=9, policy_version=1) for _ in range(2)]
    assert [_ints(s.tokens) for s in twice[0].sequences] == [_ints(s.tokens) for s in twice[1].sequences]
    assert len({tuple(_ints(s.tokens)) for s in twice[0].sequences}) == 4

    # The base model: an untrained run (lora_B = 0) gives exactly the adapter-off answer.
    base = run.sample(max_tokens=8, seed=3, base=True)
    fresh = Run(d.stub)
    untrained = fresh.sample(max_tokens=8, seed=3)
    assert _ints(base.sequences[0].tokens) == _ints(untrained.sequences[0].tokens)
    assert base.sequences[0].logprobs == untrained.sequences[0].logprobs

    refusals = {
        "unknown version": pb.SampleOp(prompt=_input(PROMPT), num_samples=1, policy_version=5),
        "unknown checkpoint": pb.SampleOp(prompt=_input(PROMPT), num_samples=1,
                                          model_path=f"lathe://{run.id}/sampler_weights/nope"),
        "training checkpoint path": pb.SampleOp(prompt=_input(PROMPT), num_samples=1,
                                                model_path=f"lathe://{run.id}/weights/v1"),
        "two sources": pb.SampleOp(prompt=_input(PROMPT), num_samples=1, policy_version=1, base=True),
        "pinned and current": pb.SampleOp(prompt=_input(PROMPT), num_samples=1, policy_version=1,
                                          current_weights=True),
    }
    for what, op in refusals.items():
        req = pb.SubmitRequest(run_id=run.id, seq_id=run.seq + 1, sample=op)
        assert sc.rpc_error(d.stub.Submit, req) == Code.INVALID_ARGUMENT, what

    # Re-initialised with another LoRA rank, the run cannot take version 1's weights: a clear refusal.
    run.ok(init=pb.InitOp(lora=types.LoraConfig(rank=4, seed=4)))
    run.seq += 1
    r = sc.wait(d.stub, sc.submit(d.stub, run.id, run.seq, sample=pb.SampleOp(
        prompt=_input(PROMPT), num_samples=1, policy_version=1)), timeout=60)
    assert r.state == Retrieve.FAILED and r.error.code == Code.FAILED_PRECONDITION.value[0], r
    assert run.sample(max_tokens=4, seed=3).sequences  # the run itself still samples
    d.close()

    # A fresh deployment samples from the sampler checkpoint on disk.
    d2 = make_deployment("pinning_again", worker_args=args, coordinator_args=args).start()
    later = Run(d2.stub)
    from_disk = later.sample(max_tokens=8, seed=3, model_path=v1.path)
    assert _ints(from_disk.sequences[0].tokens) == _ints(pinned.sequences[0].tokens)
    np.testing.assert_allclose(_floats(from_disk.sequences[0].logprobs), _floats(pinned.sequences[0].logprobs),
                               atol=1e-6, rtol=0)


def test_greedy_with_the_adapter_equals_transformers_peft_generate(make_deployment, tmp_path, tiny_model):
    import os

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = str(tmp_path / "ckpt")
    args = ["--checkpoint_root", root]
    d = make_deployment("greedy_peft", worker_args=args, coordinator_args=args).start()
    run = Run(d.stub)
    rng = np.random.default_rng(9)
    for _ in range(2):
        run.ok(forward_backward=batch([datum(*sc.random_sequence(rng, n)) for n in (14, 9)]))
        run.ok(optim_step=adam(learning_rate=3e-2))
    saved = run.ok(save_weights_for_sampler=pb.SaveWeightsForSamplerOp(name="g")).save_weights_for_sampler
    got = _ints(run.sample(max_tokens=12, temperature=0.0, policy_version=saved.policy_version).sequences[0].tokens)

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager")
    model = PeftModel.from_pretrained(base, os.path.join(root, run.id, "sampler_weights", "g")).eval()
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    assert got == want
    with torch.no_grad(), model.disable_adapter():
        plain = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12,
                               do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    assert plain != want, "the adapter should change the greedy continuation (train it harder)"
