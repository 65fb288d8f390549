// SparseIndexer: loading it and choosing each query's keys.
#include "runtime/sparse_indexer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "core/status.h"
#include "parallel/context_parallel.h"
#include "params/blocks.h"
#include "runtime/param_loader.h"

namespace lathe::runtime {
namespace {

// Index scores computed at once, in fp32 values (256 MiB).
constexpr int64_t kScoreBudget = int64_t{1} << 26;
// Key indices widened to long at once when a mask is built (32 MiB).
constexpr int64_t kIndexBlock = int64_t{1} << 22;

}  // namespace

at::Tensor KeyMask(const KeySelection& s, const at::Device& device) {
  if (!s.masked) return at::Tensor();
  const int64_t n = s.queries, m = s.first + n;
  // Query i sees keys j <= first + i: the lower triangle from diagonal first.
  if (!s.top.defined()) return at::ones({n, m}, at::TensorOptions().dtype(at::kBool).device(device)).tril(s.first);
  at::Tensor mask = at::zeros({n, m}, at::TensorOptions().dtype(at::kBool).device(device));
  // The long indices scatter needs, a block of queries at a time.
  const int64_t rows = std::max<int64_t>(1, kIndexBlock / std::max<int64_t>(1, s.top.size(1)));
  for (int64_t begin = 0; begin < n; begin += rows) {
    const int64_t b = std::min(rows, n - begin);
    mask.narrow(0, begin, b).scatter_(1, s.top.narrow(0, begin, b).to(at::kLong), true);
  }
  return mask.tril_(s.first);
}

at::Tensor SelectedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::vector<int64_t>& lengths, const std::vector<KeySelection>& selections,
                             double scale) {
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t n = lengths[i];
    const at::Tensor mask = i < selections.size() ? KeyMask(selections[i], q.device()) : at::Tensor();
    const bool all = !mask.defined();
    parts.push_back(at::scaled_dot_product_attention(
                        q.narrow(1, offset, n).unsqueeze(0), k.narrow(1, offset, n).unsqueeze(0),
                        v.narrow(1, offset, n).unsqueeze(0), all ? std::optional<at::Tensor>() : mask, 0.0,
                        /*is_causal=*/all, scale)
                        .squeeze(0));
    offset += n;
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 1);
}

absl::StatusOr<SparseIndexer> SparseIndexer::Load(ParamLoader& loader, const std::string& prefix,
                                                  const SparseIndexerShape& s, const ModelShard& shard) {
  SparseIndexer x;
  x.shape_ = s;
  // Frozen and whole: nothing attaches an adapter or registers a tensor.
  DescribedLoader rows(loader, params::DescribeSparseIndexer(prefix, s.hidden, s.q_lora_rank, s.heads, s.head_dim),
                       shard);
  LATHE_ASSIGN_OR_RETURN(x.wq_b_, rows.FrozenWeight("wq_b"));
  LATHE_ASSIGN_OR_RETURN(x.wk_, rows.FrozenWeight("wk"));
  // The LayerNorm runs in the model's dtype (its fp32 read is exact).
  LATHE_ASSIGN_OR_RETURN(at::Tensor norm_w, rows.Frozen("k_norm.weight"));
  LATHE_ASSIGN_OR_RETURN(at::Tensor norm_b, rows.Frozen("k_norm.bias"));
  x.k_norm_weight_ = norm_w.to(x.wk_.scalar_type());
  x.k_norm_bias_ = norm_b.to(x.wk_.scalar_type());
  // In the model's dtype: transformers' keep-in-fp32 list (indexer.weights_proj)
  // applies to float16 loads only, so under bf16 it computes this in bf16 too.
  LATHE_ASSIGN_OR_RETURN(x.weights_proj_, rows.FrozenWeight("weights_proj"));
  return x;
}

