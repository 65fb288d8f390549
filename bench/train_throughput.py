"""forward_backward + optim_step throughput: lathe vs transformers + peft.

Builds two models with real Qwen3 widths and few layers (random weights,
written by transformers itself), one batch of token datums, and times the
same work in both: LoRA rank 32 on attention, MLP/experts and lm_head,
cross_entropy summed over target tokens, AdamW. Prints tokens/s of each and
the ratio. Both run in this process's thread budget (--threads).

  .venv/bin/python bench/train_throughput.py [--threads 2] [--model dense|moe|both|kimi|...]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Real widths (Qwen3-0.6B for dense, Qwen3-30B-A3B for MoE), few layers.
SHAPES = {
    "dense": dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_hidden_layers=2,
                  tie_word_embeddings=True),
    "moe": dict(arch="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=1,
                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                tie_word_embeddings=False),
}
# The same MoE widths with two MoE layers, where the experts weigh more
# against the vocabulary projection.
SHAPES["moe2"] = dict(SHAPES["moe"], num_hidden_layers=2)
# Qwen3.5-0.8B widths (hybrid: 3 Gated DeltaNet layers, then one gated-attention layer),
# 4 of its 24 layers; the MoE variant has Qwen3.5-35B-A3B's attention and expert widths
# with 64 of its 256 experts (so that both copies of the model fit in memory).
_QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                 "mrope_section": [11, 11, 10], "mrope_interleaved": True}
SHAPES["qwen3_5"] = dict(arch="qwen3_5", vocab_size=248320, hidden_size=1024, intermediate_size=3584,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                         linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_conv_kernel_dim=4, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, rope_parameters=_QWEN3_5_ROPE)
SHAPES["qwen3_5_8l"] = dict(SHAPES["qwen3_5"], num_hidden_layers=8)
SHAPES["qwen3_5_moe"] = dict(arch="qwen3_5_moe", vocab_size=248320, hidden_size=2048, num_hidden_layers=4,
                             num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                             linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                             linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=64,
                             num_experts_per_tok=8, moe_intermediate_size=512,
                             shared_expert_intermediate_size=512, tie_word_embeddings=False,
                             rms_norm_eps=1e-6, rope_parameters=_QWEN3_5_ROPE)

# Kimi-K2.6 / K2.7-Code's text model (DeepSeek-V3 architecture) at its real widths: hidden
# 7168, 64 heads, MLA q_lora 1536 / kv_lora 512, nope 128 + rope 64, v 128, dense MLP 18432,
# expert MLP 2048, top-8 routing in one group with one shared expert, yarn x64 rope. Reduced
# to fit two cores and 24 GiB: 2 of its 61 layers (the dense first layer and one MoE layer),
# 16 of its 384 routed experts, and a vocabulary of 32,768 instead of 163,840 (1.8 B
# parameters, 7.3 GB in fp32).
_KIMI_ROPE = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 64.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
SHAPES["kimi"] = dict(arch="deepseek_v3", vocab_size=32768, hidden_size=7168, intermediate_size=18432,
                      moe_intermediate_size=2048, num_hidden_layers=2, first_k_dense_replace=1,
                      num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16,
                      num_experts_per_tok=8, n_group=1, topk_group=1, n_shared_experts=1, norm_topk_prob=True,
                      routed_scaling_factor=2.827, rope_interleave=True, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, rope_parameters=_KIMI_ROPE)


def add_path_args(ap):
    """--build-dir and --cache (bench models), as every benchmark takes them."""
    ap.add_argument("--build-dir", default=os.environ.get("LATHE_BUILD_DIR", os.path.join(ROOT, "build")))
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench-models"))


def cached_model(cache, kind):
    """The folder of bench model `kind` under `cache`, written on first use."""
    path = os.path.join(cache, kind)
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"[bench] writing {kind} model to {path}", flush=True)
        make_model(kind, path)
    return path


def make_model(kind, out_dir):
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    shape = dict(SHAPES[kind])
    arch = shape.pop("arch")
    torch.manual_seed(0)
    if arch in ("qwen3_5", "qwen3_5_moe"):
        moe = arch == "qwen3_5_moe"
        config_cls = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
        model_cls = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
        config = config_cls(**shape, max_position_embeddings=8192, use_cache=False, bos_token_id=None,
                            eos_token_id=None, pad_token_id=None)
        model = model_cls(config)
    elif arch == "deepseek_v3":
        config = transformers.DeepseekV3Config(**shape, max_position_embeddings=8192, use_cache=False,
                                               bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                               attention_bias=False, output_router_logits=False)
        model = transformers.DeepseekV3ForCausalLM(config)
    elif arch == "qwen3":
        config = Qwen3Config(**shape, rope_theta=1e6, max_position_embeddings=4096)
        model = Qwen3ForCausalLM(config)
    else:
        config = Qwen3MoeConfig(**shape, rope_theta=1e6, max_position_embeddings=4096)
        model = Qwen3MoeForCausalLM(config)
    model.save_pretrained(out_dir)
    return out_dir


def make_batch(lengths, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n + 1)] for n in lengths]


def peft_lora(model, rank):
    """peft's LoRA of `rank` on every linear layer lathe trains (the experts through
    target_parameters in a MoE model) and AdamW over its parameters."""
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    extra = {}
    model_type = model.config.model_type
    if model_type in ("qwen3_moe", "qwen3_5_moe_text"):
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]
        extra["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    if model_type == "deepseek_v3":
        # lathe's MLA targets (q_a_proj, kv_a_proj_with_mqa, o_proj; not the up-projections
        # q_b_proj / kv_b_proj), the dense and shared MLPs, lm_head, and the routed experts, whose
        # fused gate_up takes rank 2r: lathe's two rank-r adapters on gate and up.
        targets = ["q_a_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        extra["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        extra["rank_pattern"] = {r".*\.gate_up_proj": 2 * rank}
        extra["alpha_pattern"] = {r".*\.gate_up_proj": 2 * 32}
    if model_type.startswith("qwen3_5"):
        # Gated DeltaNet projections; lathe trains in_proj_qkv as three rank-r adapters
        # (q, k, v rows), which is one rank-3r LoRA on the fused projection.
        targets += ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
        extra["rank_pattern"] = {r".*\.in_proj_qkv": 3 * rank}
        extra["alpha_pattern"] = {r".*\.in_proj_qkv": 3 * 32}
        if model_type == "qwen3_5_moe_text":
            targets += ["gate_proj", "up_proj", "down_proj", "shared_expert_gate"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0,
                                                  target_modules=targets, **extra))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


def padded_batch(batch):
    """Input ids, attention mask and labels (-100 on padding) of token sequences, right-padded
    as transformers' collators do; each sequence predicts its own next tokens."""
    longest = max(len(s) - 1 for s in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s) - 1
        ids[i, :n] = torch.tensor(s[:-1])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(s[1:])
    return ids, mask, labels


