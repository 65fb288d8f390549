// lathe: the command-line client of a deployment.
//   lathe info [--run_id R] [--wait_s S]   health, capabilities, a run's info
//   lathe train --data F.jsonl [...]        SFT through the deployment
//   lathe checkpoints [--run_id R]          a run's (or the base model's) checkpoints
//   lathe plan --model M [--replicas R ...]  rank placement and memory per device (no deployment needed)
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "client/commands.h"
#include "client/plan.h"

ABSL_FLAG(std::string, address, "127.0.0.1:7777", "the coordinator's host:port");
ABSL_FLAG(std::string, api_key_file, "", "file holding the API key (else $LATHE_API_KEY)");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM root certificates to verify the coordinator's TLS with (else $LATHE_TLS_CA); empty: plaintext");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{64} << 20, "largest message sent to or received from the coordinator");
ABSL_FLAG(double, wait_s, 0, "first wait up to this long for the deployment to serve");
ABSL_FLAG(std::string, run_id, "", "info/checkpoints: the run to describe");
ABSL_FLAG(std::string, data, "", "train: JSONL file of token-id datums");
ABSL_FLAG(int64_t, steps, 20, "train: optimizer steps");
ABSL_FLAG(int64_t, batch_size, 8, "train: datums per step");
ABSL_FLAG(double, learning_rate, 1e-3, "train: AdamW learning rate");
ABSL_FLAG(double, grad_clip_norm, 0.0, "train: global gradient-norm clip; 0 = off");
ABSL_FLAG(int, lora_rank, 32, "train: LoRA rank; 0 = full fine-tuning");
ABSL_FLAG(double, lora_alpha, 32.0, "train: LoRA alpha");
ABSL_FLAG(int64_t, seed, 0, "train: LoRA initialisation seed");
ABSL_FLAG(std::string, save, "", "train: save_state under this name after the last step");
ABSL_FLAG(std::string, model, "", "plan: the base model (preset name, or any name with an explicit layout)");
ABSL_FLAG(int, replicas, 0, "plan: data-parallel replicas; 0: 1 (and no layout of its own)");
ABSL_FLAG(int, node_count, 0, "plan: nodes per replica; 0: the preset's, else 1");
ABSL_FLAG(int, devices_per_node, 0, "plan: devices per node; 0: the preset's (required without one)");
ABSL_FLAG(int, tp, 0, "plan: tensor-parallel degree; 0: the preset's, else 1");
ABSL_FLAG(int, ep, 0, "plan: expert-parallel degree; 0: the preset's, else 1");
ABSL_FLAG(int, cp, 0, "plan: context-parallel degree (ranks splitting each sequence); 0: the preset's, else 1");
ABSL_FLAG(std::string, dtype, "bfloat16",
          "plan: bfloat16 (the GPU default) or float32 (what CPU ranks run) weights and activations");
ABSL_FLAG(int64_t, max_seq_len, 0, "plan: tokens of the longest datum; 0: the preset's");
ABSL_FLAG(double, device_memory_gib, 0,
          "plan: memory of one device besides the H100 and H200 shown; exit 3 when the estimate exceeds 90% of it "
          "(0: exit 3 when it exceeds 90% of the H100's 80 GiB)");
ABSL_FLAG(std::string, format, "table", "plan: table, or env (shell assignments used by launch/)");
ABSL_FLAG(bool, list, false, "plan: list the preset table instead");
ABSL_FLAG(std::string, config, "",
          "plan: a config.json (or a model folder) whose model the estimate counts; empty: the preset's config");
ABSL_FLAG(std::string, presets, "", "plan: preset table; empty: $LATHE_PRESETS, installed or source-tree");
ABSL_FLAG(double, min_loss_drop, 0.0, "train: exit 1 unless the last loss is below the first by this fraction");