void SparseIndexer::Visit(const TensorVisitor& fn) {
  for (at::Tensor* t : {&wq_b_, &wk_, &k_norm_weight_, &k_norm_bias_, &weights_proj_}) fn(*t);
}

at::Tensor SparseIndexer::Rope(const at::Tensor& x, const RopeTables& rope) const {
  // Interleaved pairs, rotated as halves [x0 x2 ... | x1 x3 ...]: the order
  // transformers' interleaved rotation leaves them in (q and k alike).
  const int64_t r = x.size(-1);
  return ApplyRope(x.unflatten(-1, {r / 2, 2}).transpose(-1, -2).flatten(-2), rope);
}

at::Tensor SparseIndexer::Keys(const at::Tensor& x, const RopeTables& rope) const {
  const int64_t r = shape_.rope_dim, d = shape_.head_dim;
  at::Tensor k = at::layer_norm(at::matmul(x, wk_.t()), {d}, k_norm_weight_, k_norm_bias_, 1e-6);  // [T, D]
  return at::cat({Rope(k.narrow(1, 0, r), rope), k.narrow(1, r, d - r)}, 1);
}

std::pair<at::Tensor, at::Tensor> SparseIndexer::Queries(const at::Tensor& x, const at::Tensor& q_resid,
                                                         const RopeTables& rope) const {
  const SparseIndexerShape& s = shape_;
  const int64_t t = x.size(0), r = s.rope_dim, d = s.head_dim;
  at::Tensor q = at::matmul(q_resid, wq_b_.t()).view({t, s.heads, d}).transpose(0, 1);  // [H, T, D]
  q = at::cat({Rope(q.narrow(2, 0, r), rope), q.narrow(2, r, d - r)}, 2);
  at::Tensor w = at::matmul(x, weights_proj_.t()).to(at::kFloat).mul(1.0 / std::sqrt(static_cast<double>(s.heads)));
  return {q, w};
}

KeySelection SparseIndexer::Choose(const at::Tensor& q, const at::Tensor& w, const at::Tensor& k,
                                   int64_t first) const {
  const int64_t n = q.size(1), m = k.size(0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(shape_.head_dim));
  at::Tensor keys = k.to(at::kFloat).t();
  const at::TensorOptions longs = at::TensorOptions().dtype(at::kLong).device(q.device());
  at::Tensor key_positions = at::arange(m, longs).unsqueeze(0);  // [1, m]
  // A block of queries at a time: all heads' scores at once would be
  // heads·n·m fp32 values (32·8192² = 8.6 GB at GLM-5.2's width).
  const int64_t rows = std::max<int64_t>(1, kScoreBudget / (shape_.heads * m));
  // Allocated before the blocks' transients, so the kept indices do not end
  // up above them in the heap.
  KeySelection s;
  s.top = at::empty({n, shape_.topk}, at::TensorOptions().dtype(at::kInt).device(q.device()));
  s.first = first;
  s.queries = n;
  s.masked = true;
  for (int64_t begin = 0; begin < n; begin += rows) {
    const int64_t b = std::min(rows, n - begin);
    at::Tensor positions = at::arange(first + begin, first + begin + b, longs);
    at::Tensor causal = key_positions.le(positions.unsqueeze(1));  // [b, m]
    at::Tensor scores = at::relu(at::matmul(q.narrow(1, begin, b).to(at::kFloat), keys).mul(scale));  // [H, b, m]
    // Σ_h w_h(i)·score_h(i, j): per query, its head weights times its scores.
    at::Tensor index = at::bmm(w.narrow(0, begin, b).unsqueeze(1), scores.transpose(0, 1)).squeeze(1);  // [b, m]
    index = index.masked_fill(causal.logical_not(), -std::numeric_limits<double>::infinity());
    // A query with at most topk earlier keys keeps them all: masked keys
    // score -inf and fall below every visible one (and KeyMask drops them).
    s.top.narrow(0, begin, b).copy_(std::get<1>(index.topk(shape_.topk, -1)));
  }
  return s;
}

