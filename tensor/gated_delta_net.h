// The Gated DeltaNet (GDN) linear-attention math of Qwen3.5 / Qwen3.6: everything between
// a linear layer's input projections and its output projection, as transformers computes it,
// over independent sequences packed back to back. Pure tensor math, differentiable through
// ATen ops; nothing here knows about parallelism or files.
#ifndef LATHE_TENSOR_GATED_DELTA_NET_H_
#define LATHE_TENSOR_GATED_DELTA_NET_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace lathe::runtime {

// The sizes of one GDN layer as this process holds it. Under tensor parallelism pass the
// local head counts (a rank holding Hv/tp value heads and Hk/tp key heads); nothing here
// assumes the global ones.
struct GdnDims {
  int64_t num_k_heads = 0;  // query/key heads (linear_num_key_heads)
  int64_t num_v_heads = 0;  // value heads, a multiple of num_k_heads
  int64_t head_k_dim = 0;   // linear_key_head_dim
  int64_t head_v_dim = 0;   // linear_value_head_dim
  int64_t conv_kernel = 4;  // linear_conv_kernel_dim
  double norm_eps = 1e-6;   // rms_norm_eps, the gated norm's epsilon
  int64_t chunk_size = 64;  // of the chunked delta rule; 64 as transformers

  int64_t key_dim() const { return num_k_heads * head_k_dim; }
  int64_t value_dim() const { return num_v_heads * head_v_dim; }
  // Channels of the depthwise convolution: q | k | v.
  int64_t conv_dim() const { return 2 * key_dim() + value_dim(); }
};

// The layer's own parameters (besides its projections).
struct GdnWeights {
  at::Tensor conv_weight;  // [conv_dim, K] or transformers' [conv_dim, 1, K]; no bias
  at::Tensor a_log;        // [Hv]
  at::Tensor dt_bias;      // [Hv]
  at::Tensor norm_weight;  // [Dv], plain weight (not 1 + w)
};

// The projected inputs of T packed tokens, one row per token.
struct GdnInputs {
  at::Tensor qkv;  // [T, conv_dim]: in_proj_qkv's output, channels q | k | v (this rank's heads)
  at::Tensor z;    // [T, Hv * Dv]: in_proj_z's output, the gate of the output norm
  at::Tensor b;    // [T, Hv]: in_proj_b's output; beta = sigmoid(b)
  at::Tensor a;    // [T, Hv]: in_proj_a's output; g = -exp(A_log) * softplus(a + dt_bias)
};

// Where one sequence stands after the tokens it has been fed, so it can be continued.
struct GdnState {
  // [K-1, conv_dim] in qkv's dtype: the last K-1 conv inputs (rows of qkv), oldest first;
  // zeros before the sequence start.
  at::Tensor conv;
  // [Hv, Dk, Dv] fp32 (fp64 for fp64 inputs): the delta rule's state S, read as q·S (keys
  // index rows).
  at::Tensor recurrent;
};

// The state of a sequence that has seen no token: zeros, conv in `like`'s dtype, both on
// `like`'s device.
GdnState GdnInitialState(const GdnDims& dims, const at::Tensor& like);

// The GDN output before out_proj, [T, Hv * Dv] in qkv's dtype, for the packed sequences of
// `lengths` (each >= 1, summing to T; the rows of `inputs` are sequence after sequence).
// Per sequence, as transformers' torch path computes a batch of one: causal depthwise conv
// over q|k|v + SiLU; q, k l2-normalised (eps 1e-6) in fp32, q scaled by Dk^-1/2; q and k
// repeated to the value heads (head h serves value heads h*r .. h*r+r-1); beta = sigmoid(b),
// g = -exp(A_log) softplus(a + dt_bias) in fp32; the chunked gated delta rule with an fp32
// state; then RMSNorm(x) * norm_weight * silu(z) per value head. (fp64 inputs: all in fp64.)
// The chunk is min(dims.chunk_size, longest length), so decode steps are not padded to 64.
// No state crosses a sequence boundary: each sequence's conv sees only its own tokens (and
// zeros, or its state's window, before them) and its recurrent state starts at zero (or at
// its state's). Pure function of its arguments; safe to call from several threads.
// `states`: null, or one state per sequence (same order as `lengths`) that each sequence
// continues from; they are replaced by the states after its tokens. A state carries
// autograd history when its inputs do (detach it for decoding under grad mode). With
// states, each sequence's bits are those it gets when passed alone (decoding is
// batch-invariant): several sequences are computed one by one, and on the CPU a step of
// one token each without autograd runs as fixed-order loops (see gated_delta_net.cc).
// Differentiable in every tensor of `inputs` and `weights`. Throws c10::Error naming the
// argument when a shape or the lengths do not match `dims`.
at::Tensor GatedDeltaNet(const GdnDims& dims, const GdnWeights& weights, const GdnInputs& inputs,
                         const std::vector<int64_t>& lengths, std::vector<GdnState>* states = nullptr);

}  // namespace lathe::runtime

#endif  // LATHE_TENSOR_GATED_DELTA_NET_H_
