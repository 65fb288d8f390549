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
#include "runtime/lora_settings.h"

namespace lathe::runtime {

// One JSON object per line, either
//   {"tokens": [t0, ..., tn]}               (+ optional "weights": n floats)
// which trains positions 0..n-1 to predict t1..tn, or the Tinker shape
//   {"model_input": [...], "loss_fn_inputs": {"target_tokens": [...], "weights": [...]}}.
// InvalidArgument naming the line for malformed input.
absl::StatusOr<std::vector<lathe::v1::Datum>> ReadSftJsonl(const std::string& path);

// Writes `count` sequences of `length` tokens that follow a learnable rule
// (start s, stride d: t[i+1] = (t[i] + d) mod vocab), deterministic in `seed`.
absl::Status WriteSyntheticSftData(const std::string& path, int64_t vocab_size, int64_t count,
                                   int64_t length, uint64_t seed);

struct SftOptions {
  std::string model_dir;
  std::string data_path;
  LoraSettings lora;
  int64_t steps = 20;
  int64_t batch_size = 8;
  double learning_rate = 1e-3;
  double grad_clip_norm = 0.0;
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
