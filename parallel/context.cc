// Group creation for one rank of a sharded deployment.
#include "parallel/context.h"

#include <mpi.h>

#include <numeric>

#include "absl/strings/str_cat.h"

namespace lathe::parallel {

bool ParallelContext::kv_block_leader() const { return kv_share == nullptr || kv_share->rank() == 0; }

absl::StatusOr<std::unique_ptr<ParallelContext>> MakeMpiContext(const MeshShape& shape,
                                                                const ModelDims& dims,
                                                                absl::Duration timeout) {
  int world_size = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (absl::Status s = ValidateMesh(shape, world_size, dims); !s.ok()) return s;
  auto ctx = std::make_unique<ParallelContext>();
  ctx->shape = shape;
  ctx->dims = dims;
  ctx->timeout = timeout;
  ctx->place = PlaceOf(shape, rank);
  const RankPlace& p = ctx->place;
  const std::vector<int> shards = ctx->ShardRanks();
  std::vector<int> all(world_size);
  std::iota(all.begin(), all.end(), 0);
  // The same creation order on every rank (MakeMpiCommunicator's contract).
  auto make = [](const std::vector<int>& ranks, std::unique_ptr<Communicator>& out) -> absl::Status {
    auto c = MakeMpiCommunicator(ranks);
    if (!c.ok()) return c.status();
    out = std::move(*c);
    return absl::OkStatus();
  };
  for (auto [ranks, slot] : {std::pair<const std::vector<int>*, std::unique_ptr<Communicator>*>{&all, &ctx->world}, {&p.tp_group, &ctx->tp}, {&p.ep_group, &ctx->ep},
                             {&p.dense_grad_group, &ctx->data}, {&p.expert_data_group, &ctx->expert_data},
                             {&p.replica_group, &ctx->replica}, {&p.dp_group, &ctx->replica_data},
                             {&p.cp_group, &ctx->cp}, {&shards, &ctx->shards}}) {
    if (absl::Status s = make(*ranks, *slot); !s.ok()) return s;
  }
  const int64_t kv = dims.num_key_value_heads;
  if (kv > 0 && shape.tp > kv) {
    const int block = shape.tp / static_cast<int>(kv);
    const int first = p.tp_rank / block * block;
    std::vector<int> ranks(p.tp_group.begin() + first, p.tp_group.begin() + first + block);
    if (absl::Status s = make(ranks, ctx->kv_share); !s.ok()) return s;
  }
  return ctx;
}

std::vector<int> ParallelContext::ShardRanks() const {
  std::vector<int> out;
  const int g = shape.group_size();
  for (int r = 0; r < shape.replicas; ++r) {
    for (int member : place.dp_group) out.push_back(member - place.replica * g + r * g);
  }
  return out;
}

}  // namespace lathe::parallel