std::vector<KeySelection> SparseIndexer::Select(const at::Tensor& x, const at::Tensor& q_resid,
                                                const LayerContext& ctx, size_t layer) const {
  at::NoGradGuard no_grad;
  if (ctx.cp != nullptr) return SelectSplit(x, q_resid, ctx);
  const SparseIndexerShape& s = shape_;
  const int64_t t = x.size(0);
  std::vector<KeySelection> chosen(ctx.lengths.size());
  if (t == 0) return chosen;
  at::Tensor in = x.detach();
  at::Tensor k = Keys(in, ctx.rope);
  at::Tensor q, w;  // computed once some sequence has more keys than topk
  int64_t offset = 0;
  for (size_t i = 0; i < ctx.lengths.size(); ++i) {
    const int64_t n = ctx.lengths[i];
    at::Tensor keys = k.narrow(0, offset, n);
    int64_t past = 0;
    if (ctx.states != nullptr) {
      SequenceState& state = (*ctx.states)[i];
      if (state.layers.size() <= layer) state.layers.resize(layer + 1);
      std::vector<at::Tensor>& slot = state.layers[layer];
      if (slot.size() < 3) slot.resize(3);
      past = slot[2].defined() ? slot[2].size(0) : 0;
      keys = past > 0 ? at::cat({slot[2], keys}, 0) : keys.clone();
      slot[2] = keys;
    }
    if (n > 0 && past + n > s.topk) {
      if (!q.defined()) std::tie(q, w) = Queries(in, q_resid.detach(), ctx.rope);
      chosen[i] = Choose(q.narrow(1, offset, n), w.narrow(0, offset, n), keys, past);
    }
    offset += n;
  }
  return chosen;
}

std::vector<KeySelection> SparseIndexer::SelectSplit(const at::Tensor& x, const at::Tensor& q_resid,
                                                     const LayerContext& ctx) const {
  LATHE_CHECK(ctx.states == nullptr);
  const parallel::SequenceSplit& split = *ctx.cp;
  const std::vector<int64_t>& lengths = ctx.lengths;
  std::vector<KeySelection> chosen(split.chunks.size());
  // Every member sees the same lengths, so all skip the gather together.
  if (std::none_of(lengths.begin(), lengths.end(), [&](int64_t n) { return n > shape_.topk; })) return chosen;
  const int64_t t = x.size(0);
  at::Tensor in = x.detach();
  // Without rows there are no RoPE tables either; the gather still runs.
  at::Tensor k = t > 0 ? Keys(in, ctx.rope) : at::empty({0, shape_.head_dim}, wk_.options());
  at::Tensor all = parallel::GatherSequenceRows(k, split, ctx.shard->cp, /*sum_grads=*/false);  // [T_all, D]
  at::Tensor q, w;
  size_t i = 0;
  int64_t offset = 0;
  for (size_t j = 0; j < split.chunks.size(); ++j) {
    const parallel::SequenceSplit::Chunk& c = split.chunks[j];
    while (offset < c.seq_offset || lengths[i] == 0) offset += lengths[i++];  // c's sequence
    if (lengths[i] <= shape_.topk) continue;
    if (c.begin + c.length <= shape_.topk) {
      // Every causal key is kept, but as a mask: the sequence's chunks then
      // all run the masked SDPA the whole sequence runs without cp.
      chosen[j].first = c.begin;
      chosen[j].queries = c.length;
      chosen[j].masked = true;
      continue;
    }
    if (!q.defined()) std::tie(q, w) = Queries(in, q_resid.detach(), ctx.rope);
    // Keys past the chunk's last query are never causal: left out.
    chosen[j] = Choose(q.narrow(1, c.local, c.length), w.narrow(0, c.local, c.length),
                      all.narrow(0, c.seq_offset, c.begin + c.length), c.begin);
  }
  return chosen;
}

}  // namespace lathe::runtime
