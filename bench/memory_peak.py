"""Peak memory of one LoRA training step at long sequence lengths.

Runs bench/train_bench (one forward_backward + optim_step, LoRA rank 32 on
attention, MLP and lm_head, one datum of T tokens, cross_entropy) in a fresh
process per run and reads the process's peak RSS (wait4). Three figures per
length:

* lathe as deployed: logprobs in chunks, flash attention, per-layer recompute
  (the defaults: --logprob_chunk_tokens 0, --recompute auto);
* the plain path: no chunks, no recompute (what lathe did before), only at
  the lengths that fit this machine (--plain-lengths);
* `lathe plan`'s estimate for the same model and length (a one-row preset
  table with the model's config), against the measured peak less the process
  baseline (libtorch, MKL and the runtime's code with a model of no size).

The model has Qwen3's vocabulary and layout at reduced width (random weights
written by transformers). With --hf-lengths, transformers + peft run the same
step (same LoRA targets, gradient checkpointing, SDPA attention, fp32, AdamW)
in a fresh Python process at those lengths, and the whole processes' peaks
are compared.

  .venv/bin/python bench/memory_peak.py [--threads 2] [--lengths 2048,8192,16384,32768] [--dtype float32|bfloat16]
      [--arch qwen3|deepseek_v3]
      [--plain-lengths 2048,4096,8192] [--hf-lengths 2048,4096]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen3_models import cached_qwen3  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024.0 * 1024.0
GiB = 1024.0 * MiB

# Qwen3's vocabulary and proportions, reduced width and depth.
SHAPE = dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, num_hidden_layers=4, tie_word_embeddings=False)
MODEL_NAME = "bench/Qwen3-memory"
ARCH = ["Qwen3ForCausalLM"]  # --arch (set from the command line)

# --arch deepseek_v3: DeepSeek-V3's latent attention and sigmoid-routed experts at
# bench width, with a small vocabulary so that the layers' activations, which
# lathe plan's latent-attention terms count, dominate the peak.
DEEPSEEK_SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                      num_attention_heads=8, num_key_value_heads=8, q_lora_rank=96, kv_lora_rank=64,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                      num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
                      num_hidden_layers=4, tie_word_embeddings=False)


def cached_model(cache):
    if ARCH[0] == "Qwen3ForCausalLM":
        return cached_qwen3(cache, "qwen3-memory", SHAPE)
    path = os.path.join(cache, "deepseek-v3-memory")
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        print(f"[bench] writing the model to {path}", flush=True)
        torch.manual_seed(0)
        config = DeepseekV3Config(**DEEPSEEK_SHAPE, rope_theta=1e4, max_position_embeddings=131072)
        DeepseekV3ForCausalLM(config).save_pretrained(path)
    return path


def shape():
    return SHAPE if ARCH[0] == "Qwen3ForCausalLM" else DEEPSEEK_SHAPE


DTYPE = ["float32"]  # --dtype of train_bench and lathe plan (set from the command line)


def run_bench(build_dir, model, tokens, threads, extra):
    """Peak RSS (bytes) and wall seconds of one train_bench process."""
    args = [os.path.join(build_dir, "bench", "train_bench"), f"--model={model}", "--lora_rank=32",
            "--max_seq_len=131072", f"--dtype={DTYPE[0]}"]
    # One datum of `tokens` tokens and one step; 0: a 2-token datum and no step (the baseline).
    rng = random.Random(tokens)
    fd, data = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"tokens": [rng.randrange(100) for _ in range(max(tokens, 2) + 1)]}) + "\n")
    args += [f"--data={data}", "--warmup=0", f"--steps={1 if tokens > 0 else 0}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args + extra, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        message = err.read().decode(errors="replace")
    os.unlink(data)
    if proc.returncode != 0:
        raise RuntimeError(f"train_bench exited {proc.returncode}: {message[-2000:]}")
    return usage.ru_maxrss * 1024, seconds


def hf_worker(model_dir, tokens, threads):
    """One LoRA step of transformers + peft with gradient checkpointing (run in a child)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if tokens == 0:
        return
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 100, (1, tokens + 1), generator=g)
    logits = peft_model(input_ids=ids[:, :-1]).logits.float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1))
    (-lp.sum()).backward()
    opt.step()


def run_hf(model_dir, tokens, threads):
    """Peak RSS (bytes) and wall seconds of one transformers + peft step in a fresh process."""
    args = [sys.executable, os.path.abspath(__file__), "--hf-worker", model_dir, str(tokens), str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        err.seek(0)
        message = err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"transformers + peft step failed: {message[-2000:]}")
    return usage.ru_maxrss * 1024, seconds


