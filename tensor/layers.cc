// Tensor math of the decoder's layers; see layers.h for the contracts.
#include "tensor/layers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <vector>

#include "tensor/invariant_linear.h"
#include "tensor/rope.h"

namespace lathe::runtime {
namespace {
thread_local bool t_batch_invariant = false;
}  // namespace

BatchInvariantScope::BatchInvariantScope() : previous_(t_batch_invariant) { t_batch_invariant = true; }
BatchInvariantScope::~BatchInvariantScope() { t_batch_invariant = previous_; }
bool InBatchInvariantScope() { return t_batch_invariant; }

at::Tensor Linear(const at::Tensor& x, const at::Tensor& w) {
  if (!t_batch_invariant) return at::mm(x, w.t());
  TORCH_CHECK(!at::GradMode::is_enabled() || !(x.requires_grad() || w.requires_grad()),
              "batch-invariant products are for inference only");
  if (x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat) return InvariantLinear(x, w);
  // InvariantLinear sums in fp32 only: bf16 values widen exactly, and the one
  // rounding of each fp32 result keeps every row independent of its batch.
  return InvariantLinear(x.to(at::kFloat), w.to(at::kFloat)).to(x.scalar_type());
}

at::Tensor AddLinear(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w) {
  if (!t_batch_invariant) return at::addmm(y, x, w.t());
  return y + Linear(x, w);
}

at::Tensor AdapterInput(const at::Tensor& x, const at::Tensor& a) {
  return x.scalar_type() == a.scalar_type() ? x : x.to(a.scalar_type());
}

at::Tensor AddAdapter(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b) {
  if (y.scalar_type() == b.scalar_type()) return AddLinear(y, xa, b);
  return AddLinear(y.to(b.scalar_type()), xa, b).to(y.scalar_type());
}

at::Tensor LoraLinear::Forward(const at::Tensor& x) const {
  // x is [T, in]. The scale goes on the rank-sized product and the adapter
  // term is added by the GEMM itself, so no extra [T, out] temporaries.
  // With a bias, one addmm as F.linear computes it (one rounding of the sum).
  at::Tensor y = bias.defined() ? AddLinear(bias, x, weight) : Linear(x, weight);
  if (lora_a.defined()) y = AddAdapter(y, Linear(AdapterInput(x, lora_a), lora_a).mul(scale), lora_b);
  return y;
}

std::vector<at::Tensor> GroupedForward(const at::Tensor& x, const at::Tensor& fused,
                                       const std::vector<const LoraLinear*>& parts, const RegionFn& enter) {
  auto in = [&](const at::Tensor& t) { return enter ? enter(t) : t; };
  std::vector<int64_t> sizes;
  std::vector<at::Tensor> a_parts;
  for (const LoraLinear* p : parts) {
    sizes.push_back(p->weight.size(0));
    if (p->lora_a.defined()) a_parts.push_back(p->lora_a);
  }
  std::vector<at::Tensor> biases;
  for (const LoraLinear* p : parts) {
    if (p->bias.defined()) biases.push_back(p->bias);
  }
  // When every part has a bias, they are added inside the GEMM, as F.linear does.
  const bool fuse_bias = !biases.empty() && biases.size() == parts.size();
  at::Tensor base = fuse_bias ? AddLinear(at::cat(biases), in(x), fused) : Linear(in(x), fused);
  std::vector<at::Tensor> outs = at::split_with_sizes(base, sizes, 1);
  for (size_t i = 0; i < parts.size() && !fuse_bias; ++i) {
    if (parts[i]->bias.defined()) outs[i] = outs[i] + parts[i]->bias;
  }
  if (a_parts.empty()) return outs;
  std::vector<int64_t> ranks;
  for (const at::Tensor& a : a_parts) ranks.push_back(a.size(0));
  at::Tensor a = at::cat(a_parts, 0);
  std::vector<at::Tensor> xa = at::split_with_sizes(in(Linear(AdapterInput(x, a), a)), ranks, 1);
  for (size_t i = 0; i < parts.size(); ++i) {
    outs[i] = AddAdapter(outs[i], xa[i].mul(parts[i]->scale), parts[i]->lora_b);
  }
  return outs;
}

at::Tensor RowParallelForward(const at::Tensor& x, const LoraLinear& layer, const RegionFn& reduce) {
  if (!reduce) return layer.Forward(x);
  auto add_bias = [&](const at::Tensor& y) { return layer.bias.defined() ? y + layer.bias : y; };
  at::Tensor y = Linear(x, layer.weight);
  if (!layer.lora_a.defined()) return add_bias(reduce(y));
  // One reduction for the base output and the adapter's rank-sized input,
  // in the adapter's dtype when it is the wider one.
  const int64_t out = y.size(1);
  at::Tensor xa = Linear(AdapterInput(x, layer.lora_a), layer.lora_a);
  at::Tensor both = reduce(at::cat({y.to(xa.scalar_type()), xa}, 1));
  return AddLinear(add_bias(both.narrow(1, 0, out)), both.narrow(1, out, both.size(1) - out).mul(layer.scale),
                   layer.lora_b)
      .to(y.scalar_type());
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor var = x32.pow(2).mean(-1, /*keepdim=*/true);
  at::Tensor y = x32 * at::rsqrt(var + eps);
  return weight * y.to(x.scalar_type());
}

RopeTables MakeRope(int64_t positions, int64_t head_dim, const RopeSettings& rope, const at::Tensor& like) {
  auto opts = at::TensorOptions().dtype(at::kFloat).device(like.device());
  const RopeFrequencies f = RopeInverseFrequencies(rope, head_dim, like.device());
  at::Tensor pos = at::arange(positions, opts.dtype(at::kLong)).to(at::kFloat);
  at::Tensor freqs = at::outer(pos, f.inv_freq);
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  at::Tensor cos = emb.cos(), sin = emb.sin();
  if (f.attention_factor != 1.0) cos = cos * f.attention_factor, sin = sin * f.attention_factor;
  return {cos.to(like.scalar_type()), sin.to(like.scalar_type())};
}

at::Tensor ApplyRope(const at::Tensor& x, const RopeTables& rope) {
  int64_t half = x.size(-1) / 2;
  at::Tensor x1 = x.narrow(-1, 0, half);
  at::Tensor x2 = x.narrow(-1, half, half);
  at::Tensor rotated = at::cat({-x2, x1}, -1);
  return x * rope.cos + rotated * rope.sin;
}

namespace {

// Per-expert views of a stacked tensor. unbind's backward stacks the experts'
// gradients once, where select would build a full-size gradient per expert.
std::vector<at::Tensor> PerExpert(const at::Tensor& stacked, int64_t experts) {
  if (!stacked.defined()) return std::vector<at::Tensor>(experts);
  return stacked.unbind(0);
}

}  // namespace

MoeRouting RouteTokens(const at::Tensor& x, const at::Tensor& router, int64_t top_k, bool norm_topk_prob) {
  const int64_t num_experts = router.size(0);
  at::Tensor logits = Linear(x, router);
  at::Tensor probs = at::softmax(logits, -1, at::kFloat);
  auto [weights, index] = at::topk(probs, top_k, -1);
  if (norm_topk_prob) weights = weights / weights.sum(-1, /*keepdim=*/true);
  return SortByExpert(weights.to(x.scalar_type()), index, num_experts);
}

MoeRouting SortByExpert(const at::Tensor& weights, const at::Tensor& index, int64_t num_experts) {
  const int64_t top_k = index.size(1);
  MoeRouting r;
  // Group the (token, slot) pairs by expert with a stable sort.
  at::Tensor flat_expert = index.reshape({-1});
  at::Tensor order = std::get<1>(at::sort(flat_expert, /*stable=*/true, 0, false));
  r.token_of = at::floor_divide(order, top_k);
  r.slot_weight = weights.reshape({-1}).index_select(0, order).unsqueeze(1);
  at::Tensor counts = at::bincount(flat_expert, {}, num_experts).to(at::kCPU);
  r.counts.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + num_experts);
  return r;
}

