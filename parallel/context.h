// Everything one rank needs to run its part of a sharded model: the mesh
// shape, this rank's place in it, and a communicator for each group it uses.
#ifndef LATHE_PARALLEL_CONTEXT_H_
#define LATHE_PARALLEL_CONTEXT_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "parallel/mesh.h"

namespace lathe::parallel {

struct ParallelContext {
  MeshShape shape;
  RankPlace place;
  ModelDims dims;
  absl::Duration timeout = absl::Minutes(10);  // for every collective
  // Shared state of a device backend (AttachNccl); declared before the
  // communicators so it outlives them.
  std::shared_ptr<void> device_backend;
  std::unique_ptr<Communicator> world;
  std::unique_ptr<Communicator> tp;           // place.tp_group
  std::unique_ptr<Communicator> ep;           // place.ep_group
  std::unique_ptr<Communicator> data;         // place.dense_grad_group: gradient sums over data shards and cp ranks
  std::unique_ptr<Communicator> expert_data;  // place.expert_data_group
  std::unique_ptr<Communicator> replica;      // place.replica_group: every rank of the replica
  std::unique_ptr<Communicator> replica_data; // place.dp_group: one rank per data group of the replica
  std::unique_ptr<Communicator> cp;           // place.cp_group: the ranks that split each sequence
  // One rank per data shard (same tp_rank and cp_rank) of every replica:
  // outputs of a call are gathered over it.
  std::unique_ptr<Communicator> shards;
  // The tp ranks that hold the same KV head when there are fewer KV heads
  // than tp; null otherwise.
  std::unique_ptr<Communicator> kv_share;

  // The batch of a call is split over every data group of every replica.
  int num_data_shards() const { return shape.replicas * data_groups(); }
  int data_shard() const { return place.replica * data_groups() + place.dp_rank; }
  // Data groups inside one replica (tp × cp ranks each).
  int data_groups() const { return shape.group_size() / (shape.tp * shape.cp); }
  // The members of `shards`: place.dp_group in every replica.
  std::vector<int> ShardRanks() const;
  // Whether this rank is the first of its KV-sharing block (always, without sharing).
  bool kv_block_leader() const;
};

// Validates the layout (ValidateMesh; the same InvalidArgument on every rank,
// before any communication) and creates the groups over MPI_COMM_WORLD.
// Collective: every rank of the world calls it with the same arguments.
absl::StatusOr<std::unique_ptr<ParallelContext>> MakeMpiContext(const MeshShape& shape,
                                                                const ModelDims& dims,
                                                                absl::Duration timeout);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_CONTEXT_H_
