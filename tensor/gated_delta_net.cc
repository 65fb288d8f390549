// The Gated DeltaNet mixer's math (see gated_delta_net.h), laid out so that one pass over
// packed sequences costs what one pass over their concatenation would: every chunk-local
// quantity is computed for all chunks of all sequences in one batch of ops, and the only
// loop is the scan over chunk positions, each step batching the sequences still running.
#include "tensor/gated_delta_net.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace lathe::runtime {
namespace {

// Where each token and chunk of the packed sequences lives.
//
// Each sequence is cut into chunks of `chunk` tokens (its last chunk zero-padded). The
// chunks are stored step-major: first chunk 0 of every sequence, then chunk 1 of those that
// have one, ... with the sequences ordered by descending chunk count, so the sequences still
// running at scan step j are a prefix and their chunks are contiguous.
struct Layout {
  int64_t tokens = 0;
  int64_t chunk = 0;
  int64_t num_chunks = 0;
  std::vector<int64_t> order;            // sequences by descending chunk count (stable)
  std::vector<int64_t> active;           // [step]: sequences with a chunk at that step
  std::vector<int64_t> step_offset;      // [step]: first chunk of that step
  std::vector<int64_t> padded_position;  // [T]: token -> row of the chunked layout
  bool in_order = false;                 // padded_position[i] == i (one sequence)
};

Layout MakeLayout(const std::vector<int64_t>& lengths, int64_t chunk_size) {
  Layout lay;
  const int64_t n = static_cast<int64_t>(lengths.size());
  int64_t longest = 0;
  for (int64_t len : lengths) {
    lay.tokens += len;
    longest = std::max(longest, len);
  }
  // Decode steps (a few tokens per sequence) need no 64-token padding; the rule's result
  // does not depend on the chunk size beyond rounding.
  lay.chunk = std::max<int64_t>(1, std::min(chunk_size, longest));
  std::vector<int64_t> chunks(n);
  for (int64_t s = 0; s < n; ++s) chunks[s] = (lengths[s] + lay.chunk - 1) / lay.chunk;
  lay.order.resize(n);
  std::iota(lay.order.begin(), lay.order.end(), 0);
  std::stable_sort(lay.order.begin(), lay.order.end(),
                   [&](int64_t x, int64_t y) { return chunks[x] > chunks[y]; });
  std::vector<int64_t> rank(n);
  for (int64_t i = 0; i < n; ++i) rank[lay.order[i]] = i;
  const int64_t steps = n == 0 ? 0 : chunks[lay.order[0]];
  for (int64_t j = 0; j < steps; ++j) {
    int64_t count = 0;
    while (count < n && chunks[lay.order[count]] > j) ++count;
    lay.step_offset.push_back(lay.num_chunks);
    lay.active.push_back(count);
    lay.num_chunks += count;
  }
  lay.padded_position.reserve(lay.tokens);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t p = 0; p < lengths[s]; ++p) {
      const int64_t chunk_id = lay.step_offset[p / lay.chunk] + rank[s];
      lay.padded_position.push_back(chunk_id * lay.chunk + p % lay.chunk);
    }
  }
  lay.in_order = n == 1;
  return lay;
}

at::Tensor IndexTensor(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
}

void CheckShape(const at::Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.defined(), "GatedDeltaNet: ", name, " is undefined");
  TORCH_CHECK(t.sizes() == want, "GatedDeltaNet: ", name, " has shape ", t.sizes(), ", expected ", want);
}