namespace {

int Plan() {
  std::string path = absl::GetFlag(FLAGS_presets);
  if (path.empty()) path = lathe::presets::DefaultPresetsPath();
  auto table = lathe::presets::LoadPresets(path.empty() ? "presets/models.json" : path);
  if (!table.ok()) return lathe::client::Fail(table.status());
  lathe::client::PlanOptions o;
  o.layout.model = absl::GetFlag(FLAGS_model);
  o.layout.replicas = absl::GetFlag(FLAGS_replicas);
  o.layout.node_count = absl::GetFlag(FLAGS_node_count);
  o.layout.devices_per_node = absl::GetFlag(FLAGS_devices_per_node);
  o.layout.tp = absl::GetFlag(FLAGS_tp);
  o.layout.ep = absl::GetFlag(FLAGS_ep);
  o.layout.cp = absl::GetFlag(FLAGS_cp);
  absl::StatusOr<lathe::client::Dtype> dtype = lathe::client::ParseDtype(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) return lathe::client::Fail(dtype.status());
  o.dtype = *dtype;
  o.layout.max_seq_len = absl::GetFlag(FLAGS_max_seq_len);
  o.lora_rank = absl::GetFlag(FLAGS_lora_rank);
  o.device_memory_gib = absl::GetFlag(FLAGS_device_memory_gib);
  o.format = absl::GetFlag(FLAGS_format);
  o.config_path = absl::GetFlag(FLAGS_config);
  if (absl::GetFlag(FLAGS_list)) return lathe::client::ListPresetsCommand(*table, o);
  return lathe::client::PlanCommand(*table, o);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace lathe::client;
  absl::SetProgramUsageMessage("lathe info|train|checkpoints|plan [flags]; --helpfull lists the flags");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) return std::fprintf(stderr, "usage: lathe info|train|checkpoints|plan [flags]\n"), 2;
  if (std::string(args[1]) == "plan") return Plan();
  ClientOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  if (std::string path = absl::GetFlag(FLAGS_api_key_file); !path.empty()) {
    std::ifstream in(path);
    if (!in || !std::getline(in, options.api_key)) return Fail(absl::NotFoundError("cannot read " + path));
  } else if (const char* env = std::getenv("LATHE_API_KEY"); env != nullptr) {
    options.api_key = env;
  }
  std::string ca = absl::GetFlag(FLAGS_tls_ca);
  if (const char* env = std::getenv("LATHE_TLS_CA"); ca.empty() && env != nullptr) ca = env;
  if (!ca.empty()) {
    std::ifstream in(ca, std::ios::binary);
    if (!in) return Fail(absl::NotFoundError("cannot read " + ca));
    options.tls_root_certs.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  auto client = Client::Connect(options);
  if (double wait = absl::GetFlag(FLAGS_wait_s); wait > 0) {
    if (absl::Status s = client->WaitServing(absl::Seconds(wait)); !s.ok()) return Fail(s);
  }
  const std::string command = args[1];
  if (command == "info") return InfoCommand(*client, absl::GetFlag(FLAGS_run_id));
  if (command == "checkpoints") return CheckpointsCommand(*client, absl::GetFlag(FLAGS_run_id));
  if (command != "train") {
    return std::fprintf(stderr, "lathe: unknown command '%s' (info, train, checkpoints)\n", command.c_str()), 2;
  }
  TrainOptions o;
  o.data_path = absl::GetFlag(FLAGS_data);
  o.steps = absl::GetFlag(FLAGS_steps);
  o.batch_size = absl::GetFlag(FLAGS_batch_size);
  o.learning_rate = absl::GetFlag(FLAGS_learning_rate);
  o.grad_clip_norm = absl::GetFlag(FLAGS_grad_clip_norm);
  o.lora.set_rank(absl::GetFlag(FLAGS_lora_rank));
  o.lora.set_alpha(absl::GetFlag(FLAGS_lora_alpha));
  o.lora.set_seed(absl::GetFlag(FLAGS_seed));
  o.save_name = absl::GetFlag(FLAGS_save);
  return TrainCommand(*client, o, absl::GetFlag(FLAGS_min_loss_drop));
}
