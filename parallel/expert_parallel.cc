// Expert-parallel dispatch and combine.
#include "parallel/expert_parallel.h"

#include <ATen/ATen.h>

namespace lathe::parallel {

at::Tensor ExpertParallelMoe(const at::Tensor& x, const at::Tensor& router, const runtime::ExpertBank& local,
                             int64_t top_k, bool norm_topk_prob, const Group& ep, const Group& stats_group,
                             runtime::MoeStats* stats) {
  return ExpertParallelMoe(x, runtime::RouteTokens(x, router, top_k, norm_topk_prob), router.size(0), local, ep,
                           stats_group, stats);
}

at::Tensor ExpertParallelMoe(const at::Tensor& x, const runtime::MoeRouting& r, int64_t num_experts,
                             const runtime::ExpertBank& local, const Group& ep, const Group& stats_group,
                             runtime::MoeStats* stats) {
  const int n = ep.size();
  const int64_t per_rank = num_experts / n;
  if (stats != nullptr) {
    at::Tensor loads = at::tensor(r.counts, at::kLong);
    AllReduceSumInPlace(loads, stats_group);
    *stats = runtime::StatsOf(std::vector<int64_t>(loads.data_ptr<int64_t>(), loads.data_ptr<int64_t>() + num_experts));
  }
  // The pairs are sorted by expert, hence by destination rank.
  std::vector<int64_t> send_rows(n, 0);
  for (int64_t e = 0; e < num_experts; ++e) send_rows[e / per_rank] += r.counts[e];
  // Source s sends us recv_counts[s][e] rows for each local expert e.
  std::vector<int64_t> block(n, per_rank);
  at::Tensor recv_counts = AllToAllFlat(at::tensor(r.counts, at::kLong), block, block, ep);
  const int64_t* rc = recv_counts.data_ptr<int64_t>();
  std::vector<int64_t> recv_rows(n, 0), local_counts(per_rank, 0);
  for (int s = 0; s < n; ++s) {
    for (int64_t e = 0; e < per_rank; ++e) {
      recv_rows[s] += rc[s * per_rank + e];
      local_counts[e] += rc[s * per_rank + e];
    }
  }
  at::Tensor received = AllToAllRows(x.index_select(0, r.token_of), send_rows, recv_rows, ep);
  // Received rows are ordered (source, expert); the experts want (expert, source).
  std::vector<int64_t> start(n * per_rank);
  int64_t offset = 0;
  for (int s = 0; s < n; ++s) {
    for (int64_t e = 0; e < per_rank; ++e) {
      start[s * per_rank + e] = offset;
      offset += rc[s * per_rank + e];
    }
  }
  std::vector<int64_t> perm;
  perm.reserve(offset);
  for (int64_t e = 0; e < per_rank; ++e) {
    for (int s = 0; s < n; ++s) {
      for (int64_t i = 0; i < rc[s * per_rank + e]; ++i) perm.push_back(start[s * per_rank + e] + i);
    }
  }
  // Index tensors live where the rows do (the rank's device).
  at::Tensor by_expert = at::tensor(perm, at::kLong).to(x.device());
  at::Tensor out = runtime::RunExperts(received.index_select(0, by_expert), local_counts, local);
  at::Tensor by_source = at::empty_like(by_expert);
  by_source.index_put_({by_expert}, at::arange(static_cast<int64_t>(perm.size()), by_expert.options()));
  at::Tensor back = AllToAllRows(out.index_select(0, by_source), recv_rows, send_rows, ep);
  // Weights wider than the rows (fp32 over bf16) multiply in their dtype; the
  // product is rounded once.
  return at::zeros_like(x).index_add(0, r.token_of, (back * r.slot_weight).to(x.scalar_type()));
}

}  // namespace lathe::parallel