void CheckArguments(const GdnDims& d, const GdnWeights& w, const GdnInputs& in,
                    const std::vector<int64_t>& lengths, const std::vector<GdnState>* states) {
  TORCH_CHECK(d.num_k_heads > 0 && d.num_v_heads > 0 && d.head_k_dim > 0 && d.head_v_dim > 0 &&
                  d.conv_kernel > 0 && d.chunk_size > 0,
              "GatedDeltaNet: head counts, head dims, conv_kernel and chunk_size must be positive");
  TORCH_CHECK(d.num_v_heads % d.num_k_heads == 0, "GatedDeltaNet: num_v_heads ", d.num_v_heads,
              " is not a multiple of num_k_heads ", d.num_k_heads);
  int64_t total = 0;
  for (size_t s = 0; s < lengths.size(); ++s) {
    TORCH_CHECK(lengths[s] >= 1, "GatedDeltaNet: lengths[", s, "] = ", lengths[s], " (must be >= 1)");
    total += lengths[s];
  }
  CheckShape(in.qkv, {total, d.conv_dim()}, "qkv");
  CheckShape(in.z, {total, d.value_dim()}, "z");
  CheckShape(in.b, {total, d.num_v_heads}, "b");
  CheckShape(in.a, {total, d.num_v_heads}, "a");
  TORCH_CHECK(w.conv_weight.defined() && w.conv_weight.numel() == d.conv_dim() * d.conv_kernel &&
                  w.conv_weight.size(0) == d.conv_dim() && w.conv_weight.size(-1) == d.conv_kernel,
              "GatedDeltaNet: conv_weight has shape ", w.conv_weight.sizes(), ", expected [", d.conv_dim(),
              ", ", d.conv_kernel, "] or [", d.conv_dim(), ", 1, ", d.conv_kernel, "]");
  CheckShape(w.a_log, {d.num_v_heads}, "a_log");
  CheckShape(w.dt_bias, {d.num_v_heads}, "dt_bias");
  CheckShape(w.norm_weight, {d.head_v_dim}, "norm_weight");
  if (states == nullptr) return;
  TORCH_CHECK(states->size() == lengths.size(), "GatedDeltaNet: ", states->size(), " states for ",
              lengths.size(), " sequences");
  for (const GdnState& st : *states) {
    CheckShape(st.conv, {d.conv_kernel - 1, d.conv_dim()}, "state.conv");
    CheckShape(st.recurrent, {d.num_v_heads, d.head_k_dim, d.head_v_dim}, "state.recurrent");
  }
}

// Depthwise conv over the rows of x [E, C] with `pad` zero rows on both sides, in the weight's
// dtype as transformers computes it: [C, E + 2 pad - K + 1].
at::Tensor DepthwiseConv(const at::Tensor& x, const at::Tensor& weight, int64_t pad) {
  const int64_t channels = x.size(-1), kernel = weight.size(-1);
  const at::Tensor in = x.dim() == 2 ? x.t().unsqueeze(0) : x.transpose(1, 2);
  const at::Tensor y = at::conv1d(in.to(weight.scalar_type()), weight.reshape({channels, 1, kernel}),
                                  /*bias=*/std::nullopt, /*stride=*/at::IntArrayRef{1},
                                  /*padding=*/at::IntArrayRef{pad}, /*dilation=*/at::IntArrayRef{1}, channels);
  return x.dim() == 2 ? y.squeeze(0) : y;
}

// Causal conv of packed sequences that start from zeros: one conv over all rows, then the
// first K-1 outputs of every later sequence (which saw its predecessor's last rows)
// recomputed from zeros and its own first rows. Returns [C, T].
at::Tensor PackedConv(const at::Tensor& qkv, const at::Tensor& weight, const std::vector<int64_t>& lengths) {
  const int64_t t = qkv.size(0), hist = weight.size(-1) - 1, n = static_cast<int64_t>(lengths.size());
  const at::Tensor all = DepthwiseConv(qkv, weight, hist).narrow(1, 0, t);
  if (n == 1 || hist == 0) return all;
  std::vector<int64_t> heads, valid, rows;  // the first K-1 rows of sequences 1..N-1
  int64_t start = lengths[0];
  for (int64_t s = 1; s < n; ++s) {
    for (int64_t r = 0; r < hist; ++r) {
      heads.push_back(std::min(start + r, t - 1));  // rows past the end only feed unused outputs
      if (r < lengths[s]) {
        valid.push_back((s - 1) * hist + r);
        rows.push_back(start + r);
      }
    }
    start += lengths[s];
  }
  const at::Device device = qkv.device();
  const at::Tensor firsts = qkv.index_select(0, IndexTensor(heads, device)).view({n - 1, hist, qkv.size(1)});
  const at::Tensor fixed = DepthwiseConv(firsts, weight, hist).narrow(2, 0, hist);  // [N-1, C, K-1]
  const at::Tensor picked = fixed.transpose(0, 1).reshape({qkv.size(1), -1}).index_select(1, IndexTensor(valid, device));
  return all.index_copy(1, IndexTensor(rows, device), picked);
}

