// Agreement of a replica's ranks on an operation's outcome.
#include "dp_worker/op_outcome.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/data_parallel.h"

namespace lathe::dp_worker {

Outcome AgreeOutcome(const absl::Status& mine, parallel::Communicator* replica, absl::Duration timeout) {
  if (replica == nullptr || replica->size() == 1 || parallel::CommunicationBroken()) return {mine, false};
  absl::StatusOr<std::vector<absl::Status>> all = parallel::AllGatherStatus(mine, *replica, timeout);
  if (!all.ok()) return {mine.ok() ? all.status() : mine, false};
  Outcome out;
  size_t failed = 0;
  for (size_t m = 0; m < all->size(); ++m) {
    const absl::Status& s = (*all)[m];
    if (s.ok()) continue;
    if (failed++ > 0) continue;
    out.status = m == static_cast<size_t>(replica->rank())
                     ? s
                     : absl::Status(s.code(), absl::StrCat(s.message(), " (on rank ", m, " of the replica)"));
  }
  out.mixed = failed > 0 && failed < all->size();
  return out;
}

bool ChangesRunState(const lathe::v1::SubmitRequest& op) {
  using Op = lathe::v1::SubmitRequest;
  switch (op.op_case()) {
    case Op::kForwardBackward:
    case Op::kOptimStep:
    case Op::kLoadState:
    case Op::kLoadStateWithOptimizer:
    case Op::kInit:
      return true;
    default:
      return false;
  }
}

}  // namespace lathe::dp_worker
