// The `lathe` commands.
#include "client/commands.h"

#include <cstdio>

namespace lathe::client {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "lathe: %s\n", s.ToString().c_str());
  return 1;
}

int InfoCommand(Client& client, const std::string& run_id) {
  auto health = client.Health();
  if (!health.ok()) return Fail(health.status());
  std::printf("health: %s", health->ShortDebugString().c_str());
  auto caps = client.GetCapabilities();
  if (!caps.ok()) return Fail(caps.status());
  std::printf("\ncapabilities: %s\n", caps->ShortDebugString().c_str());
  if (!run_id.empty()) {
    auto info = client.GetInfo(run_id);
    if (!info.ok()) return Fail(info.status());
    std::printf("run: %s\n", info->ShortDebugString().c_str());
  }
  return 0;
}

int TrainCommand(Client& client, const TrainOptions& options, double min_loss_drop) {
  if (options.data_path.empty()) return Fail(absl::InvalidArgumentError("train needs --data"));
  auto summary = Train(client, options);
  if (!summary.ok()) return Fail(summary.status());
  std::printf("lathe train: loss %.4f -> %.4f, %.0f tokens/s\n", summary->first_loss, summary->last_loss,
              summary->tokens_per_second);
  if (min_loss_drop > 0 && !(summary->last_loss < summary->first_loss * (1 - min_loss_drop))) {
    std::fprintf(stderr, "lathe train: the loss fell by less than %.0f%%\n", min_loss_drop * 100);
    return 1;
  }
  return 0;
}

int CheckpointsCommand(Client& client, const std::string& run_id) {
  auto list = client.ListCheckpoints(run_id);
  if (!list.ok()) return Fail(list.status());
  for (const auto& c : list->checkpoints()) std::printf("%s\n", c.ShortDebugString().c_str());
  return 0;
}

}  // namespace lathe::client