// Causal conv of sequences continuing from `history` [N*(K-1), C] (their states' windows):
// each over [its history; its rows]. Sets *windows to the new windows [N*(K-1), C].
// Returns [C, T].
at::Tensor ContinuedConv(const at::Tensor& qkv, const at::Tensor& weight, const at::Tensor& history,
                         const std::vector<int64_t>& lengths, at::Tensor* windows) {
  const int64_t n = static_cast<int64_t>(lengths.size()), hist = weight.size(-1) - 1;
  std::vector<int64_t> ext_index, out_index, window_index;
  int64_t token = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t ext_start = static_cast<int64_t>(ext_index.size());
    for (int64_t r = 0; r < hist; ++r) ext_index.push_back(s * hist + r);
    for (int64_t p = 0; p < lengths[s]; ++p) {
      ext_index.push_back(n * hist + token + p);
      out_index.push_back(ext_start + p);
    }
    for (int64_t r = 0; r < hist; ++r) window_index.push_back(ext_start + lengths[s] + r);
    token += lengths[s];
  }
  const at::Device device = qkv.device();
  const at::Tensor source = hist > 0 ? at::cat({history, qkv}, 0) : qkv;
  // One sequence: [history; rows] is already its extended input, in order.
  const at::Tensor ext = n == 1 ? source : source.index_select(0, IndexTensor(ext_index, device));  // [E, C]
  *windows = n == 1 ? ext.narrow(0, lengths[0], hist) : ext.index_select(0, IndexTensor(window_index, device));
  const at::Tensor y = DepthwiseConv(ext, weight, 0);
  return n == 1 ? y : y.index_select(1, IndexTensor(out_index, device));
}

// Causal depthwise conv + SiLU of each sequence (see PackedConv, ContinuedConv): [T, C] in
// qkv's dtype. `history` undefined: every sequence starts from zeros.
at::Tensor CausalConv(const at::Tensor& qkv, const at::Tensor& weight, const at::Tensor& history,
                      const std::vector<int64_t>& lengths, at::Tensor* windows) {
  const at::Tensor y = history.defined() ? ContinuedConv(qkv, weight, history, lengths, windows)
                                         : PackedConv(qkv, weight, lengths);
  return at::silu(y.t()).to(qkv.scalar_type());
}

// x * rsqrt(sum(x^2) + 1e-6) over the last dim.
at::Tensor L2Norm(const at::Tensor& x) {
  return x * at::rsqrt((x * x).sum(-1, /*keepdim=*/true) + 1e-6);
}

// [T, H, ...] token rows -> [num_chunks, H, chunk, ...] in the layout's chunk order, zero padded.
at::Tensor ToChunks(const at::Tensor& x, const Layout& lay, const at::Tensor& position) {
  std::vector<int64_t> padded_shape = x.sizes().vec();
  padded_shape[0] = lay.num_chunks * lay.chunk;
  at::Tensor padded;
  if (lay.in_order) {  // one sequence: zeros after its end
    std::vector<int64_t> pad(2 * (x.dim() - 1), 0);
    pad.push_back(0);
    pad.push_back(padded_shape[0] - x.size(0));
    padded = padded_shape[0] == x.size(0) ? x : at::constant_pad_nd(x, pad);
  } else {
    padded = at::zeros(padded_shape, x.options()).index_copy(0, position, x);
  }
  std::vector<int64_t> chunked = {lay.num_chunks, lay.chunk};
  chunked.insert(chunked.end(), padded_shape.begin() + 1, padded_shape.end());
  return padded.view(chunked).transpose(1, 2).contiguous();
}

