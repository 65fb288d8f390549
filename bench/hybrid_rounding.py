"""How much rounding moves the tiny Qwen3 and Qwen3.5 models of tests/parity/make_tiny_models.py.

spread: transformers' own bf16-vs-fp32 error (the same weights: the bf16 model's, and
in LoRA mode the same fp32 adapter) on the batches of tests/parity/test_precision.py,
LoRA and full fine-tuning: max per-token logprob, loss:sum (relative), worst gradient
tensor (relative, test_precision's measure).

sensitivity: transformers' fp32 model on random tokens; each attention / linear-attention
module's input is multiplied by 1 + 2^-24 N(0, 1) in turn; prints the relative change of
that module's output over 2^-24 and the largest change of any logprob.

  .venv/bin/python bench/hybrid_rounding.py spread|sensitivity [KIND ...]
"""
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))
warnings.simplefilter("ignore")

import make_tiny_models  # noqa: E402
import reference as R  # noqa: E402
import test_precision as TP  # noqa: E402


def model_dir(root: str, kind: str) -> str:
    d = os.path.join(root, kind)
    if not os.path.exists(d):
        make_tiny_models.make_model(kind, d, seed=0)
    return d


def max_lp(a: dict, b: dict) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a["logprobs"], b["logprobs"]))


def spread(d: str, kind: str) -> None:
    for mode in ("lora", "full"):
        seed = TP.KIND_SEED[kind] + (0 if mode == "lora" else 50)
        if mode == "lora":
            adapter = R.random_adapter(d, TP.LORA, seed=seed)
            make = lambda dt: R.Reference(d, lora=TP.LORA, adapter=adapter, dtype=dt)  # noqa: E731
        else:
            make = lambda dt: R.Reference(d, dtype=dt)  # noqa: E731
        r16 = make(torch.bfloat16)
        data = R.pick_batch(r16, seed + 1, min_margin=TP.MIN_ROUTING_MARGIN, tries=512, lengths=(6, 9, 5),
                            ignore_positions=(3,))
        w16, g16 = r16.run(data), TP.floats(r16.grads())
        r32 = make(torch.float32)
        r32.set_params(TP.floats(r16.params()))
        w32, g32 = r32.run(data), TP.floats(r32.grads())
        loss = abs(w16["loss_sum"] - w32["loss_sum"]) / max(1.0, abs(w32["loss_sum"]))
        grad, name = TP.worst_rel(g16, g32)
        print(f"{kind}/{mode}: transformers bf16 vs fp32: logprob {max_lp(w16, w32):.3g}, loss {loss:.3g}, "
              f"grad {grad:.3g} ({name})", flush=True)


def sensitivity(d: str, kind: str, length: int) -> None:
    torch.manual_seed(0)
    m = R.load_hf_model(d).eval()
    vocab = m.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, length))
    for name, mod in [(n, x) for n, x in m.named_modules() if n.endswith(("linear_attn", "self_attn"))]:
        seen, state = {}, {"perturb": False}

        def pre(_, args, kwargs):
            if state["perturb"]:
                x = args[0] if args else kwargs["hidden_states"]
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
                x = x * (1 + 2**-24 * noise)
                args, kwargs = ((x, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=x))
            return args, kwargs

        def post(_, args, kwargs, out):
            seen[state["perturb"]] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        hooks = [mod.register_forward_pre_hook(pre, with_kwargs=True), mod.register_forward_hook(post, with_kwargs=True)]
        with torch.no_grad():
            lp0 = torch.log_softmax(m(ids).logits.float(), -1)
            state["perturb"] = True
            lp1 = torch.log_softmax(m(ids).logits.float(), -1)
        for h in hooks:
            h.remove()
        gain = float((seen[True] - seen[False]).norm() / seen[False].norm()) / 2**-24
        print(f"{kind} T={length} {name}: output change / input change {gain:.3g}, "
              f"logprob max change {float((lp0 - lp1).abs().max()):.2e}", flush=True)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("spread", "sensitivity"):
        sys.exit(f"want 'spread' or 'sensitivity', got {what!r}")
    kinds = sys.argv[2:] or ["qwen3", *make_tiny_models.HYBRID_KINDS]
    with tempfile.TemporaryDirectory() as root:
        for kind in kinds:
            d = model_dir(root, kind)
            if what == "spread":
                spread(d, kind)
            else:
                for length in (64, 1536):
                    sensitivity(d, kind, length)


if __name__ == "__main__":
    main()
