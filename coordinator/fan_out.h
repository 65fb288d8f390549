// An operation's journey across replicas: one task per replica (a forward or
// forward_backward batch split by token count; sample and compute_logprobs
// to one replica, spread by seq_id; everything else whole), and the
// replicas' answers merged back into one result.
#ifndef LATHE_COORDINATOR_FAN_OUT_H_
#define LATHE_COORDINATOR_FAN_OUT_H_

#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/replica.pb.h"

namespace lathe::coordinator {

struct FanOut {
  std::vector<lathe::v1::Task> tasks;  // one per replica, task ids unset; no op: nothing to send
  // For a split batch: the original datum indices each replica received.
  std::vector<std::vector<int>> datums;
  // For an operation one replica serves (sample, compute_logprobs): which;
  // the others get nothing. -1: every replica takes part.
  int only = -1;
};

// REQUIRES: `op` passed validation (its batch's token ids are readable).
FanOut SplitOp(const lathe::v1::SubmitRequest& op, int replicas);

// The operation's result: a split batch's outputs in the original datum order
// with metrics merged by their reduction suffix, otherwise replica 0's answer.
// The first error any replica answered wins (a user error over a server one,
// and among server errors an UNAVAILABLE one, a replica lost, over others).
// Internal when the answers do not fit the split.
absl::StatusOr<lathe::v1::OpResult> MergeAnswers(const lathe::v1::SubmitRequest& op, const FanOut& fan_out,
                                                 const std::vector<lathe::v1::TaskResult>& answers,
                                                 lathe::v1::OpError* error);

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_FAN_OUT_H_
