// Context parallelism: the tokens of each sequence of a micro-batch split
// over the ranks of a cp group, with keys and values all-gathered for
// attention (the scheme of Megatron-Core's and Llama 3's context parallel).
//
// Each sequence is cut into 2·cp balanced chunks; member i holds chunks i and
// 2·cp−1−i, so every member gets about the same causal attention work. A
// member's rows ("local rows") are its chunks of every sequence, in packed
// order — ascending global row, so a sequence's local rows are contiguous.
#ifndef LATHE_PARALLEL_CONTEXT_PARALLEL_H_
#define LATHE_PARALLEL_CONTEXT_PARALLEL_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "parallel/model_parallel.h"

namespace lathe::parallel {

// How the rows of one packed micro-batch (sequences of `lengths`, T rows in
// all) are cut over `parts` members, seen from member `rank`.
struct SequenceSplit {
  struct Chunk {
    int64_t seq_offset = 0;  // packed row where its sequence starts
    int64_t begin = 0;       // position of its first token in the sequence
    int64_t length = 0;      // > 0
    int64_t local = 0;       // its first local row
  };
  int parts = 1;
  int rank = 0;
  int64_t total = 0;                     // T
  std::vector<std::vector<int64_t>> rows;  // rows[m]: member m's global rows, ascending
  std::vector<Chunk> chunks;             // this member's non-empty chunks, in local order
  std::vector<int64_t> positions;        // position in its sequence of each local row

  const std::vector<int64_t>& own() const { return rows[rank]; }
  // The split restricted to global rows [begin, begin + n), renumbered from 0
  // (rows and total only): to gather one sequence's rows.
  SequenceSplit Restrict(int64_t begin, int64_t n) const;
  // The first local row at or after global row `row`.
  int64_t LocalBegin(int64_t row) const;
};

// REQUIRES: parts >= 1, 0 <= rank < parts, lengths >= 0. Sequences shorter
// than 2·parts leave some chunks (and possibly members) empty.
SequenceSplit SplitSequences(const std::vector<int64_t>& lengths, int parts, int rank);

// Forward: every member's local rows x [own().size(), ...] put together into
// the whole [total, ...] in global row order (one all-gather).
// Backward with `sum_grads` (a tensor every member uses differently, such as
// keys and values): this member's rows of the gradient summed over the
// members (one reduce-scatter). Without (a tensor every member then uses in
// the same computation, such as logprobs entering a replicated loss): this
// member's rows of its own gradient. Collective over `g` both ways.
at::Tensor GatherSequenceRows(const at::Tensor& x, const SequenceSplit& split, const Group& g, bool sum_grads);

// Causal attention of this member's queries q [nH, t, D] (local rows, RoPE at
// their global positions) over the keys and values of the whole sequences:
// k, v [nKV, t, D] are this member's rows, all-gathered over `g` (the backward
// reduce-scatters their gradients). Returns [nH, t, D]. Collective over `g`,
// also for a member without rows.
//
// A chunk that starts a sequence is plain causal attention. A later chunk
// [b, b + L) sees the prefix [0, b) whole and itself causally: on CPU the two
// parts run as two flash-attention calls whose outputs are merged by their
// log-sum-exp (the backward gives each part the merged output and
// log-sum-exp, which yields exactly its share of the gradient), so no mask is
// built; elsewhere one SDPA with an [L, b + L] mask.
//
// `masks` (sparse attention), when given, has one entry per split.chunks:
// defined, a bool [L, b + L] of the keys chunk [b, b + L)'s queries see
// (true: attend; each row sees at least one key), attended with one SDPA;
// undefined, the causal attention above.
at::Tensor ContextParallelAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const SequenceSplit& split, double scale, bool gqa, const Group& g,
                                    const std::vector<at::Tensor>& masks = {});

// As above with chunk i's mask given by mask_of(i) (undefined: causal), called
// just before the chunk's attention: one chunk's mask exists at a time (an
// SDPA under autograd keeps its additive form for the backward).
at::Tensor ContextParallelAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const SequenceSplit& split, double scale, bool gqa, const Group& g,
                                    const std::function<at::Tensor(size_t)>& mask_of);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_CONTEXT_PARALLEL_H_
