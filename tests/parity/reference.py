"""Reference computations for the lathe parity tests, on top of real transformers / peft.

Everything the C++ runtime is compared against comes from here:

* ``Reference`` wraps a real ``transformers`` model (optionally inside a real ``peft``
  LoRA model) and exposes its trainable parameters and gradients under lathe's names
  (HF checkpoint names for full fine-tuning, PEFT adapter names without the
  ``base_model.model.`` prefix for LoRA, always one tensor per expert).
* ``elementwise_loss`` implements the Tinker loss functions on per-token logprobs.
* ``adamw_reference`` replays ``torch.optim.AdamW`` (+ ``clip_grad_norm_``) on given
  gradients.
* helpers that build random datums / adapters / requests for the tests.

MoE experts under transformers 5.x are fused 3-D parameters
(``mlp.experts.gate_up_proj`` [E, 2*Im, H] with the gate rows first, ``mlp.experts.down_proj``
[E, H, Im]).  PEFT reaches them through ``target_parameters`` (``lora.ParamWrapper``), which
gives each expert its own rank-R block: ``lora_A`` [R*E, in] (expert e = rows e*R..e*R+R-1)
and ``lora_B`` [out, R*E] (expert e = columns e, e+E, e+2E, ...).  A per-expert LoRA on
gate_proj and up_proj separately (what lathe and the v4 / Hub adapters use) is exactly a
rank-2r LoRA on gate_up_proj with A = [A_gate; A_up] and B = blockdiag(B_gate, B_up) at
scale 2*alpha / 2r = alpha / r -- the same construction PEFT itself uses when it converts
per-expert adapters for transformers v5 (``PeftConcatenate``).  ``Reference`` builds that
PEFT model and maps every lathe per-expert tensor to a strided view of the fused PEFT
tensors; the off-diagonal blocks of the fused B stay zero because the optimizer runs on
the per-expert tensors, never on the fused ones.

PEFT's automatic v4->v5 config conversion (``convert_peft_config_for_transformers``)
turns ``gate_proj/up_proj/down_proj`` target_modules into target_parameters and thereby
drops the LoRA on the *dense* MLPs of mixed dense/MoE models (qwen3_moe_sparse), so we
disable it while wrapping and spell out the equivalent config ourselves.  The
per-expert mapping is cross-checked against an independent per-expert LoRA hook on the
experts' forward (``install_per_expert_lora_hooks``) in test_parity.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# A trainable tensor whose accumulated gradient is all zeros at optim_step (an expert no
# token was routed to, an embedding row never seen) is stepped like any other: AdamW sees
# a zero gradient, so its moments decay, it keeps moving on momentum and weight decay
# applies.  That is what torch.optim.AdamW does on transformers v5's fused expert
# parameters.  Set to False for the other convention (such tensors have grad None and
# torch skips them entirely: no moment update, no weight decay, no per-tensor step count).
STEP_ZERO_GRAD_TENSORS = True
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Qwen3.5 / Qwen3.6 (model_type qwen3_5_text, qwen3_5_moe_text). Full-attention layers take
# ATTN_PROJ (q_proj is twice as wide: per head [q | gate]); the Gated DeltaNet layers'
# linear_attn projections below are attention targets too. lathe (like Tinker) trains
# in_proj_qkv as three adapters, in_proj_q / in_proj_k / in_proj_v, over its q, k and v
# rows; to PEFT that is one rank-3r LoRA on the fused in_proj_qkv with A = [A_q; A_k; A_v]
# and B = blockdiag(B_q, B_k, B_v) at scale 3*alpha / 3r = alpha / r (the construction used
# for the experts' gate_up_proj), and _lora_views maps the three onto its blocks. MLP
# targets add the shared expert (its gate/up/down_proj match MLP_PROJ) and its sigmoid gate
# shared_expert_gate (Linear(h, 1), a 2-D weight Tinker's LoRA count includes). Never
# targeted: the router (mlp.gate), conv1d, A_log, dt_bias and every norm.
QWEN3_5_LINEAR_ATTN_PROJ = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
QWEN3_5_SPLIT_QKV = ("in_proj_q", "in_proj_k", "in_proj_v")
QWEN3_5_MLP_EXTRA = ("shared_expert_gate",)
# DeepSeek-V3 (multi-head latent attention): the attention targets Tinker trains are the
# down-projections q_a_proj and kv_a_proj_with_mqa and o_proj (q_proj when the model has no
# q LoRA rank); q_b_proj and kv_b_proj train only in full fine-tuning. MLP_PROJ matches the
# dense MLPs and the shared experts (mlp.shared_experts.*); the router (mlp.gate, with its
# e_score_correction_bias buffer) is never targeted.
MLA_ATTN_PROJ = ("q_proj", "q_a_proj", "kv_a_proj_with_mqa", "o_proj")

# Defaults of the loss_fn_config keys (Tinker semantics).
LOSS_CONFIG_DEFAULTS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
LOSS_REQUIRED_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages", "sequence_ratio_mask"),
}


# --------------------------------------------------------------------------------------
# model loading
# --------------------------------------------------------------------------------------

def load_hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    """The real transformers model, fp32, eager attention and eager (loop) experts.

    In bf16 (``dtype=torch.bfloat16``: every weight rounded to bf16 on load) attention
    is transformers' default, sdpa, whose CPU kernel is the one lathe calls."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = AutoConfig.from_pretrained(model_dir)
    kwargs = dict(dtype=dtype, attn_implementation="eager" if dtype == torch.float32 else "sdpa")
    if "moe" in getattr(cfg, "model_type", "") or _is_mla(cfg):  # qwen3_moe, qwen3_5_moe_text, deepseek_v3
        kwargs["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()  # dropout is 0 anyway; eval keeps it explicit
    return model


def model_dims(model) -> dict:
    c = model.config
    return dict(
        vocab=c.vocab_size,
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        experts=getattr(c, "num_experts", 0) or 0,
        moe_inter=getattr(c, "moe_intermediate_size", 0) or 0,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
    )


def _is_mla(config) -> bool:
    """DeepSeek-V3 and GLM-5 (glm_moe_dsa): latent attention, sigmoid-routed experts."""
    return getattr(config, "model_type", "") in ("deepseek_v3", "glm_moe_dsa")


def _is_qwen3_5(model) -> bool:
    return str(getattr(model.config, "model_type", "")).startswith("qwen3_5")


def _moe_layers(model) -> list[int]:
    out = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            out.append(i)
    return out


@contextlib.contextmanager
def _no_peft_v5_config_conversion():
    """See module docstring: keep PEFT from rewriting our explicit LoRA config."""
    try:
        import peft.utils.transformers_weight_conversion as conv
    except ImportError:  # transformers < 5: nothing to disable
        yield
        return
    saved = conv.convert_peft_config_for_transformers
    conv.convert_peft_config_for_transformers = lambda *a, **k: None
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = saved


# --------------------------------------------------------------------------------------
# parameter views: lathe name -> (owning torch Parameter, view function)
# --------------------------------------------------------------------------------------

@dataclass
class _View:
    param: torch.nn.Parameter
    view: Callable[[torch.Tensor], torch.Tensor]  # basic-slicing view into param-shaped tensor

    def value(self) -> torch.Tensor:
        return self.view(self.param.detach()).clone()

    def grad(self) -> torch.Tensor:
        if self.param.grad is None:
            return torch.zeros_like(self.value())
        return self.view(self.param.grad).clone()

    def set_(self, t: torch.Tensor) -> None:
        with torch.no_grad():
            dst = self.view(self.param.data)
            if dst.shape != t.shape:
                raise ValueError(f"shape mismatch {tuple(dst.shape)} vs {tuple(t.shape)}")
            dst.copy_(t.to(dst.dtype))


def _full_views(model) -> dict[str, _View]:
    """Full fine-tuning: every parameter under its HF checkpoint name, experts split. GLM-5's
    sparse-attention indexers (self_attn.indexer.*) are left out: transformers computes them
    under no_grad, so they never get a gradient and torch's AdamW never steps them."""
    views: dict[str, _View] = {}
    for name, p in model.named_parameters():  # tied lm_head is deduplicated by torch
        if ".self_attn.indexer." in name:
            continue
        m = re.match(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
        if not m:
            views[name] = _View(p, lambda t: t)
            continue
        prefix, which = m.groups()
        E = p.shape[0]
        for e in range(E):
            if which == "down_proj":
                views[f"{prefix}.{e}.down_proj.weight"] = _View(p, lambda t, e=e: t[e])
            else:
                inter = p.shape[1] // 2
                views[f"{prefix}.{e}.gate_proj.weight"] = _View(p, lambda t, e=e, i=inter: t[e, :i])
                views[f"{prefix}.{e}.up_proj.weight"] = _View(p, lambda t, e=e, i=inter: t[e, i:])
    return dict(sorted(views.items()))


def _strip_peft(name: str) -> str:
    name = name.replace(".default", "")
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name


def _lora_views(peft_model, rank: int) -> dict[str, _View]:
    """LoRA: PEFT names (prefix stripped), one A/B pair per expert and projection."""
    from peft.tuners.lora.layer import ParamWrapper

    views: dict[str, _View] = {}
    for mname, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            if "default" not in module.lora_A:
                continue
            A = module.lora_A["default"].weight
            B = module.lora_B["default"].weight
            E = module.num_experts
            prefix = _strip_peft(mname)
            prefix = prefix[: prefix.index(".mlp.experts") + len(".mlp.experts")]
            R = A.shape[0] // E
            if module.parameter_name == "down_proj":
                assert R == rank, (mname, R, rank)
                for e in range(E):
                    base = f"{prefix}.{e}.down_proj"
                    views[f"{base}.lora_A.weight"] = _View(A, lambda t, e=e, R=R: t[e * R:(e + 1) * R])
                    views[f"{base}.lora_B.weight"] = _View(B, lambda t, e=e, E=E: t[:, e::E])
            elif module.parameter_name == "gate_up_proj":
                assert R == 2 * rank, (mname, R, rank)
                inter = B.shape[0] // 2
                r = rank
                for e in range(E):
                    g, u = f"{prefix}.{e}.gate_proj", f"{prefix}.{e}.up_proj"
                    views[f"{g}.lora_A.weight"] = _View(A, lambda t, e=e, r=r: t[e * 2 * r: e * 2 * r + r])
                    views[f"{u}.lora_A.weight"] = _View(A, lambda t, e=e, r=r: t[e * 2 * r + r: (e + 1) * 2 * r])
                    views[f"{g}.lora_B.weight"] = _View(B, lambda t, e=e, i=inter, E=E, r=r: t[:i, e::E][:, :r])
                    views[f"{u}.lora_B.weight"] = _View(B, lambda t, e=e, i=inter, E=E, r=r: t[i:, e::E][:, r:])
            else:
                raise AssertionError(f"unexpected ParamWrapper on {module.parameter_name}")
        elif mname.endswith(".linear_attn") and hasattr(getattr(module, "in_proj_qkv", None), "lora_A"):
            views.update(_split_qkv_views(module, _strip_peft(mname), rank))
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if ".mlp.experts." in name and re.search(r"\.mlp\.experts\.(base_layer\.)*lora_", name):
            continue  # fused expert LoRA, handled above
        if ".linear_attn.in_proj_qkv.lora_" in name:
            continue  # split into in_proj_q/k/v, handled above
        views[_strip_peft(name)] = _View(p, lambda t: t)
    return dict(sorted(views.items()))


def _split_qkv_views(linear_attn, prefix: str, rank: int) -> dict[str, _View]:
    """lathe's in_proj_q / in_proj_k / in_proj_v adapters of one Gated DeltaNet layer as the
    diagonal blocks of PEFT's rank-3r LoRA on its fused in_proj_qkv (rows: q key_dim, k
    key_dim, v value_dim); see QWEN3_5_LINEAR_ATTN_PROJ."""
    fused = linear_attn.in_proj_qkv
    A = fused.lora_A["default"].weight  # [3r, hidden]
    B = fused.lora_B["default"].weight  # [2 key_dim + value_dim, 3r]
    r, kd = rank, linear_attn.key_dim
    assert A.shape[0] == 3 * r and B.shape[0] == 2 * kd + linear_attn.value_dim, (prefix, tuple(A.shape))
    rows = {"in_proj_q": (0, kd), "in_proj_k": (kd, 2 * kd), "in_proj_v": (2 * kd, B.shape[0])}
    views = {}
    for i, name in enumerate(QWEN3_5_SPLIT_QKV):
        lo, hi = rows[name]
        views[f"{prefix}.{name}.lora_A.weight"] = _View(A, lambda t, i=i, r=r: t[i * r:(i + 1) * r])
        views[f"{prefix}.{name}.lora_B.weight"] = _View(B, lambda t, i=i, r=r, lo=lo, hi=hi: t[lo:hi, i * r:(i + 1) * r])
    return views


def lora_target_config(model, lora: dict, experts: bool = True):
    """A peft LoraConfig equivalent to lathe's LoRA flags (see module docstring); without
    ``experts`` the MoE experts get no LoRA from peft."""
    from peft import LoraConfig

    r, alpha = int(lora["rank"]), lora["alpha"]
    qwen3_5 = _is_qwen3_5(model)
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if lora.get("train_attn", True) and _is_mla(model.config):
        targets += list(MLA_ATTN_PROJ)
    elif lora.get("train_attn", True):
        targets += list(ATTN_PROJ)
        if qwen3_5:
            targets += list(QWEN3_5_LINEAR_ATTN_PROJ)
            rank_pattern[r".*\.in_proj_qkv"] = 3 * r
            alpha_pattern[r".*\.in_proj_qkv"] = 3 * alpha
    if lora.get("train_mlp", True):
        targets += list(MLP_PROJ)  # dense MLPs (nn.Linear); experts are not Linear in v5
        if qwen3_5 and _moe_layers(model):
            targets += list(QWEN3_5_MLP_EXTRA)
    if lora.get("train_unembed", True):
        targets.append("lm_head")
    target_parameters: list[str] = []
    if experts and lora.get("train_mlp", True) and _moe_layers(model):
        target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        rank_pattern[r".*\.gate_up_proj"] = 2 * r
        alpha_pattern[r".*\.gate_up_proj"] = 2 * alpha
    # PEFT rejects an empty target list, which cannot happen in our tests.
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
        target_modules=targets or None, target_parameters=target_parameters or None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True,
    )


# --------------------------------------------------------------------------------------
# datum handling and losses
# --------------------------------------------------------------------------------------

def datum_tensors(datum: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.tensor(datum["tokens"], dtype=torch.int64)
    inputs = {}
    for k, v in datum["loss_fn_inputs"].items():
        inputs[k] = torch.tensor(v, dtype=torch.int64 if k == "target_tokens" else torch.float32)
    return tokens, inputs


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) fp32, targets (N,) or (N, K) -> (lp, mask); lp is 0 where target == -100."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != IGNORE_INDEX
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    if targets.dim() == 1:
        lp = logp.gather(-1, safe[:, None])[:, 0]
    else:
        lp = logp.gather(-1, safe)
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    return lp, mask


def elementwise_loss(loss_fn: str, lp: torch.Tensor, mask: torch.Tensor, inputs: dict,
                     config: dict | None = None) -> torch.Tensor:
    """Per-token loss with Tinker semantics (plain, unnormalised)."""
    cfg = dict(LOSS_CONFIG_DEFAULTS[loss_fn])
    cfg.update(config or {})
    zero = torch.zeros_like(lp)
    if loss_fn == "cross_entropy":
        out = -lp * inputs["weights"]
    else:
        q, adv = inputs["logprobs"], inputs["advantages"]
        if loss_fn == "importance_sampling":
            out = -torch.exp(lp - q) * adv
        elif loss_fn in ("ppo", "cispo"):
            lo = inputs.get("clip_low_threshold", torch.full_like(lp, cfg["clip_low_threshold"]))
            hi = inputs.get("clip_high_threshold", torch.full_like(lp, cfg["clip_high_threshold"]))
            ratio = torch.exp(lp - q)
            clipped = torch.minimum(torch.maximum(ratio, lo), hi)
            if loss_fn == "ppo":
                out = -torch.minimum(ratio * adv, clipped * adv)
            else:
                out = -clipped.detach() * lp * adv
        elif loss_fn == "gspo":
            out = _gspo_elementwise(lp, mask, q, adv, inputs, cfg)
        elif loss_fn == "dro":
            beta = cfg["beta"]
            out = -(lp * adv - 0.5 * beta * (lp - q) ** 2)
        else:
            raise ValueError(f"unknown loss_fn {loss_fn!r}")
    return torch.where(mask, out, zero)


def _gspo_elementwise(lp, mask, q, adv, inputs, cfg):
    """GSPO-token (Zheng et al. 2025, as Tinker defines it).

    M = tokens with sequence_ratio_mask != 0 (and a real target).  The sequence ratio
    s = exp(mean_{t in M} (log p(x_t) - log q(x_t))) is a geometric mean of token ratios;
    token t's ratio is sg(s) * p(x_t) / sg(p(x_t)): value s, gradient of its own logprob.
    Loss_t = -min(s_t A_t, clip(s_t, lo, hi) A_t).  An empty M counts as log s = 0."""
    marked = (inputs["sequence_ratio_mask"] != 0) & mask
    if bool(marked.any()):
        log_s = (lp.detach() - q)[marked].mean()
    else:
        log_s = torch.zeros((), dtype=lp.dtype)
    token_ratio = torch.exp(log_s) * torch.exp(lp - lp.detach())
    lo = inputs.get("clip_low_threshold", torch.full_like(lp, cfg["clip_low_threshold"]))
    hi = inputs.get("clip_high_threshold", torch.full_like(lp, cfg["clip_high_threshold"]))
    clipped = torch.clamp(token_ratio, lo, hi)
    return -torch.minimum(token_ratio * adv, clipped * adv)


# --------------------------------------------------------------------------------------
# the reference trainer
# --------------------------------------------------------------------------------------

class Reference:
    """Real transformers (+ peft) model with lathe-named parameters and Tinker ops."""

    def __init__(self, model_dir: str, lora: dict | None = None,
                 adapter: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32):
        """``dtype=torch.bfloat16``: the model loaded in bf16, a LoRA's A/B in fp32 (peft's
        autocast_adapter_dtype), expert LoRA through ``install_per_expert_lora_hooks`` with
        peft's casts (peft's ParamWrapper would fold the adapter into the bf16 weight)."""
        self.model_dir = model_dir
        self.dtype = dtype
        self.base = load_hf_model(model_dir, dtype)
        self.dims = model_dims(self.base)
        self.lora = lora
        if lora is None:
            self.model = self.base
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.views = _full_views(self.model)
            if adapter is not None:
                raise ValueError("adapter given without lora config")
        else:
            from peft import get_peft_model

            hooked = dtype != torch.float32 and lora.get("train_mlp", True) and bool(_moe_layers(self.base))
            cfg = lora_target_config(self.base, lora, experts=not hooked)
            with _no_peft_v5_config_conversion(), warnings.catch_warnings():
                # PEFT warns that the gate_up_proj rank/alpha patterns matched no module although
                # they did apply (checked in _lora_views), and that lm_head is tied to the
                # embedding: lathe's LoRA on the unembedding leaves the embedding lookup alone.
                warnings.filterwarnings("ignore", message=r".*_pattern keys did not match")
                warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*ensure_weight_tying")
                self.model = get_peft_model(self.base, cfg)
            self.views = _lora_views(self.model, int(lora["rank"]))
            if hooked:
                leaves = install_per_expert_lora_hooks(
                    self.base, _zero_expert_adapter(self.base, int(lora["rank"])), lora["alpha"] / lora["rank"])
                self.views.update({k: _View(t, lambda t: t) for k, t in leaves.items()})
                self.views = dict(sorted(self.views.items()))
            # PEFT initialises every B to zero; make sure of it, since the off-diagonal
            # blocks of the fused expert B must stay zero (set_params only writes blocks).
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if ".lora_B." in n:
                        p.zero_()
            if adapter is not None:
                self.set_params(adapter, strict=True)
        self.model.eval()
        self._opt = None
        self._opt_leaves: dict[str, torch.nn.Parameter] = {}

    # --- parameters ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.views)

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.value() for k, v in self.views.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        return {k: v.grad() for k, v in self.views.items()}

    def set_params(self, values: dict[str, torch.Tensor], strict: bool = True) -> None:
        if strict:
            missing = set(self.views) - set(values)
            extra = set(values) - set(self.views)
            if missing or extra:
                raise KeyError(f"param name mismatch: missing={sorted(missing)[:5]} extra={sorted(extra)[:5]}")
        for k, t in values.items():
            self.views[k].set_(t)

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        for v in self.views.values():  # hooked expert LoRA leaves are no module's parameters
            v.param.grad = None

    # --- compute ------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[None, :], use_cache=False)
        return out.logits[0].float()

    def run(self, data: list[dict], loss_fn: str = "cross_entropy", config: dict | None = None,
            backward: bool = True) -> dict:
        """forward / forward_backward on a batch; grads accumulate on backward."""
        lps, losses = [], []
        total = None
        ctx = contextlib.nullcontext() if backward else torch.no_grad()
        with ctx:
            for d in data:
                tokens, inputs = datum_tensors(d)
                lp, mask = gather_logprobs(self.logits(tokens), inputs["target_tokens"])
                el = elementwise_loss(loss_fn, lp, mask, inputs, config)
                s = el.sum()
                total = s if total is None else total + s
                lps.append(lp.detach().clone())
                losses.append(el.detach().clone())
        if backward and total is not None:
            total.backward()
        return dict(logprobs=lps, elementwise_loss=losses,
                    loss_sum=float(total.detach()) if total is not None else 0.0)

    def optim_step(self, adam: dict) -> dict:
        """torch.optim.AdamW on the lathe-layout tensors, then write back; zero grads."""
        grads = self.grads()
        params = self.params()
        if self._opt is None:
            self._opt_leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
            self._opt = torch.optim.AdamW(list(self._opt_leaves.values()), **_adamw_kwargs(adam))
        for k, leaf in self._opt_leaves.items():
            leaf.data.copy_(params[k])
            leaf.grad = _maybe_none(grads[k])
        _set_hparams(self._opt, adam)
        norm = _clip(list(self._opt_leaves.values()), adam)
        self._opt.step()
        self.set_params({k: v.detach() for k, v in self._opt_leaves.items()})
        self.zero_grad()
        return {"grad_norm": norm}


def _maybe_none(grad: torch.Tensor) -> torch.Tensor | None:
    if not STEP_ZERO_GRAD_TENSORS and not bool(grad.any()):
        return None
    return grad.clone()


def _adamw_kwargs(adam: dict) -> dict:
    return dict(lr=adam.get("learning_rate", 1e-4),
                betas=(adam.get("beta1", 0.9), adam.get("beta2", 0.95)),
                eps=adam.get("eps", 1e-12), weight_decay=adam.get("weight_decay", 0.0))


def _set_hparams(opt, adam: dict) -> None:
    kw = _adamw_kwargs(adam)
    for g in opt.param_groups:
        g.update(kw)


def _clip(leaves: list[torch.nn.Parameter], adam: dict) -> float:
    max_norm = adam.get("grad_clip_norm", 0.0) or 0.0
    with_grad = [p for p in leaves if p.grad is not None]
    if not with_grad:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad])))