at::Tensor RunExperts(const at::Tensor& rows, const std::vector<int64_t>& counts, const ExpertBank& experts) {
  const int64_t n = experts.gate.size(0);
  auto gate = PerExpert(experts.gate, n), up = PerExpert(experts.up, n), down = PerExpert(experts.down, n);
  auto gate_a = PerExpert(experts.gate_a, n), gate_b = PerExpert(experts.gate_b, n);
  auto up_a = PerExpert(experts.up_a, n), up_b = PerExpert(experts.up_b, n);
  auto down_a = PerExpert(experts.down_a, n), down_b = PerExpert(experts.down_b, n);
  std::vector<at::Tensor> outputs;
  int64_t offset = 0;
  for (int64_t e = 0; e < n; ++e) {
    // Without any rows, expert 0 still runs on none: the output stays
    // connected to the experts' parameters (collective backward passes rely on it).
    if (counts[e] == 0 && !(e == 0 && rows.size(0) == 0)) continue;
    at::Tensor seg = rows.narrow(0, offset, counts[e]);
    at::Tensor g = LoraLinear{gate[e], gate_a[e], gate_b[e], experts.scale, {}}.Forward(seg);
    at::Tensor u = LoraLinear{up[e], up_a[e], up_b[e], experts.scale, {}}.Forward(seg);
    outputs.push_back(LoraLinear{down[e], down_a[e], down_b[e], experts.scale, {}}.Forward(at::silu(g) * u));
    offset += counts[e];
  }
  return outputs.size() == 1 ? outputs[0] : at::cat(outputs, 0);
}

MoeStats StatsOf(const std::vector<int64_t>& counts) {
  MoeStats s;
  for (int64_t c : counts) {
    if (c == 0) continue;
    s.experts_with_tokens += 1;
    s.max_load = std::max(s.max_load, c);
    s.total_routed += c;
  }
  return s;
}

at::Tensor MoeForward(const at::Tensor& x, const at::Tensor& router, const ExpertBank& experts,
                      int64_t top_k, bool norm_topk_prob, MoeStats* stats) {
  MoeRouting r = RouteTokens(x, router, top_k, norm_topk_prob);
  at::Tensor expert_out = RunExperts(x.index_select(0, r.token_of), r.counts, experts);
  if (stats != nullptr) *stats = StatsOf(r.counts);
  return at::zeros_like(x).index_add(0, r.token_of, expert_out * r.slot_weight);
}

}  // namespace lathe::runtime
