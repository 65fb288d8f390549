"""Decode throughput at 1 and 16 concurrent sampling requests, next to
transformers' generate on the same model, threads and run.

lathe: a local deployment (one dp_worker rank by default), the requests
submitted at once through the service (one prompt each, one sample each,
temperature 1), tokens/s = generated tokens / wall time from the first submit
to the last answer. transformers: generate on the same prompts as one batch
(do_sample, temperature 1), timed around the call. With --in-process, lathe's
side is bench/generate_bench instead (the same requests given to
runtime::GenerateBatch at once, no service).

  .venv/bin/python bench/sample_throughput.py [--model dense|moe2|kimi|...] [--threads 2] [--max-tokens 64]
      [--concurrency 1,16] [--layout replicas=1] [--in-process] [--greedy]

With --greedy both sides decode greedily (lathe temperature 0, transformers
do_sample=False), with transformers' cache on.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402
from deployment import deployment, serving_run, stubs, wait  # noqa: E402


def prompts(count, length):
    return [[(7 + 13 * i + 31 * r) % 1000 + 1 for i in range(length)] for r in range(count)]


def hf_tokens_per_s(model_dir, batch, max_tokens, greedy=False):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if "moe" in model_dir:
        kwargs["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    ids = torch.tensor(batch)
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    if greedy:
        gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **gen)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **gen)
        seconds = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * out.shape[0] / seconds


def service_tokens_per_s(stub, pb, types, run, seq, batch, max_tokens, rounds=2):
    """Best of `rounds`: all requests submitted, then all collected."""
    best, batched = 0.0, 0
    for _ in range(rounds):
        start = time.perf_counter()
        ids = []
        for i, prompt in enumerate(batch):
            m = types.ModelInput()
            m.chunks.add().encoded_text.tokens = struct.pack(f"<{len(prompt)}i", *prompt)
            op = pb.SampleOp(prompt=m, num_samples=1,
                             params=pb.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i))
            ids.append(stub.Submit(pb.SubmitRequest(run_id=run, seq_id=next(seq), sample=op), timeout=60).op_id)
        results = [wait(stub, pb, op_id).sample for op_id in ids]
        seconds = time.perf_counter() - start
        tokens = sum(len(s.tokens) // 4 for r in results for s in r.sequences)
        if tokens / seconds > best:
            best, batched = tokens / seconds, max(r.batched_requests for r in results)
    return best, batched


def in_process_tokens_per_s(args, model, requests):
    out = subprocess.run([os.path.join(args.build_dir, "bench", "generate_bench"), f"--model={model}",
                          f"--requests={requests}", f"--max_tokens={args.max_tokens}",
                          f"--prompt_tokens={args.prompt_tokens}",
                          f"--temperature={0.0 if args.greedy else 1.0}"],
                         check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["dense", "moe2", "qwen3_5", "qwen3_5_8l", "qwen3_5_moe", "kimi"],
                    default="dense")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,16", help="comma-separated request counts")
    ap.add_argument("--layout", default="replicas=1", help="the deployment's mesh flags, e.g. replicas=2 or tp=2")
    ap.add_argument("--in-process", action="store_true", help="time generate_bench (no service) instead")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding on both sides")
    tt.add_path_args(ap)
    args = ap.parse_args()
    if args.greedy and not args.in_process:
        ap.error("--greedy needs --in-process (the service samples at the request's temperature)")
    model = tt.cached_model(args.cache, args.model)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.concurrency.split(",")]
    lathe = {}
    if args.in_process:
        lathe = {c: (in_process_tokens_per_s(args, model, c), c) for c in counts}
    else:
        layout = dict(kv.split("=") for kv in args.layout.split(","))
        os.makedirs(os.path.join(tt.ROOT, "runs"), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.join(tt.ROOT, "runs")) as tmp:
            stubs(os.path.join(tmp, "stubs"))
            with deployment(args.build_dir, model, layout, args.threads, tmp) as address:
                stub, pb, types, run = serving_run(address, lora_rank=8)
                seq = iter(range(1, 1 << 30))
                warm = prompts(1, args.prompt_tokens)
                service_tokens_per_s(stub, pb, types, run, seq, warm, 4, rounds=1)
                for c in counts:
                    lathe[c] = service_tokens_per_s(stub, pb, types, run, seq,
                                                    prompts(c, args.prompt_tokens), args.max_tokens)
    for c in counts:
        tokens_per_s, batched = lathe[c]
        hf = hf_tokens_per_s(model, prompts(c, args.prompt_tokens), args.max_tokens, args.greedy)
        what = f"{c} request(s) in-process" if args.in_process else f"{c} concurrent request(s)"
        if args.greedy:
            what += ", greedy"
        print(f"{args.model}, {what} x {args.max_tokens} tokens, {args.threads} threads: lathe {tokens_per_s:.1f} "
              f"tokens/s (largest batch {batched}) vs transformers generate {hf:.1f} tokens/s: "
              f"ratio {tokens_per_s / hf:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
