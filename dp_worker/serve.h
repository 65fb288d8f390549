// One rank of a dp_worker job: builds the mesh for the model, loads nothing
// until a run is created, and serves its replica's tasks until stopped.
#ifndef LATHE_DP_WORKER_SERVE_H_
#define LATHE_DP_WORKER_SERVE_H_

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "dp_worker/op_executor.h"
#include "dp_worker/replica_link.h"
#include "dp_worker/replica_loop.h"

namespace lathe::dp_worker {

struct ServeOptions {
  ExecutorOptions executor;
  LinkOptions link;
  LoopOptions loop;
  std::string base_model;  // the name clients use; empty: the model folder's name
  int replicas = 1;
  int node_count = 1;
  int tp = 1;
  int ep = 1;
  absl::Duration collective_timeout = absl::Minutes(10);
};

// The API key: the first line of `path`, else $LATHE_API_KEY, else empty.
// NotFound / PermissionDenied when `path` is given and cannot be read.
absl::StatusOr<std::string> ReadApiKey(const std::string& path);

// Collective over MPI_COMM_WORLD. OK after a stop requested through `stop`
// (SIGTERM); an error when the layout is invalid, the coordinator cannot be
// reached or goes away, or the replica breaks.
absl::Status Serve(const ServeOptions& options, const std::atomic<bool>& stop);

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_SERVE_H_
