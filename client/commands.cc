// The `lathe` commands.
#include "client/commands.h"

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace lathe::client {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "lathe: %s\n", s.ToString().c_str());
  return 1;
}

namespace {

std::string LayoutText(const lathe::v1::Layout& l) {
  return absl::StrFormat("%d replica(s) x %d node(s) x %d device(s) per node, tp %d, ep %d", l.replicas(),
                         l.node_count(), l.devices_per_node(), l.tp(), l.ep());
}

std::string LoraText(const lathe::v1::LoraConfig& lora) {
  if (lora.rank() == 0) return "full fine-tuning";
  std::vector<std::string> trains;
  if (!lora.has_train_attn() || lora.train_attn()) trains.push_back("attention");
  if (!lora.has_train_mlp() || lora.train_mlp()) trains.push_back("MLP");
  if (!lora.has_train_unembed() || lora.train_unembed()) trains.push_back("unembedding");
  return absl::StrFormat("LoRA rank: %d, alpha %g, seed %d, on %s", lora.rank(), lora.has_alpha() ? lora.alpha() : 32.0,
                         lora.seed(), absl::StrJoin(trains, ", "));
}

}  // namespace

int InfoCommand(Client& client, const std::string& run_id) {
  auto health = client.Health();
  if (!health.ok()) return Fail(health.status());
  std::printf("deployment: %s, %d of %d replica(s) registered\n",
              lathe::v1::HealthResponse::State_Name(health->state()).c_str(), health->replicas_registered(),
              health->replicas_expected());
  if (!health->detail().empty()) std::printf("  %s\n", health->detail().c_str());
  auto caps = client.GetCapabilities();
  if (!caps.ok()) return Fail(caps.status());
  std::printf("model: %s (%s), vocabulary %lld, max_seq_len %lld\n", absl::StrJoin(caps->base_models(), ", ").c_str(),
              caps->architecture().c_str(), static_cast<long long>(caps->vocab_size()),
              static_cast<long long>(caps->max_seq_len()));
  std::printf("layout: %s\n", LayoutText(caps->layout()).c_str());
  std::printf("preset table: %d base model(s)\n", caps->presets_size());
  if (!run_id.empty()) {
    auto info = client.GetInfo(run_id);
    if (!info.ok()) return Fail(info.status());
    std::printf("run: %s\n  step: %lld, policy version %lld\n  %s\n  trainable parameters: %lld, max_seq_len %lld\n",
                info->run_id().c_str(), static_cast<long long>(info->step()),
                static_cast<long long>(info->policy_version()), LoraText(info->lora()).c_str(),
                static_cast<long long>(info->trainable_parameters()), static_cast<long long>(info->max_seq_len()));
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