def adamw_reference(init: dict[str, torch.Tensor], grads_per_step: list[dict[str, torch.Tensor]],
                    adams: list[dict]) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Replay torch AdamW (with clip_grad_norm_) on given grads; params after each step."""
    names = sorted(init)
    leaves = [torch.nn.Parameter(init[n].clone().float()) for n in names]
    opt = torch.optim.AdamW(leaves, **_adamw_kwargs(adams[0]))
    out, norms = [], []
    for grads, adam in zip(grads_per_step, adams):
        for n, leaf in zip(names, leaves):
            leaf.grad = _maybe_none(grads[n].float())
        _set_hparams(opt, adam)
        norms.append(_clip(leaves, adam))
        opt.step()
        out.append({n: leaf.detach().clone() for n, leaf in zip(names, leaves)})
    return out, norms


# --------------------------------------------------------------------------------------
# independent cross-check: per-expert LoRA through a hook on the experts' forward
# --------------------------------------------------------------------------------------

def install_per_expert_lora_hooks(model, adapter: dict[str, torch.Tensor], scale: float) -> dict:
    """Replace only ``Qwen3MoeExperts.forward`` of every MoE layer of a plain transformers
    model so that each selected expert computes W x + scale * B (A x) per projection.
    Routing, attention, norms and everything else stay transformers'.  Returns the leaf
    tensors (requires_grad) for the expert LoRA weights, keyed by lathe name."""
    leaves: dict[str, torch.Tensor] = {}
    for li in _moe_layers(model):
        experts = model.model.layers[li].mlp.experts
        prefix = f"model.layers.{li}.mlp.experts"
        ab = {}
        for e in range(experts.num_experts):
            for proj in MLP_PROJ:
                for ab_name in ("lora_A", "lora_B"):
                    key = f"{prefix}.{e}.{proj}.{ab_name}.weight"
                    t = adapter[key].clone().float().requires_grad_(True)
                    leaves[key] = t
                    ab[(e, proj, ab_name)] = t

        def forward(hidden_states, top_k_index, top_k_weights, _ex=experts, _ab=ab):
            out = torch.zeros_like(hidden_states)
            inter = _ex.gate_up_proj.shape[1] // 2
            for e in range(_ex.num_experts):
                tok, pos = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                x = hidden_states[tok]

                def lin(inp, w, proj):
                    # peft's order and casts: the adapter reads the input in its own dtype,
                    # its output is added to the base output, the sum cast to the base's dtype.
                    a, b = _ab[(e, proj, "lora_A")], _ab[(e, proj, "lora_B")]
                    base = F.linear(inp, w)
                    return (base + F.linear(F.linear(inp.to(a.dtype), a), b) * scale).to(base.dtype)

                g = lin(x, _ex.gate_up_proj[e, :inter], "gate_proj")
                u = lin(x, _ex.gate_up_proj[e, inter:], "up_proj")
                y = lin(_ex.act_fn(g) * u, _ex.down_proj[e], "down_proj")
                out = out.index_add(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
            return out

        experts.forward = forward
    return leaves


def _zero_expert_adapter(model, rank: int) -> dict[str, torch.Tensor]:
    """Zero per-expert LoRA tensors (fp32) for every MoE layer of ``model``."""
    out = {}
    for li in _moe_layers(model):
        ex = model.model.layers[li].mlp.experts
        inter, hidden = ex.gate_up_proj.shape[1] // 2, ex.gate_up_proj.shape[2]
        for e in range(ex.num_experts):
            for proj, (i, o) in {"gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                                 "down_proj": (inter, hidden)}.items():
                p = f"model.layers.{li}.mlp.experts.{e}.{proj}"
                out[f"{p}.lora_A.weight"] = torch.zeros(rank, i)
                out[f"{p}.lora_B.weight"] = torch.zeros(o, rank)
    return out


def _sigmoid_routing_margin(router, logits: torch.Tensor) -> float:
    """DeepSeek-V3's router: the smaller of the gap between the topk_group-th and the next
    group score and the gap between the k-th and (k+1)-th bias-corrected score of the kept
    groups."""
    choice = logits.sigmoid() + router.e_score_correction_bias.float()
    n, g, k = choice.shape[0], router.num_group, router.top_k
    grouped = choice.view(n, g, -1)
    margin = math.inf
    if router.topk_group < g:
        groups = grouped.topk(2, dim=-1).values.sum(-1).sort(dim=-1, descending=True)
        kept = groups.indices[:, :router.topk_group]
        margin = float((groups.values[:, router.topk_group - 1] - groups.values[:, router.topk_group]).min())
        mask = torch.zeros(n, g, dtype=torch.bool).scatter_(1, kept, True)
        grouped = grouped.masked_fill(~mask[:, :, None], -math.inf)
    p = grouped.reshape(n, -1).sort(dim=-1, descending=True).values
    return min(margin, float((p[:, k - 1] - p[:, k]).min()))


def _indexer_margin(indexer, args) -> float:
    """GLM-5's sparse-attention indexer on (hidden_states, q_resid, (cos, sin), ...): the
    smallest gap between the index_topk-th and the next index score among the keys a query
    may see, over the queries that see more than index_topk keys (inf when none does)."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

    x, q_resid, (cos, sin) = args[0], args[1], args[2]
    b, s, _ = x.shape
    h, d, r, top = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim, indexer.index_topk
    if s <= top:
        return math.inf
    q = indexer.wq_b(q_resid).view(b, s, h, d).float()
    k = indexer.k_norm(indexer.wk(x)).unsqueeze(2).float()
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q[..., :r], k[..., :r], cos.float(), sin.float(), unsqueeze_dim=2)
    q = torch.cat([q_rot, q[..., r:]], -1)
    k = torch.cat([k_rot, k[..., r:]], -1)[:, :, 0]
    scores = torch.relu(torch.einsum("bshd,btd->bsht", q, k) * d ** -0.5)
    w = indexer.weights_proj(x.to(indexer.weights_proj.weight.dtype)).float() * h ** -0.5
    index = torch.einsum("bsh,bsht->bst", w, scores)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    index = index.masked_fill(~causal, -math.inf)[:, top:]  # the queries that see more than top keys
    v = index.sort(dim=-1, descending=True).values
    return float((v[..., top - 1] - v[..., top]).min())


