// A single-process supervised fine-tuning loop over a JSONL file of token-id
// datums, printing progress. The distributed job replaces it later.
#ifndef LATHE_RUNTIME_SFT_JOB_H_
#define LATHE_RUNTIME_SFT_JOB_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"
#include "parallel/context.h"
#include "core/dtype.h"
#include "core/lora_settings.h"
#include "core/sft_data.h"

namespace lathe::runtime {

struct SftOptions {
  std::string model_dir;
  std::string data_path;
  LoraSettings lora;
  int64_t steps = 20;
  int64_t batch_size = 8;
  double learning_rate = 1e-3;
  double grad_clip_norm = 0.0;
  Dtype dtype = Dtype::kFloat32;
  // Sharded run (not owned): every rank runs RunSft; only `report` ranks print.
  parallel::ParallelContext* parallel = nullptr;
  bool report = true;
};

struct SftSummary {
  double first_loss = 0;  // mean per-token loss of the first step
  double last_loss = 0;
  double tokens_per_second = 0;
};

// Trains and prints one progress line per step to stdout.
absl::StatusOr<SftSummary> RunSft(const SftOptions& options);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_SFT_JOB_H_
