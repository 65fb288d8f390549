// A decoder layer as a block of parts that architectures combine: a sequence
// mixer (softmax attention today; gated attention, linear attention and
// latent attention are further mixers) and a feed-forward part (a dense MLP
// or routed experts), each behind a small interface, wired by Block with
// pre-norm residuals. Architectures (runtime/archs/) choose the parts per
// layer from their config.
//
// Cross-rank rule: under tensor, expert or context parallelism the parts are
// collectives over the groups of LayerContext::shard — every member calls
// them in the same layer order with the same lengths, also when a
// recomputed block replays them in the backward. They throw c10::Error when
// a collective fails; callers convert at their boundary.
#ifndef LATHE_RUNTIME_BLOCK_H_
#define LATHE_RUNTIME_BLOCK_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "tensor/layers.h"
#include "runtime/model_shard.h"
#include "runtime/param_loader.h"

namespace lathe::parallel {
struct SequenceSplit;
}

namespace lathe::runtime {

// The decoding state of one sequence: its length so far and, per layer, the
// tensors its mixer keeps (attention: keys and values [kv_heads, length,
// head_dim] after RoPE; latent attention: the latent and the rope key).
// Empty before the sequence's first tokens; a mixer fills its own layer's
// slot.
struct SequenceState {
  int64_t length = 0;
  std::vector<std::vector<at::Tensor>> layers;
};

// Sparse attention's choice of keys for the queries of one sequence (or, under
// context parallelism, one chunk of it) at positions [first, first + n):
// kept compact for the whole step, turned into a mask only by the attention
// that reads it (runtime/sparse_indexer.h KeyMask).
struct KeySelection {
  // int32 [n, topk]: the positions in the sequence of each query's top-k
  // index scores (those past the query are not attended); undefined: every
  // earlier key.
  at::Tensor top;
  int64_t first = 0;
  int64_t queries = 0;  // n
  // Whether the attention takes a mask: when top is defined, and for every
  // earlier key as a mask (a cp chunk of a sequence that others select in).
  bool masked = false;
};

// What every layer of one forward shares.
struct LayerContext {
  // The packed sequences (rows of the input, in order).
  std::vector<int64_t> lengths;
  // RoPE rows of the tokens at their positions (model-wide rotary dims).
  RopeTables rope;
  // Boundaries of the tensor-parallel regions (null: one rank).
  RegionFn enter, reduce;
  // With states (decoding, no autograd): one per sequence, continued.
  std::vector<SequenceState>* states = nullptr;
  // Context parallelism: this rank's rows of each sequence (shared, so a
  // recomputed layer finds them after the forward returned).
  std::shared_ptr<const parallel::SequenceSplit> cp;
  // The model's groups; outlives every forward.
  const ModelShard* shard = nullptr;
  // Sparse attention: the keys each indexer layer selected in this forward
  // (per sequence, or per cp chunk), by layer, for the layers that reuse
  // them (shared, so a recomputed layer finds them).
  std::shared_ptr<std::map<size_t, std::vector<KeySelection>>> selections;
};

// The sequence mixer of one layer: x [T, H] (already normed) -> [T, H], the
// output projection's result before the residual.
class Mixer {
 public:
  virtual ~Mixer() = default;
  virtual at::Tensor Forward(const at::Tensor& x, const LayerContext& ctx, size_t layer) const = 0;
  // Every tensor slot of the mixer, undefined ones included.
  virtual void Visit(const TensorVisitor& fn) = 0;
};

// The feed-forward part of one layer: m [T, H] (normed) -> [T, H]. `stats`
// (may be null) receives routing statistics of routed experts.
class Ffn {
 public:
  virtual ~Ffn() = default;
  virtual at::Tensor Forward(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const = 0;
  virtual bool routed() const { return false; }
  virtual void Visit(const TensorVisitor& fn) = 0;
};

// RMSNorm with its weight and epsilon. `offset`: the zero-centred form that
// scales by (1 + weight), the product taken in fp32 before the cast back to
// x's dtype (Qwen3.5); otherwise RmsNorm's (Llama, Qwen3).
struct Norm {
  at::Tensor weight;
  double eps = 1e-6;
  bool offset = false;
  at::Tensor operator()(const at::Tensor& x) const;
};

// h + mixer(norm(h)), then + ffn(norm(...)).
class Block {
 public:
  Block(Norm input_norm, std::unique_ptr<Mixer> mixer, Norm post_norm, std::unique_ptr<Ffn> ffn)
      : input_norm_(std::move(input_norm)), mixer_(std::move(mixer)), post_norm_(std::move(post_norm)),
        ffn_(std::move(ffn)) {}

  at::Tensor Forward(const at::Tensor& h, const LayerContext& ctx, size_t layer, MoeStats* stats) const;
  bool routed() const { return ffn_->routed(); }
  void Visit(const TensorVisitor& fn);

 private:
  Norm input_norm_;
  std::unique_ptr<Mixer> mixer_;
  Norm post_norm_;
  std::unique_ptr<Ffn> ffn_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_BLOCK_H_
