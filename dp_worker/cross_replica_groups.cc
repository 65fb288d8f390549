// Forming a generation's cross-replica Gloo groups.
#include "dp_worker/cross_replica_groups.h"

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "parallel/gloo_communicator.h"

namespace lathe::dp_worker {

CrossReplicaGroups::CrossReplicaGroups(parallel::ParallelContext* ctx, parallel::RendezvousStore* store,
                                       CrossReplicaOptions options)
    : ctx_(ctx), store_(store), options_(std::move(options)),
      slot_(std::make_shared<parallel::CrossReplicaSlot>()) {
  for (std::unique_ptr<parallel::Communicator>* c : {&ctx_->world, &ctx_->data, &ctx_->expert_data}) {
    *c = parallel::MakeTwoLevelCommunicator(std::move(*c), slot_);
  }
}

absl::Status CrossReplicaGroups::Join(const lathe::v1::Membership& m, bool* changed) {
  *changed = false;
  if (m.generation() < 1 || m.size() < 1 || m.rank() < 0 || m.rank() >= m.size()) {
    return absl::InvalidArgumentError(absl::StrCat("malformed replica membership: ", m.ShortDebugString()));
  }
  if (m.generation() == slot_->generation && m.epoch() == epoch_ && slot_->group != nullptr) return absl::OkStatus();
  // Gradients accumulated before a replica was lost lack its part. (A
  // restarted coordinator serves once every replica is back: none lost.)
  *changed = slot_->generation != 0 && m.epoch() == epoch_ && m.last_loss_generation() > slot_->generation;
  slot_->group.reset();
  slot_->generation = m.generation();
  epoch_ = m.epoch();
  parallel::StoreGroupOptions o;
  o.rank = m.rank();
  o.size = m.size();
  o.generation = m.generation();
  o.group = absl::StrCat("place", ctx_->replica->rank());
  o.hostname = options_.hostname;
  o.connect_timeout = options_.connect_timeout;
  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<parallel::Communicator>> group = parallel::MakeGlooCommunicator(o, store_);
  // Every rank of the replica learns whether all formed theirs.
  int32_t failed = group.ok() ? 0 : 1;
  if (ctx_->replica->size() > 1) {
    absl::Status s = ctx_->replica->AllReduceMax({&failed, 1, parallel::ElemType::kInt32}, ctx_->timeout);
    if (!s.ok()) return s;
  }
  if (!group.ok()) return group.status();
  if (failed != 0) {
    return absl::UnavailableError(absl::StrCat("another rank of this replica could not form its cross-replica group "
                                               "of generation ", m.generation()));
  }
  slot_->group = *std::move(group);
  ctx_->place.replica = m.rank();
  LATHE_LOG(Info, "cross-replica group %s of generation %d formed: replica %d of %d (%s)", o.group, m.generation(),
            m.rank(), m.size(), absl::FormatDuration(absl::Now() - start));
  return absl::OkStatus();
}

}  // namespace lathe::dp_worker
