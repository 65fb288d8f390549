// The dropless mixture-of-experts block with experts sharded over an
// expert-parallel group: tokens go to the ranks holding their experts and
// come back with one all-to-all each way.
#ifndef LATHE_PARALLEL_EXPERT_PARALLEL_H_
#define LATHE_PARALLEL_EXPERT_PARALLEL_H_

#include <ATen/core/Tensor.h>

#include "parallel/model_parallel.h"
#include "tensor/layers.h"

namespace lathe::parallel {

// x [T, H] are this rank's tokens; `router` [E, H] is replicated; `local`
// holds experts [ep.rank() · E/ep, (ep.rank() + 1) · E/ep). Every token goes
// to its top-k experts (no capacity, nothing dropped). `stats` (optional)
// gets the per-expert loads summed over `stats_group`, so every member
// reports the same numbers. Collective over `ep` (and `stats_group`).
at::Tensor ExpertParallelMoe(const at::Tensor& x, const at::Tensor& router, const runtime::ExpertBank& local,
                             int64_t top_k, bool norm_topk_prob, const Group& ep, const Group& stats_group,
                             runtime::MoeStats* stats);

// The same with the routing `r` (pairs sorted by expert, of `num_experts`)
// already chosen for x by the caller's router.
at::Tensor ExpertParallelMoe(const at::Tensor& x, const runtime::MoeRouting& r, int64_t num_experts,
                             const runtime::ExpertBank& local, const Group& ep, const Group& stats_group,
                             runtime::MoeStats* stats);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_EXPERT_PARALLEL_H_
