"""Decode throughput of lathe's generation (KV cache, batched samples) next to
transformers' generate on the same model, threads and run: 1 and 16 sequences
decoded together from one prompt, sampling at temperature 1.

  .venv/bin/python bench/sample_throughput.py [--model dense|moe2] [--threads 2] [--max-tokens 64]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402


def hf_tokens_per_s(model_dir, samples, prompt_tokens, max_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if "moe" in model_dir:
        kwargs["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    prompt = torch.tensor([[7 + 13 * i for i in range(prompt_tokens)]])
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=samples, pad_token_id=0,
               eos_token_id=None)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **gen)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **gen)
        seconds = time.perf_counter() - start
    return (out.shape[1] - prompt_tokens) * out.shape[0] / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["dense", "moe2"], default="dense")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--build-dir", default=os.environ.get("LATHE_BUILD_DIR", os.path.join(tt.ROOT, "build")))
    ap.add_argument("--cache", default=os.path.join(tt.ROOT, "runs", "bench-models"))
    args = ap.parse_args()
    model = os.path.join(args.cache, args.model)
    if not os.path.exists(os.path.join(model, "config.json")):
        tt.make_model(args.model, model)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    for samples in (1, 16):
        out = subprocess.run([os.path.join(args.build_dir, "bench", "generate_bench"), f"--model={model}",
                              f"--samples={samples}", f"--max_tokens={args.max_tokens}",
                              f"--prompt_tokens={args.prompt_tokens}"],
                             check=True, capture_output=True, text=True, env=dict(os.environ))
        lathe = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
        hf = hf_tokens_per_s(model, samples, args.prompt_tokens, args.max_tokens)
        print(f"{args.model}, {samples} sequence(s) x {args.max_tokens} tokens, {args.threads} threads: "
              f"lathe {lathe:.1f} tokens/s vs transformers generate {hf:.1f} tokens/s: ratio {lathe / hf:.2f}x",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