def plan_estimate(build_dir, tokens):
    """lathe plan's total (bytes) for the bench model at `tokens`, LoRA rank 32, one device."""
    row = {"base_model": MODEL_NAME, "architecture": ARCH[0], "node_count": 1, "devices_per_node": 1,
           "tp": 1, "ep": 1, "max_seq_len": tokens, "verified": True,
           "config": {k: v for k, v in shape().items()}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"presets": [row]}, f)
    out = subprocess.run([os.path.join(build_dir, "client", "lathe"), "plan", f"--model={MODEL_NAME}",
                          f"--presets={f.name}", f"--max_seq_len={tokens}", "--lora_rank=32", f"--dtype={DTYPE[0]}",
                          "--device_memory_gib=1000"], capture_output=True, text=True)
    os.unlink(f.name)
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "total":
            return float(parts[1]) * GiB
    raise RuntimeError(f"no total in lathe plan's output:\n{out.stdout}\n{out.stderr}")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--hf-worker":
        return hf_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="2048,8192,16384,32768")
    ap.add_argument("--plain-lengths", default="2048,4096,8192",
                    help="lengths at which the plain path runs too (it needs ~2 x T x 151,936 x 4 bytes)")
    ap.add_argument("--hf-lengths", default="",
                    help="lengths at which transformers + peft (gradient checkpointing) run the same step")
    ap.add_argument("--build-dir", default=os.environ.get("LATHE_BUILD_DIR", os.path.join(ROOT, "build")))
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench-models"))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="lathe's compute precision, for its runs and lathe plan's estimate")
    ap.add_argument("--arch", choices=["qwen3", "deepseek_v3"], default="qwen3",
                    help="the bench model: Qwen3 at reduced width, or DeepSeek-V3 (latent attention) at bench width")
    args = ap.parse_args()
    DTYPE[0] = args.dtype
    ARCH[0] = "Qwen3ForCausalLM" if args.arch == "qwen3" else "DeepseekV3ForCausalLM"
    model = cached_model(args.cache)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    plain_lengths = {int(x) for x in args.plain_lengths.split(",") if x}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = os.path.join(tmp, "tiny")
        subprocess.run([os.path.join(args.build_dir, "runtime", "lathe_sft"), f"--make_tiny_model={tiny}"],
                       check=True, capture_output=True)
        base, _ = run_bench(args.build_dir, tiny, 0, args.threads, [])
    print(f"process baseline (libraries, runtime, a model of no size): {base / MiB:.0f} MiB", flush=True)
    print(f"{'tokens':>7} {'lathe peak':>11} {'s':>6} {'plain peak':>11} {'s':>6} {'plain/lathe':>11} "
          f"{'plan est.':>10} {'measured':>10} {'est/meas':>8}", flush=True)
    for t in sorted(set(lengths) | plain_lengths):
        row = [f"{t:>7}"]
        lathe_peak = plain_peak = None
        if t in lengths:
            lathe_peak, secs = run_bench(args.build_dir, model, t, args.threads, [])
            row += [f"{lathe_peak / MiB:>7.0f} MiB", f"{secs:>6.1f}"]
        else:
            row += [f"{'-':>11}", f"{'-':>6}"]
        if t in plain_lengths:
            plain_peak, secs = run_bench(args.build_dir, model, t, args.threads,
                                         ["--logprob_chunk_tokens=100000000", "--recompute=off"])
            row += [f"{plain_peak / MiB:>7.0f} MiB", f"{secs:>6.1f}"]
        else:
            row += [f"{'-':>11}", f"{'-':>6}"]
        row.append(f"{plain_peak / lathe_peak:>10.2f}x" if plain_peak and lathe_peak else f"{'-':>11}")
        if lathe_peak:
            est = plan_estimate(args.build_dir, t)
            measured = lathe_peak - base
            row += [f"{est / MiB:>6.0f} MiB", f"{measured / MiB:>6.0f} MiB", f"{est / measured:>8.2f}"]
        print(" ".join(row), flush=True)
    print(f"(threads {args.threads}; model {ARCH[0]} {shape()}; LoRA rank 32; {args.dtype}; one datum per step)")
    hf_lengths = [int(x) for x in args.hf_lengths.split(",") if x]
    if hf_lengths:
        hf_base, _ = run_hf(model, 0, args.threads)
        print(f"transformers + peft, gradient checkpointing: process with the model loaded {hf_base / MiB:.0f} MiB",
              flush=True)
        print(f"{'tokens':>7} {'lathe peak':>11} {'hf peak':>11} {'s':>6} {'lathe/hf':>9}", flush=True)
        for t in hf_lengths:
            lathe_peak, _ = run_bench(args.build_dir, model, t, args.threads, [])
            hf_peak, secs = run_hf(model, t, args.threads)
            print(f"{t:>7} {lathe_peak / MiB:>7.0f} MiB {hf_peak / MiB:>7.0f} MiB {secs:>6.1f} "
                  f"{lathe_peak / hf_peak:>8.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