struct RuleResult {
  at::Tensor out;                 // [T, Hv, Dv] fp32
  std::vector<at::Tensor> final;  // [N] of [Hv, Dk, Dv], by sequence
};

// The chunked gated delta rule (fp32). q already normalised and scaled; q, k [T, H, Dk],
// v [T, H, Dv], g, beta [T, H]; `initial` [N, H, Dk, Dv] in sequence order.
RuleResult ChunkedDeltaRule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& g, const at::Tensor& beta, const at::Tensor& initial,
                            const Layout& lay) {
  const at::Tensor position = IndexTensor(lay.padded_position, q.device());
  const at::Tensor qc = ToChunks(q, lay, position), kc = ToChunks(k, lay, position);
  const at::Tensor vc = ToChunks(v, lay, position);
  const at::Tensor gc = ToChunks(g, lay, position), bc = ToChunks(beta, lay, position).unsqueeze(-1);
  const int64_t c = lay.chunk, dv = v.size(-1);

  // Chunk-local quantities, all chunks at once. decay[i][j] = exp(cum_i - cum_j), j <= i.
  const at::Tensor cum = gc.cumsum(-1);  // [Nc, H, C]
  const at::Tensor upper = at::ones({c, c}, q.options().dtype(at::kBool)).triu(1);
  const at::Tensor decay =
      (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, -std::numeric_limits<float>::infinity()).exp();
  const at::Tensor k_beta = kc * bc;
  const at::Tensor ut = at::matmul(k_beta, kc.transpose(-1, -2)) * decay;
  const at::Tensor intra = at::matmul(qc, kc.transpose(-1, -2)) * decay;
  const at::Tensor cum_exp = cum.exp().unsqueeze(-1);
  // (I + strictly_lower(ut))^-1 [v beta | k beta exp(cum)] in one solve.
  const at::Tensor solved = at::linalg_solve_triangular(ut, at::cat({vc * bc, k_beta * cum_exp}, -1),
                                                        /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  const at::Tensor u = solved.narrow(-1, 0, dv), w = solved.narrow(-1, dv, solved.size(-1) - dv);
  const at::Tensor q_decayed = qc * cum_exp;
  const at::Tensor last = cum.narrow(-1, c - 1, 1);
  const at::Tensor k_decayed_t = (kc * (last - cum).exp().unsqueeze(-1)).transpose(-1, -2);
  const at::Tensor chunk_decay = last.exp().unsqueeze(-1);  // [Nc, H, 1, 1]

  // The scan: the state of the sequences still running, in the layout's order.
  at::Tensor state = initial.index_select(0, IndexTensor(lay.order, q.device()));
  RuleResult result;
  result.final.resize(lay.order.size());
  auto retire = [&](int64_t keep) {
    for (int64_t i = keep; i < state.size(0); ++i) result.final[lay.order[i]] = state[i];
    state = state.narrow(0, 0, keep);
  };
  // Each operand split once into its per-step blocks: the backward of one split is one
  // concatenation, where per-step slices would each scatter into a zeroed full-size gradient.
  auto steps = [&](const at::Tensor& x) { return at::split_with_sizes(x, lay.active, 0); };
  const std::vector<at::Tensor> u_s = steps(u), w_s = steps(w), q_s = steps(q_decayed), a_s = steps(intra),
                                k_s = steps(k_decayed_t), d_s = steps(chunk_decay);
  std::vector<at::Tensor> outs;
  outs.reserve(lay.active.size());
  for (size_t j = 0; j < lay.active.size(); ++j) {
    if (lay.active[j] < state.size(0)) retire(lay.active[j]);
    const at::Tensor v_new = u_s[j] - at::matmul(w_s[j], state);
    outs.push_back(at::matmul(q_s[j], state) + at::matmul(a_s[j], v_new));
    state = state * d_s[j] + at::matmul(k_s[j], v_new);
  }
  retire(0);
  // [Nc, H, C, Dv] -> token rows [T, H, Dv].
  const at::Tensor all = at::cat(outs, 0).transpose(1, 2).reshape({lay.num_chunks * c, v.size(1), dv});
  result.out = lay.in_order ? all.narrow(0, 0, lay.tokens) : all.index_select(0, position);
  return result;
}

// The dtype of the state and the delta rule: fp32, or fp64 for fp64 inputs.
at::ScalarType WideType(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// RMSNorm(x) * weight * silu(z) per value head, with transformers' casts: x normalised in
// fp32, cast to its dtype before the weight, the gate in fp32.
at::Tensor GatedRmsNorm(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight, double eps) {
  const at::Tensor xf = x.to(WideType(x));
  const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (weight * normed.to(x.scalar_type()) * at::silu(z.to(WideType(x)))).to(x.scalar_type());
}

// The delta rule's operands in the wide dtype, per value head: [T, Hv, D] and [T, Hv].
struct RuleInputs {
  at::Tensor q, k, v, g, beta;
};

RuleInputs PrepareRule(const GdnDims& dims, const at::Tensor& mixed, const GdnInputs& in, const GdnWeights& w) {
  const at::ScalarType wide = WideType(mixed);
  const int64_t t = mixed.size(0), hk = dims.num_k_heads, dk = dims.head_k_dim, kd = dims.key_dim();
  const int64_t repeat = dims.num_v_heads / hk;
  // Normalised per key head, then repeated: the same values as repeating first.
  auto heads = [&](const at::Tensor& x) { return repeat == 1 ? x : x.repeat_interleave(repeat, 1); };
  RuleInputs r;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  r.q = heads(L2Norm(mixed.narrow(1, 0, kd).reshape({t, hk, dk}).to(wide)) * scale);
  r.k = heads(L2Norm(mixed.narrow(1, kd, kd).reshape({t, hk, dk}).to(wide)));
  r.v = mixed.narrow(1, 2 * kd, dims.value_dim()).reshape({t, dims.num_v_heads, dims.head_v_dim}).to(wide);
  r.beta = at::sigmoid(in.b).to(wide);
  r.g = -w.a_log.to(wide).exp() * at::softplus(in.a.to(wide) + w.dt_bias);
  return r;
}

// One decode step of N continued sequences, one token each, on the CPU without autograd:
// the recurrent form of the rule (the chunked form at one token), as loops. Each sequence's
// conv and each (sequence, value head)'s rule are computed by one thread in a fixed order,
// so a sequence's bits depend on nothing but its own inputs and state: neither its company
// nor the thread count. Values are rounded to T where the packed path rounds them: the conv
// and its SiLU (in the conv weight's dtype), beta, the core output, the normalised output
// and its product with a norm weight of type T, and the gated result.
template <typename T, typename Wide>
at::Tensor DecodeStepCpu(const GdnDims& d, const GdnWeights& w, const GdnInputs& in, std::vector<GdnState>& states) {
  const int64_t n = in.qkv.size(0), channels = d.conv_dim(), kernel = d.conv_kernel, hist = kernel - 1;
  const int64_t hk = d.num_k_heads, hv = d.num_v_heads, dk = d.head_k_dim, dv = d.head_v_dim;
  const int64_t repeat = hv / hk, kd = d.key_dim();
  const at::ScalarType type = in.qkv.scalar_type(), wide = WideType(in.qkv);
  const at::TensorOptions wide_options = in.qkv.options().dtype(wide);
  const at::Tensor qkv = in.qkv.contiguous(), b = in.b.contiguous();
  const at::Tensor z = in.z.to(wide).contiguous(), a = in.a.to(wide).contiguous();
  const bool round_conv = w.conv_weight.scalar_type() == type;
  const bool round_weighted = w.norm_weight.scalar_type() == type;
  const at::Tensor conv_w = w.conv_weight.reshape({channels, kernel}).to(wide).contiguous();
  const at::Tensor a_log = w.a_log.to(wide).contiguous(), dt_bias = w.dt_bias.to(wide).contiguous();
  const at::Tensor norm_w = w.norm_weight.to(wide).contiguous();
  auto to_t = [](Wide x) { return static_cast<Wide>(static_cast<T>(x)); };
  auto silu = [](Wide x) { return x / (Wide(1) + std::exp(-x)); };

  std::vector<at::Tensor> old_windows(n), windows(n), recurrent(n);
  for (int64_t s = 0; s < n; ++s) {
    old_windows[s] = states[s].conv.to(type).contiguous();
    windows[s] = at::empty({hist, channels}, in.qkv.options());
    recurrent[s] = states[s].recurrent.to(wide).clone();
  }
  at::Tensor mixed = at::empty({n, channels}, in.qkv.options());
  at::Tensor qn = at::empty({n, hk, dk}, wide_options), kn = at::empty({n, hk, dk}, wide_options);
  const Wide scale = Wide(1) / std::sqrt(static_cast<Wide>(dk));
  // Per sequence: the conv over [window; token] and the new window; q and k normalised.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const T* win = old_windows[s].data_ptr<T>();
      const T* x = qkv.data_ptr<T>() + s * channels;
      const Wide* cw = conv_w.data_ptr<Wide>();
      T* mix = mixed.data_ptr<T>() + s * channels;
      for (int64_t c = 0; c < channels; ++c) {
        Wide y = 0;
        for (int64_t t = 0; t < hist; ++t) y += cw[c * kernel + t] * static_cast<Wide>(win[t * channels + c]);
        y += cw[c * kernel + hist] * static_cast<Wide>(x[c]);
        if (round_conv) y = to_t(y);
        mix[c] = static_cast<T>(silu(y));
      }
      T* next = windows[s].data_ptr<T>();
      if (hist > 1) std::copy(win + channels, win + hist * channels, next);
      if (hist > 0) std::copy(x, x + channels, next + (hist - 1) * channels);
      for (int64_t h = 0; h < hk; ++h) {
        for (int part = 0; part < 2; ++part) {
          const T* src = mix + part * kd + h * dk;
          Wide* dst = (part == 0 ? qn : kn).data_ptr<Wide>() + (s * hk + h) * dk;
          Wide sq = 0;
          for (int64_t i = 0; i < dk; ++i) {
            dst[i] = static_cast<Wide>(src[i]);
            sq += dst[i] * dst[i];
          }
          const Wide inv = Wide(1) / std::sqrt(sq + Wide(1e-6));
          const Wide factor = part == 0 ? scale : Wide(1);
          for (int64_t i = 0; i < dk; ++i) dst[i] = dst[i] * inv * factor;
        }
      }
    }
  });
  // Per (sequence, value head): the gated delta rule, then RMSNorm(core) * weight * silu(z).
  at::Tensor out = at::empty({n, hv * dv}, in.qkv.options());
  at::parallel_for(0, n * hv, 1, [&](int64_t begin, int64_t end) {
    std::vector<Wide> kv(dv), o(dv);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / hv, h = job % hv, key_head = h / repeat;
      const Wide* q = qn.data_ptr<Wide>() + (s * hk + key_head) * dk;
      const Wide* k = kn.data_ptr<Wide>() + (s * hk + key_head) * dk;
      const T* v = mixed.data_ptr<T>() + s * channels + 2 * kd + h * dv;
      const Wide beta = to_t(Wide(1) / (Wide(1) + std::exp(-static_cast<Wide>(b.data_ptr<T>()[s * hv + h]))));
      const Wide x = a.data_ptr<Wide>()[s * hv + h] + dt_bias.data_ptr<Wide>()[h];
      const Wide softplus = x > Wide(20) ? x : std::log1p(std::exp(x));
      const Wide decay = std::exp(-std::exp(a_log.data_ptr<Wide>()[h]) * softplus);
      Wide* st = recurrent[s].data_ptr<Wide>() + h * dk * dv;  // [Dk, Dv]
      std::fill(kv.begin(), kv.end(), Wide(0));
      for (int64_t i = 0; i < dk; ++i) {
        Wide* row = st + i * dv;
        for (int64_t j = 0; j < dv; ++j) {
          row[j] *= decay;
          kv[j] += row[j] * k[i];
        }
      }
      for (int64_t j = 0; j < dv; ++j) kv[j] = (static_cast<Wide>(v[j]) - kv[j]) * beta;
      std::fill(o.begin(), o.end(), Wide(0));
      for (int64_t i = 0; i < dk; ++i) {
        Wide* row = st + i * dv;
        for (int64_t j = 0; j < dv; ++j) {
          row[j] += k[i] * kv[j];
          o[j] += row[j] * q[i];
        }
      }
      Wide sq = 0;
      for (int64_t j = 0; j < dv; ++j) {
        o[j] = to_t(o[j]);
        sq += o[j] * o[j];
      }
      const Wide inv = Wide(1) / std::sqrt(sq / static_cast<Wide>(dv) + static_cast<Wide>(d.norm_eps));
      const Wide* gate = z.data_ptr<Wide>() + s * hv * dv + h * dv;
      const Wide* nw = norm_w.data_ptr<Wide>();
      T* dst = out.data_ptr<T>() + s * hv * dv + h * dv;
      for (int64_t j = 0; j < dv; ++j) {
        Wide weighted = nw[j] * to_t(o[j] * inv);
        if (round_weighted) weighted = to_t(weighted);
        dst[j] = static_cast<T>(weighted * silu(gate[j]));
      }
    }
  });
  for (int64_t s = 0; s < n; ++s) {
    states[s].conv = windows[s];
    states[s].recurrent = recurrent[s];
  }
  return out;
}

