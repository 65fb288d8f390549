// The rank layout of a deployment: which ranks form each tensor-parallel,
// data, expert-parallel, expert-data, replica and cross-replica group. Pure
// integer math, the one place that knows the order of the mesh axes.
//
// Order, fastest-varying first: tp, then the data groups inside a replica,
// then replica. A replica is the contiguous block of G = node_count ×
// devices_per_node ranks, so the cross-replica group of a rank holds the same
// (node_rank, local_rank) device of every replica. Expert parallelism splits
// a replica into G / ep contiguous blocks of ep ranks.
#ifndef LATHE_PARALLEL_MESH_H_
#define LATHE_PARALLEL_MESH_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace lathe::parallel {

struct MeshShape {
  int replicas = 1;
  int node_count = 1;
  int devices_per_node = 1;
  int tp = 1;
  int ep = 1;

  int group_size() const { return node_count * devices_per_node; }
  int world_size() const { return replicas * group_size(); }
};

// What the model asks of the mesh; zero fields are not checked.
struct ModelDims {
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t num_experts = 0;
  int64_t intermediate_size = 0;  // dense MLP width, split over tp
};

// Where one rank sits, and the ranks (ascending) of each group it belongs to.
struct RankPlace {
  int rank = 0;
  int replica = 0;
  int node_rank = 0;   // global node index: rank / devices_per_node
  int local_rank = 0;  // device on its node
  int tp_rank = 0;
  int dp_rank = 0;     // data group inside the replica
  int ep_rank = 0;
  std::vector<int> tp_group;             // same replica and data group
  std::vector<int> dp_group;             // same replica and tp_rank: dense data inside a replica
  std::vector<int> ep_group;             // same replica, same block of ep ranks
  std::vector<int> expert_data_group;    // same ep_rank in every block of every replica
  std::vector<int> replica_group;        // every rank of the replica
  std::vector<int> cross_replica_group;  // same position in every replica
  std::vector<int> dense_grad_group;     // same tp_rank in every data group of every replica
};

// Checks every degree against the world and the model. InvalidArgument with
// one message naming each violated rule: world size ≠ replicas × node_count ×
// devices_per_node, tp not dividing devices_per_node, ep not dividing the
// group, heads % tp, KV heads neither divisible by nor dividing tp,
// experts % ep, dense MLP width % tp, non-positive degrees.
absl::Status ValidateMesh(const MeshShape& shape, int world_size, const ModelDims& model);

// The place of `rank`. REQUIRES: ValidateMesh(shape, shape.world_size(), ...) is OK
// and 0 <= rank < shape.world_size().
RankPlace PlaceOf(const MeshShape& shape, int rank);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_MESH_H_
