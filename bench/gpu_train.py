"""A LoRA training step on a GPU: lathe's train_bench against transformers + peft.

For each shape, writes a model with random weights (real widths, few layers), one
batch of token datums, and times forward_backward + optim_step in both: LoRA rank 32
on attention, MLP/experts and lm_head, cross_entropy summed over target tokens, AdamW.
The reference runs in bf16 with SDPA attention and gradient checkpointing, as a
transformers + peft user on a GPU would. lathe runs with --dtype bfloat16 when its
train_bench accepts the flag (it says which it ran), float32 otherwise.

Prints tokens/s and MFU of each and every ratio. MFU = tokens/s x FLOPs per token /
peak: FLOPs per token counts the forward (2 x active matmul weights + attention) and
the backward's input gradients (the same again); frozen weights get no weight
gradients and LoRA's are negligible; recompute is not counted. Peak: the GPU's dense
bf16 figure (H100/H200: 989 TFLOP/s), or --peak-tflops.

  python3 bench/gpu_train.py --build-dir build-cuda                 # on a GPU (scripts/gpu_check.sh)
  .venv/bin/python bench/gpu_train.py --device cpu --shapes tiny,tiny_moe   # the logic, on a CPU
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
import train_throughput as tt  # noqa: E402  (the transformers + peft baseline's helpers and shapes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Qwen3-8B and Qwen3-30B-A3B widths with 2 of their 36 / 48 layers; tiny ones for CPU runs.
SHAPES = {
    "qwen3_8b": dict(arch="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_hidden_layers=2,
                     tie_word_embeddings=False),
    "qwen3_30b_a3b": dict(tt.SHAPES["moe"], num_hidden_layers=2),
    "tiny": dict(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_hidden_layers=2, tie_word_embeddings=False),
    "tiny_moe": dict(arch="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                     tie_word_embeddings=False),
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
LORA_RANK = 32


def die(msg):
    print(f"gpu_train: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def flops_per_token(shape, seq_len):
    """Forward + input-gradient FLOPs of one token (see the module doc)."""
    s = {k: v for k, v in shape.items() if k != "arch"}
    h, d, layers = s["hidden_size"], s["head_dim"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    attn = h * q * 2 + h * kv * 2
    if "num_experts" in s:
        mlp = s["num_experts_per_tok"] * 3 * h * s["moe_intermediate_size"] + h * s["num_experts"]
    else:
        mlp = 3 * h * s["intermediate_size"]
    weights = layers * (attn + mlp) + h * s["vocab_size"]
    # Causal attention: QK^T and AV over (seq_len + 1) / 2 keys on average.
    scores = layers * 2 * 2 * q * (seq_len + 1) / 2
    forward = 2 * weights + scores
    return 2 * forward


def make_model(kind, out_dir, device, dtype):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    shape = dict(SHAPES[kind])
    arch = shape.pop("arch")
    torch.manual_seed(0)
    cls, cfg = (Qwen3ForCausalLM, Qwen3Config) if arch == "qwen3" else (Qwen3MoeForCausalLM, Qwen3MoeConfig)
    config = cfg(**shape, rope_theta=1e6, max_position_embeddings=8192)
    with torch.device(device):
        model = cls(config).to(dtype)
    model.save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def make_batch(lengths, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n + 1)] for n in lengths]


def lathe_dtype(train_bench, device):
    """(--dtype flag or None, name): bf16 on a GPU when train_bench takes --dtype."""
    run = subprocess.run([train_bench, "--helpfull"], capture_output=True, text=True)
    help_text = run.stdout + run.stderr
    if "--model" not in help_text:
        die(f"{train_bench} --helpfull did not list its flags (exit {run.returncode}): {help_text[-2000:]}")
    if "--dtype" not in help_text and "-dtype" not in help_text:
        return None, "float32 (this train_bench has no --dtype)"
    name = "bfloat16" if device == "cuda" else "float32"
    return f"--dtype={name}", f"{name} (--dtype accepted)"


def time_lathe(train_bench, model_dir, batch, warmup, steps, dtype_flag, threads):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for s in batch:
            f.write(json.dumps({"tokens": s}) + "\n")
    cmd = [train_bench, f"--model={model_dir}", f"--data={f.name}", f"--lora_rank={LORA_RANK}",
           f"--warmup={warmup}", f"--steps={steps}", "--recompute=on"] + ([dtype_flag] if dtype_flag else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        die(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_hf(model_dir, batch, warmup, steps, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_model, opt = tt.peft_lora(model, LORA_RANK)
    peft_model.train()
    ids, mask, labels = tt.padded_batch(batch)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = -(lp * (labels != -100)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(warmup)]
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    sync()
    first = losses[0]
    seconds = time.perf_counter() - start
    tokens = sum(len(s) - 1 for s in batch) * steps
    del peft_model, model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return tokens / seconds, first


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops, "given"
    if device != "cuda":
        return None, "no peak for a CPU"
    import torch
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{name} dense bf16"
    return None, f"unknown peak for {name} (pass --peak-tflops)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.environ.get("LATHE_BUILD_DIR", os.path.join(ROOT, "build-cuda")),
                    help="a build tree (bench/train_bench) or gpu-bundle/ (bin/train_bench)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shapes", default="qwen3_8b,qwen3_30b_a3b")
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the shape's)")
    ap.add_argument("--batch", type=int, default=0, help="datums per step (0: 8 on cuda, 2 on cpu)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per datum (0: 1024 on cuda, 32 on cpu)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each side (cpu runs)")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lathe-gpu-bench-models"))
    args = ap.parse_args()
    try:
        import torch
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        die(f"the reference needs torch, transformers and peft: {e}")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        die("--device cuda but torch sees no CUDA device (use --device cpu for the logic alone)")
    torch.set_num_threads(args.threads)
    bench = next((p for p in (os.path.join(args.build_dir, "bench", "train_bench"),
                              os.path.join(args.build_dir, "bin", "train_bench")) if os.path.isfile(p)), None)
    if bench is None:
        die(f"no train_bench under {args.build_dir} (bench/ or bin/): build it (LATHE_CUDA=1 bash scripts/build.sh)")
    dtype_flag, dtype_name = lathe_dtype(bench, device)
    hf_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch_n = args.batch or (8 if device == "cuda" else 2)
    seq_len = args.seq_len or (1024 if device == "cuda" else 32)
    peak, peak_why = peak_tflops(args, device)
    print(f"[gpu_train] device {device}; lathe dtype {dtype_name}; reference transformers+peft "
          f"{str(hf_dtype).replace('torch.', '')}, SDPA, gradient checkpointing; LoRA rank {LORA_RANK}; "
          f"batch {batch_n} x {seq_len} tokens; peak {peak or 'n/a'} TFLOP/s ({peak_why})", flush=True)
    rows = []
    for kind in [k for k in args.shapes.split(",") if k]:
        if kind not in SHAPES:
            die(f"unknown shape {kind!r}; expected one of {sorted(SHAPES)}")
        shape = dict(SHAPES[kind])
        if args.layers:
            shape["num_hidden_layers"] = args.layers
            SHAPES[kind] = shape
        model_dir = os.path.join(args.cache, f"{kind}_l{shape['num_hidden_layers']}")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            t0 = time.perf_counter()
            make_model(kind, model_dir, device, hf_dtype)
            print(f"[gpu_train] wrote {kind} to {model_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        batch = make_batch([seq_len] * batch_n, shape["vocab_size"])
        lathe = time_lathe(bench, model_dir, batch, args.warmup, args.steps, dtype_flag, args.threads)
        if lathe.get("device", device) != device:
            die(f"train_bench ran on {lathe.get('device')}, not {device}")
        hf_tps, hf_loss = time_hf(model_dir, batch, args.warmup, args.steps, device, hf_dtype)
        fpt = flops_per_token(shape, seq_len)
        mfu = (lambda tps: f"{100 * tps * fpt / (peak * 1e12):.1f}%" if peak else "n/a")
        lt = lathe["tokens_per_s"]
        rows.append((kind, lt, hf_tps))
        print(f"{kind} ({shape['num_hidden_layers']} layers): lathe {lt:.1f} tokens/s (MFU {mfu(lt)}), "
              f"transformers+peft {hf_tps:.1f} tokens/s (MFU {mfu(hf_tps)}), ratio lathe/reference "
              f"{lt / hf_tps:.2f}x; first-step loss {lathe['first_loss']:.3f} vs {hf_loss:.3f}; "
              f"{fpt / 1e9:.2f} GFLOP/token", flush=True)
    print("[gpu_train] ratios: " + ", ".join(f"{k} {a / b:.2f}x" for k, a, b in rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