// Whether DecodeStepCpu serves this call: continued sequences of one token each, on the
// CPU, in a dtype it is written for, with nothing to differentiate.
bool IsCpuDecodeStep(const GdnInputs& in, const GdnWeights& w, const std::vector<int64_t>& lengths,
                     const std::vector<GdnState>* states) {
  if (states == nullptr || !in.qkv.device().is_cpu()) return false;
  if (!std::all_of(lengths.begin(), lengths.end(), [](int64_t l) { return l == 1; })) return false;
  const at::ScalarType t = in.qkv.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kDouble) return false;
  for (const at::Tensor& x : {in.z, in.b, in.a}) {
    if (x.scalar_type() != t) return false;
  }
  for (const at::Tensor& x : {w.conv_weight, w.a_log, w.dt_bias, w.norm_weight}) {
    if (x.scalar_type() != t && x.scalar_type() != at::kFloat) return false;
  }
  if (!at::GradMode::is_enabled()) return true;
  for (const at::Tensor& x : {in.qkv, in.z, in.b, in.a, w.conv_weight, w.a_log, w.dt_bias, w.norm_weight}) {
    if (x.requires_grad()) return false;
  }
  for (const GdnState& st : *states) {
    if (st.recurrent.requires_grad() || st.conv.requires_grad()) return false;
  }
  return true;
}

}  // namespace

