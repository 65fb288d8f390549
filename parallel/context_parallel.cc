// Sequence splitting, the row gather and the attention of context parallelism.
#include "parallel/context_parallel.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace lathe::parallel {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

SequenceSplit SplitSequences(const std::vector<int64_t>& lengths, int parts, int rank) {
  SequenceSplit s;
  s.parts = parts;
  s.rank = rank;
  s.rows.resize(parts);
  const int chunks = 2 * parts;
  int64_t offset = 0;
  for (int64_t n : lengths) {
    for (int m = 0; m < parts; ++m) {
      // Chunk m lies before chunk 2·parts−1−m, so rows stay ascending.
      for (int c : {m, chunks - 1 - m}) {
        const int64_t b = PartBegin(n, chunks, c), e = PartBegin(n, chunks, c + 1);
        if (e == b) continue;
        if (m == rank) {
          s.chunks.push_back({offset, b, e - b, static_cast<int64_t>(s.rows[m].size())});
          for (int64_t p = b; p < e; ++p) s.positions.push_back(p);
        }
        for (int64_t p = b; p < e; ++p) s.rows[m].push_back(offset + p);
      }
    }
    offset += n;
  }
  s.total = offset;
  return s;
}

SequenceSplit SequenceSplit::Restrict(int64_t begin, int64_t n) const {
  SequenceSplit out;
  out.parts = parts;
  out.rank = rank;
  out.total = n;
  out.rows.resize(parts);
  for (int m = 0; m < parts; ++m) {
    for (int64_t r : rows[m]) {
      if (r >= begin && r < begin + n) out.rows[m].push_back(r - begin);
    }
  }
  return out;
}

int64_t SequenceSplit::LocalBegin(int64_t row) const {
  const std::vector<int64_t>& mine = own();
  return std::lower_bound(mine.begin(), mine.end(), row) - mine.begin();
}

namespace {

ElemType TypeOf(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kDouble: return ElemType::kFloat64;
    default: TORCH_CHECK(false, "context-parallel gather of unsupported dtype ", t.scalar_type());
  }
}

Buffer BufferOf(const at::Tensor& t) { return {t.data_ptr(), t.numel(), TypeOf(t)}; }

void Check(const absl::Status& s) { TORCH_CHECK(s.ok(), "collective failed: ", std::string(s.ToString())); }

// Where each member's rows go: member m's row i travels in slot m·widest + i
// of the gathered buffer; source[r] is the slot of global row r.
struct Slots {
  int64_t widest = 0;
  std::vector<int64_t> source;
};

Slots SlotsOf(const SequenceSplit& s) {
  Slots out;
  for (const auto& r : s.rows) out.widest = std::max<int64_t>(out.widest, static_cast<int64_t>(r.size()));
  out.source.assign(s.total, 0);
  for (int m = 0; m < s.parts; ++m) {
    for (size_t i = 0; i < s.rows[m].size(); ++i) out.source[s.rows[m][i]] = m * out.widest + static_cast<int64_t>(i);
  }
  return out;
}

struct SplitHolder : torch::CustomClassHolder {
  Group group;
  std::vector<int64_t> source, own;
  int64_t widest = 0;
  bool sum_grads = false;
};

std::vector<int64_t> Shaped(const at::Tensor& x, int64_t rows) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape[0] = rows;
  return shape;
}

at::Tensor IndexOf(const std::vector<int64_t>& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong));
}

struct GatherSeqFn : torch::autograd::Function<GatherSeqFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::IValue held) {
    ctx->saved_data["h"] = held;
    const SplitHolder& h = *static_cast<SplitHolder*>(held.toCapsule().get());
    const int n = h.group.size();
    at::Tensor padded = at::zeros(Shaped(x, h.widest), x.options());
    padded.narrow(0, 0, x.size(0)).copy_(x);
    at::Tensor all = at::empty(Shaped(x, h.widest * n), x.options());
    if (padded.numel() > 0) Check(h.group.comm->AllGather(BufferOf(padded), BufferOf(all), h.group.timeout));
    return all.index_select(0, IndexOf(h.source).to(x.device()));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SplitHolder& h = *static_cast<SplitHolder*>(ctx->saved_data["h"].toCapsule().get());
    at::Tensor g = grads[0].contiguous();
    if (!h.sum_grads) return {g.index_select(0, IndexOf(h.own).to(g.device())), at::Tensor()};
    const int n = h.group.size();
    at::Tensor slots = at::zeros(Shaped(g, h.widest * n), g.options());
    slots.index_copy_(0, IndexOf(h.source).to(g.device()), g);
    at::Tensor mine = at::empty(Shaped(g, h.widest), g.options());
    if (mine.numel() > 0) Check(h.group.comm->ReduceScatterSum(BufferOf(slots), BufferOf(mine), h.group.timeout));
    return {mine.narrow(0, 0, static_cast<int64_t>(h.own.size())), at::Tensor()};
  }
};

}  // namespace

at::Tensor GatherSequenceRows(const at::Tensor& x, const SequenceSplit& split, const Group& g, bool sum_grads) {
  if (!g.active()) return x;
  // Communicators carry no bf16: bf16 rows travel as fp32 (exact).
  if (x.scalar_type() == at::kBFloat16) return GatherSequenceRows(x.to(at::kFloat), split, g, sum_grads).to(x.scalar_type());
  TORCH_CHECK(x.size(0) == static_cast<int64_t>(split.own().size()), "context-parallel gather of ", x.size(0),
              " rows, the split gives this rank ", split.own().size());
  Slots slots = SlotsOf(split);
  auto h = c10::make_intrusive<SplitHolder>();
  h->group = g;
  h->source = std::move(slots.source);
  h->own = split.own();
  h->widest = slots.widest;
  h->sum_grads = sum_grads;
  return GatherSeqFn::apply(x.contiguous(), c10::IValue::make_capsule(std::move(h)));
}