def hf_step_fn(model_dir, batch, rank, dtype="float32"):
    """transformers + peft doing one forward_backward + optim_step (bfloat16: the model in
    bf16, peft's adapters in fp32 as its autocast_adapter_dtype keeps them)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    peft_model, opt = peft_lora(model, rank)
    ids, mask, labels = padded_batch(batch)

    def step():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = -(lp * (labels != -100)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def time_hf(model_dir, batch, rank, warmup, steps, dtype="float32"):
    step = hf_step_fn(model_dir, batch, rank, dtype)
    first = None
    for _ in range(warmup):
        first = step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    tokens = sum(len(s) - 1 for s in batch) * steps
    return tokens / seconds, first


def time_lathe(model_dir, batch, rank, warmup, steps, build_dir, threads, dtype="float32"):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for s in batch:
            f.write(json.dumps({"tokens": s}) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([os.path.join(build_dir, "bench", "train_bench"), f"--model={model_dir}",
                          f"--data={f.name}", f"--lora_rank={rank}", f"--warmup={warmup}",
                          f"--steps={steps}", f"--dtype={dtype}"], env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens_per_s"], result["first_loss"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=["dense", "moe", "moe2", "both", "qwen3_5", "qwen3_5_8l", "qwen3_5_moe",
                                        "kimi"],
                    default="both")
    ap.add_argument("--lengths", default="64,96,128,160,192,224,256,288",
                    help="datum lengths of the batch (tokens)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="both sides' compute precision")
    add_path_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    kinds = ["dense", "moe"] if args.model == "both" else [args.model]
    for kind in kinds:
        model_dir = cached_model(args.cache, kind)
        batch = make_batch(lengths, SHAPES[kind]["vocab_size"])
        lathe_tps, lathe_loss = time_lathe(model_dir, batch, args.rank, args.warmup, args.steps,
                                           args.build_dir, args.threads, args.dtype)
        hf_tps, hf_loss = time_hf(model_dir, batch, args.rank, args.warmup, args.steps, args.dtype)
        print(f"{kind}: lathe {lathe_tps:.1f} tokens/s, transformers+peft {hf_tps:.1f} tokens/s, "
              f"ratio {lathe_tps / hf_tps:.2f}x  (first-step loss {lathe_loss:.3f} vs {hf_loss:.3f}; "
              f"threads {args.threads}, lengths {args.lengths}, {args.dtype})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