GdnState GdnInitialState(const GdnDims& dims, const at::Tensor& like) {
  GdnState st;
  st.conv = at::zeros({dims.conv_kernel - 1, dims.conv_dim()}, like.options());
  st.recurrent = at::zeros({dims.num_v_heads, dims.head_k_dim, dims.head_v_dim}, like.options().dtype(WideType(like)));
  return st;
}

at::Tensor GatedDeltaNet(const GdnDims& dims, const GdnWeights& weights, const GdnInputs& inputs,
                         const std::vector<int64_t>& lengths, std::vector<GdnState>* states) {
  CheckArguments(dims, weights, inputs, lengths, states);
  if (IsCpuDecodeStep(inputs, weights, lengths, states)) {
    switch (inputs.qkv.scalar_type()) {
      case at::kFloat:
        return DecodeStepCpu<float, float>(dims, weights, inputs, *states);
      case at::kBFloat16:
        return DecodeStepCpu<at::BFloat16, float>(dims, weights, inputs, *states);
      default:
        return DecodeStepCpu<double, double>(dims, weights, inputs, *states);
    }
  }
  if (states != nullptr && lengths.size() > 1) {
    // Continued sequences (decoding) each alone: one packed pass would run the conv over
    // their concatenation and the scan's products over a batch of all of them, whose kernels
    // (BLAS, oneDNN, cuDNN) choose their blocking, and so their rounding, by the batch; alone,
    // a sequence's bits do not depend on which others decode beside it.
    std::vector<at::Tensor> outs;
    int64_t offset = 0;
    for (size_t s = 0; s < lengths.size(); ++s) {
      const int64_t len = lengths[s];
      const GdnInputs one{inputs.qkv.narrow(0, offset, len), inputs.z.narrow(0, offset, len),
                          inputs.b.narrow(0, offset, len), inputs.a.narrow(0, offset, len)};
      std::vector<GdnState> state = {(*states)[s]};
      outs.push_back(GatedDeltaNet(dims, weights, one, {len}, &state));
      (*states)[s] = std::move(state[0]);
      offset += len;
    }
    return at::cat(outs, 0);
  }
  const int64_t t = inputs.qkv.size(0), n = static_cast<int64_t>(lengths.size());
  const int64_t hv = dims.num_v_heads, dk = dims.head_k_dim, dv = dims.head_v_dim;
  if (n == 0) return at::zeros({0, dims.value_dim()}, inputs.qkv.options());
  const Layout lay = MakeLayout(lengths, dims.chunk_size);
  const at::ScalarType wide = WideType(inputs.qkv);

  at::Tensor history, initial;  // undefined history: zeros
  if (states != nullptr) {
    std::vector<at::Tensor> convs, recs;
    for (const GdnState& st : *states) {
      convs.push_back(st.conv.to(inputs.qkv.scalar_type()));
      recs.push_back(st.recurrent.to(wide));
    }
    history = at::cat(convs, 0);
    initial = at::stack(recs, 0);
  } else {
    initial = at::zeros({n, hv, dk, dv}, inputs.qkv.options().dtype(wide));
  }

  at::Tensor windows;
  const at::Tensor mixed =
      CausalConv(inputs.qkv, weights.conv_weight, history, lengths, states != nullptr ? &windows : nullptr);
  const RuleInputs ri = PrepareRule(dims, mixed, inputs, weights);

  RuleResult rule = ChunkedDeltaRule(ri.q, ri.k, ri.v, ri.g, ri.beta, initial, lay);
  if (states != nullptr) {
    const int64_t hist = dims.conv_kernel - 1;
    for (int64_t s = 0; s < n; ++s) {
      (*states)[s].conv = windows.narrow(0, s * hist, hist);
      (*states)[s].recurrent = rule.final[s];
    }
  }
  const at::Tensor core = rule.out.to(inputs.qkv.scalar_type());
  return GatedRmsNorm(core, inputs.z.reshape({t, hv, dv}), weights.norm_weight, dims.norm_eps)
      .reshape({t, dims.value_dim()});
}

}  // namespace lathe::runtime
