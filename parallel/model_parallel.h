// Differentiable collectives for tensor, expert and vocabulary parallelism
// over a Communicator, on contiguous CPU (MPI) or CUDA (NCCL) tensors.
//
// Each function with a backward is a collective in both directions: every
// member of the group calls it (also with zero rows) in the same order, and
// its backward runs on every member. A failed collective throws c10::Error
// with the communicator's status message.
#ifndef LATHE_PARALLEL_MODEL_PARALLEL_H_
#define LATHE_PARALLEL_MODEL_PARALLEL_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/time/time.h"
#include "parallel/communicator.h"

namespace lathe::parallel {

// A group to run collectives on; inactive (every function is the identity)
// when comm is null or has one member.
struct Group {
  Communicator* comm = nullptr;
  absl::Duration timeout = absl::Minutes(10);
  bool active() const { return comm != nullptr && comm->size() > 1; }
  int size() const { return comm == nullptr ? 1 : comm->size(); }
  int rank() const { return comm == nullptr ? 0 : comm->rank(); }
};

// Start of part `i` when `total` items are split into `parts` balanced,
// contiguous parts (part sizes differ by at most one).
int64_t PartBegin(int64_t total, int parts, int i);

// Identity forward, all-reduce (sum) backward: the input of column-parallel
// layers, whose members each produce part of the gradient.
at::Tensor CopyToGroup(const at::Tensor& x, const Group& g);
// All-reduce (sum) forward, identity backward: the output of row-parallel layers.
at::Tensor ReduceFromGroup(const at::Tensor& x, const Group& g);
// Forward: this member's balanced part of the rows of a replicated [N, ...]
// tensor; backward: the all-gather of the parts' gradients.
at::Tensor ScatterRows(const at::Tensor& x, const Group& g);
// Forward: the all-gather of every member's balanced part of `total_rows`
// rows; backward: this member's rows of the gradient.
at::Tensor GatherRows(const at::Tensor& x, int64_t total_rows, const Group& g);
// Rows x[...] packed by destination: send_rows[j] go to member j; returns the
// recv_rows[j] rows from each member j, packed in member order. Backward is
// the reverse exchange.
at::Tensor AllToAllRows(const at::Tensor& x, const std::vector<int64_t>& send_rows,
                        const std::vector<int64_t>& recv_rows, const Group& g);

// log_softmax(logits)[i, index[i, k]] where `logits` [N, Vl] holds the
// vocabulary columns [vocab_begin, vocab_begin + Vl) of each member and
// `index` [N, K] holds global token ids. Only [N]-sized vectors cross ranks;
// the full vocabulary is never gathered. Differentiable in logits.
at::Tensor VocabParallelLogprobs(const at::Tensor& logits, const at::Tensor& index,
                                 int64_t vocab_begin, const Group& g);

// Eager (no autograd) in-place sum over the group; throws like the rest.
void AllReduceSumInPlace(at::Tensor& t, const Group& g);
void AllReduceMaxInPlace(at::Tensor& t, const Group& g);
// Whether `mine` holds on every member of the group (true alone). Collective.
bool AllAgree(bool mine, const Group& g);
// Eager uneven all-to-all of a flat int64/float tensor (element counts).
at::Tensor AllToAllFlat(const at::Tensor& x, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& recv_counts, const Group& g);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_MODEL_PARALLEL_H_