namespace {

// Attention of queries q [1, nH, L, D] at positions [b, b + L) over the keys
// [0, b) without a mask (kp, vp [1, nKV, b, D]) and [b, b + L) causally (kd,
// vd [1, nKV, L, D]): two flash-attention calls merged by log-sum-exp.
struct PrefixChunkFn : torch::autograd::Function<PrefixChunkFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                            const at::Tensor& kd, const at::Tensor& vd, double scale) {
    auto [o1, l1] = at::_scaled_dot_product_flash_attention_for_cpu(q, kp, vp, 0.0, false, {}, scale);
    auto [o2, l2] = at::_scaled_dot_product_flash_attention_for_cpu(q, kd, vd, 0.0, true, {}, scale);
    at::Tensor lse = at::logaddexp(l1, l2);
    // The merge weights are fp32: the output comes back in q's dtype (bf16 runs).
    at::Tensor o = (o1 * (l1 - lse).exp().unsqueeze(-1) + o2 * (l2 - lse).exp().unsqueeze(-1)).to(q.scalar_type());
    ctx->save_for_backward({q, kp, vp, kd, vd, o, lse});
    ctx->saved_data["scale"] = scale;
    return o;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    at::Tensor g = grads[0].contiguous();
    // With the merged output and log-sum-exp, each part's flash backward
    // computes the probabilities and row terms of the whole softmax.
    auto [dq1, dkp, dvp] =
        at::_scaled_dot_product_flash_attention_for_cpu_backward(g, s[0], s[1], s[2], s[5], s[6], 0.0, false, {}, scale);
    auto [dq2, dkd, dvd] =
        at::_scaled_dot_product_flash_attention_for_cpu_backward(g, s[0], s[3], s[4], s[5], s[6], 0.0, true, {}, scale);
    return {dq1 + dq2, dkp, dvp, dkd, dvd, at::Tensor()};
  }
};

// Queries of chunk c over their sequence's keys up to themselves.
at::Tensor ChunkAttention(const at::Tensor& qc, const at::Tensor& k_all, const at::Tensor& v_all,
                          const SequenceSplit::Chunk& c, double scale, bool gqa) {
  if (c.begin == 0) {
    at::Tensor kc = k_all.narrow(1, c.seq_offset, c.length).unsqueeze(0);
    at::Tensor vc = v_all.narrow(1, c.seq_offset, c.length).unsqueeze(0);
    return at::scaled_dot_product_attention(qc, kc, vc, {}, 0.0, /*is_causal=*/true, scale, gqa);
  }
  if (qc.is_cpu()) {
    auto part = [&](const at::Tensor& t, int64_t from, int64_t n) {
      return t.narrow(1, c.seq_offset + from, n).unsqueeze(0);
    };
    return PrefixChunkFn::apply(qc.contiguous(), part(k_all, 0, c.begin), part(v_all, 0, c.begin),
                                part(k_all, c.begin, c.length), part(v_all, c.begin, c.length), scale);
  }
  // Query j (position begin + j) sees keys 0 .. begin + j.
  const int64_t keys = c.begin + c.length;
  at::Tensor allowed = at::ones({c.length, keys}, qc.options().dtype(at::kBool)).tril(c.begin);
  at::Tensor kc = k_all.narrow(1, c.seq_offset, keys).unsqueeze(0);
  at::Tensor vc = v_all.narrow(1, c.seq_offset, keys).unsqueeze(0);
  return at::scaled_dot_product_attention(qc, kc, vc, allowed, 0.0, false, scale, gqa);
}

}  // namespace

at::Tensor ContextParallelAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const SequenceSplit& split, double scale, bool gqa, const Group& g,
                                    const std::vector<at::Tensor>& masks) {
  TORCH_CHECK(masks.empty() || masks.size() == split.chunks.size(), "context-parallel attention given ",
              masks.size(), " masks for ", split.chunks.size(), " chunks");
  return ContextParallelAttention(q, k, v, split, scale, gqa, g,
                                  [&masks](size_t i) { return i < masks.size() ? masks[i] : at::Tensor(); });
}

at::Tensor ContextParallelAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const SequenceSplit& split, double scale, bool gqa, const Group& g,
                                    const std::function<at::Tensor(size_t)>& mask_of) {
  // One gather for keys and values: rows [t, 2, nKV, D].
  at::Tensor kv = GatherSequenceRows(at::stack({k.transpose(0, 1), v.transpose(0, 1)}, 1), split, g, true);
  at::Tensor k_all = kv.select(1, 0).transpose(0, 1), v_all = kv.select(1, 1).transpose(0, 1);
  if (split.chunks.empty()) {
    // No rows here: the gather's backward must still run on this member.
    return (q.sum() + kv.sum()).expand({q.size(0), 0, q.size(2)});
  }
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < split.chunks.size(); ++i) {
    const SequenceSplit::Chunk& c = split.chunks[i];
    at::Tensor qc = q.narrow(1, c.local, c.length).unsqueeze(0);
    at::Tensor mask = mask_of(i);
    if (mask.defined()) {
      at::Tensor kc = k_all.narrow(1, c.seq_offset, c.begin + c.length).unsqueeze(0);
      at::Tensor vc = v_all.narrow(1, c.seq_offset, c.begin + c.length).unsqueeze(0);
      parts.push_back(at::scaled_dot_product_attention(qc, kc, vc, mask, 0.0, false, scale, gqa).squeeze(0));
    } else {
      parts.push_back(ChunkAttention(qc, k_all, v_all, c, scale, gqa).squeeze(0));
    }
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 1);
}

}  // namespace lathe::parallel