def min_routing_margin(model, data: list[dict]) -> float:
    """Smallest gap between the k-th and (k+1)-th router probability over all tokens of
    all MoE layers (inf for dense models), and between the index_topk-th and next index
    score of GLM-5's indexers.  Tests use it to make sure the C++ runtime cannot
    legitimately pick different experts or keys because of rounding."""
    margins: list[float] = []
    hooks = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        indexer = getattr(getattr(layer, "self_attn", None), "indexer", None)
        if indexer is not None:
            hooks.append(indexer.register_forward_hook(
                lambda mod, args, out: margins.append(_indexer_margin(mod, args))))
    for li in _moe_layers(base):
        router = base.model.layers[li].mlp.gate

        def hook(mod, args, out):
            logits = out[0].detach().float()
            if hasattr(mod, "e_score_correction_bias"):
                margins.append(_sigmoid_routing_margin(mod, logits))
                return
            p = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values
            k = mod.top_k
            margins.append(float((p[:, k - 1] - p[:, k]).min()))

        hooks.append(router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for d in data:
                model(input_ids=torch.tensor(d["tokens"])[None, :], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return min(margins) if margins else math.inf


# --------------------------------------------------------------------------------------
# random test inputs
# --------------------------------------------------------------------------------------

def lora_param_shapes(model_dir: str, lora: dict) -> dict[str, tuple[int, ...]]:
    ref = Reference(model_dir, lora=lora)
    return {k: tuple(v.shape) for k, v in ref.params().items()}


def random_adapter(model_dir: str, lora: dict, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = lora_param_shapes(model_dir, lora)
    return {k: (torch.randn(s, generator=g) * std).float() for k, s in sorted(shapes.items())}


def save_adapter(tensors: dict[str, torch.Tensor], path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


def random_datum(g: torch.Generator, vocab: int, n: int, *, loss_fn: str = "cross_entropy",
                 k: int | None = None, ignore_positions: tuple[int, ...] = (),
                 signed_weights: bool = True, per_token_clip: bool = False) -> dict:
    """A datum with tokens (n,) and loss_fn_inputs for ``loss_fn`` (lists, JSON-ready)."""
    tokens = torch.randint(0, vocab, (n,), generator=g)
    shape = (n,) if k is None else (n, k)
    if k is None:
        targets = torch.randint(0, vocab, shape, generator=g)
    else:  # K distinct targets per position
        targets = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    for i in ignore_positions:
        targets[i] = IGNORE_INDEX
    inputs: dict = {"target_tokens": targets.tolist()}
    if loss_fn == "cross_entropy":
        w = torch.rand(shape, generator=g) + 0.25
        if signed_weights:
            w = w * torch.where(torch.rand(shape, generator=g) < 0.3, -1.0, 1.0)
        inputs["weights"] = w.tolist()
    else:
        # sampler logprobs: plausible values in [-6, -0.05]; advantages of both signs
        inputs["logprobs"] = (-(torch.rand(shape, generator=g) * 5.95 + 0.05)).tolist()
        inputs["advantages"] = (torch.randn(shape, generator=g)).tolist()
        if loss_fn == "gspo":  # about two thirds of the tokens in the ratio
            inputs["sequence_ratio_mask"] = (torch.rand(shape, generator=g) < 0.67).float().tolist()
        if per_token_clip:
            inputs["clip_low_threshold"] = (0.5 + 0.4 * torch.rand(shape, generator=g)).tolist()
            inputs["clip_high_threshold"] = (1.1 + 0.9 * torch.rand(shape, generator=g)).tolist()
    return {"tokens": tokens.tolist(), "loss_fn_inputs": inputs}


def random_batch(seed: int, vocab: int, lengths=(5, 11, 17), **kw) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [random_datum(g, vocab, n, **kw) for n in lengths]


def adapter_from_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in params.items()}


def write_json(obj, path: str) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def pick_batch(ref: "Reference", seed: int, min_margin: float = 1e-4, tries: int = 64, **kw) -> list[dict]:
    """random_batch(seed', ...) for the first seed' >= seed whose MoE routing margin under
    ``ref``'s current parameters is at least ``min_margin`` (any batch for dense models)."""
    for s in range(seed, seed + tries):
        data = random_batch(s, ref.dims["vocab"], **kw)
        if min_routing_margin(ref.model, data) >= min_margin:
            return data
    raise AssertionError(f"no batch with routing margin >= {min_margin} in seeds {seed}..{seed + tries}")


# --------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    denom = float(want.norm())
    num = float((got - want).norm())
    return num / denom if denom > 0 else num


def assert_same_names(got: dict, want: dict, what: str) -> None:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing and not extra, f"{what}: missing {missing[:8]} extra {extra[:8]}"


def assert_tensors_rel_close(got: dict, want: dict, rtol: float, what: str, zero_atol: float = 1e-8) -> None:
    assert_same_names(got, want, what)
    bad = []
    for k in sorted(want):
        assert tuple(got[k].shape) == tuple(want[k].shape), f"{what}: {k} shape {tuple(got[k].shape)} != {tuple(want[k].shape)}"
        if float(want[k].norm()) == 0.0:
            if float(got[k].abs().max()) > zero_atol:
                bad.append((k, float(got[k].abs().max()), "reference is zero"))
            continue
        e = rel_err(got[k], want[k])
        if not e <= rtol:
            bad.append((k, e, float(want[k].norm())))
    assert not bad, f"{what}: {len(bad)} tensors off (name, rel err, ref norm): {bad[:6]}"


def assert_tensors_abs_close(got: dict, want: dict, atol: float, what: str) -> None:
    assert_same_names(got, want, what)
    bad = []
    for k in sorted(want):
        assert tuple(got[k].shape) == tuple(want[k].shape), f"{what}: {k} shape mismatch"
        d = float((got[k].double() - want[k].double()).abs().max()) if want[k].numel() else 0.0
        if not d <= atol:
            bad.append((k, d))
    assert not bad, f"{what}: {len(bad)} tensors off (name, max abs diff): {bad[:6]}"


def assert_bit_identical(got: dict, want: dict, what: str) -> None:
    assert_same_names(got, want, what)
    bad = [k for k in sorted(want) if not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: not bit-identical: {bad[:8]}"


def grad_norm_metric(metrics: dict) -> float:
    keys = [k for k in metrics if k.startswith("grad_norm")]
    assert keys, f"optim_step metrics carry no grad_norm* key: {metrics}"
    return float(metrics[keys[0]])


def global_norm(tensors: dict) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
