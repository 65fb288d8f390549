// One rank of a dp_worker job: builds the mesh for the model, loads nothing
// until a run is created, and serves its replica's tasks until stopped.
#ifndef LATHE_DP_WORKER_SERVE_H_
#define LATHE_DP_WORKER_SERVE_H_

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "dp_worker/cross_replica_groups.h"
#include "dp_worker/op_executor.h"
#include "dp_worker/replica_link.h"
#include "dp_worker/replica_loop.h"
#include "presets/layout.h"

namespace lathe::dp_worker {

struct ServeOptions {
  ExecutorOptions executor;
  LinkOptions link;
  LoopOptions loop;
  std::string base_model;  // the name clients use; empty: the model folder's name
  // Degrees as given (0: from the model's preset); layout.model is ignored
  // (the base model's name is looked up) and layout.max_seq_len overrides
  // the preset's (executor.max_seq_len is set from the result).
  presets::LayoutRequest layout;
  std::string presets_path;  // empty: presets::DefaultPresetsPath()
  bool dry_run = false;      // print this rank's place and device, then return without dialing
  // --dtype as given (runtime::ParseDtype); empty: bfloat16 on GPU ranks,
  // float32 on CPU ranks. Sets executor.dtype.
  std::string dtype;
  absl::Duration collective_timeout = absl::Minutes(10);
  // >= 0: this job is replica `replica_index` of layout.replicas, each
  // replica its own job (dp_worker --replica_index); the job's ranks are one
  // node group and the cross-replica groups are Gloo groups formed through
  // the coordinator's rendezvous store. -1: the job holds every replica.
  int replica_index = -1;
  CrossReplicaOptions cross;
};

// Collective over MPI_COMM_WORLD. OK after a stop requested through `stop`
// (SIGTERM), or once the place is printed under dry_run; an error when the
// model has neither a preset nor an explicit layout, the layout is invalid or
// does not match the world, the rank's place or device cannot be told, the
// coordinator cannot be reached or goes away, or the replica breaks. A
// failure before the replica registered (its model or layout refused) is
// also reported to the coordinator by the replica's first rank, so Health
// says why the deployment cannot start.
absl::Status Serve(const ServeOptions& options, const std::atomic<bool>& stop);

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_SERVE_H_
