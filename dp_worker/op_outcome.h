// How the ranks of a replica agree on the outcome of an operation, so that
// an operation fails on every rank alike or succeeds on every rank.
#ifndef LATHE_DP_WORKER_OP_OUTCOME_H_
#define LATHE_DP_WORKER_OP_OUTCOME_H_

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lathe/v1/service.pb.h"
#include "parallel/communicator.h"

namespace lathe::dp_worker {

struct Outcome {
  absl::Status status;  // OK only when every rank's was; else the first failure
  bool mixed = false;   // some ranks succeeded while others failed
};

// Collective over `replica` (null, or communication broken: this rank's
// status alone). Cross-rank rule: every rank of the replica calls it after
// the same operation.
Outcome AgreeOutcome(const absl::Status& mine, parallel::Communicator* replica, absl::Duration timeout);

// Whether a failure of `op` on some ranks only can leave the run's state
// different between ranks (weights, gradients, optimizer, trainer).
bool ChangesRunState(const lathe::v1::SubmitRequest& op);

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_OP_OUTCOME_H_
