// NCCL twins for the groups of a ParallelContext, for ranks that compute on a GPU.
#include <numeric>
#include <utility>

#include "parallel/nccl_communicator.h"

namespace lathe::parallel {

absl::Status AttachNccl(ParallelContext& ctx, int device) {
  auto world = NcclWorld::Create(device, ctx.timeout);
  if (!world.ok()) return world.status();
  const RankPlace& p = ctx.place;
  std::vector<int> all(ctx.shape.world_size());
  std::iota(all.begin(), all.end(), 0);
  const std::vector<int> shards = ctx.ShardRanks();
  std::vector<std::pair<const std::vector<int>*, std::unique_ptr<Communicator>*>> groups = {
      {&all, &ctx.world},           {&p.tp_group, &ctx.tp},           {&p.ep_group, &ctx.ep},
      {&p.dense_grad_group, &ctx.data}, {&p.expert_data_group, &ctx.expert_data},
      {&p.replica_group, &ctx.replica}, {&p.dp_group, &ctx.replica_data},
      {&p.cp_group, &ctx.cp},           {&shards, &ctx.shards}};
  // kv_share exists on every rank or on none (MakeMpiContext); its members
  // are the block of tp_group that it was made from.
  std::vector<int> kv;
  if (ctx.kv_share != nullptr) {
    const int block = ctx.kv_share->size(), first = p.tp_rank / block * block;
    kv.assign(p.tp_group.begin() + first, p.tp_group.begin() + first + block);
    groups.push_back({&kv, &ctx.kv_share});
  }
  // Every rank splits in the same order (NcclWorld::Split's contract).
  for (auto& [ranks, slot] : groups) {
    auto twin = (*world)->Split(*ranks);
    if (!twin.ok()) return twin.status();
    *slot = MakeRoutedCommunicator(std::move(*slot), std::move(*twin));
  }
  ctx.device_backend = std::shared_ptr<NcclWorld>(std::move(*world));
  return absl::OkStatus();
}

}  // namespace lathe::parallel
