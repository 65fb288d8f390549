// train_bench: times forward_backward + optim_step of lathe's trainer on a
// model folder and a JSONL batch file, printing one JSON line with tokens/s.
// bench/train_throughput.py runs it next to transformers + peft;
// bench/data_parallel_throughput.py runs it under mpirun, sharded.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <sys/resource.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "parallel/context.h"
#include "parallel/device.h"
#include "parallel/rank_info.h"
#include "runtime/device.h"
#include "runtime/parallel_setup.h"
#include "runtime/sft_job.h"
#include "runtime/trainer.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder");
ABSL_FLAG(std::string, data, "", "JSONL datums; the whole file is one batch");
ABSL_FLAG(int64_t, lora_rank, 32, "LoRA rank; 0 = full fine-tuning");
ABSL_FLAG(int64_t, warmup, 1, "untimed steps");
ABSL_FLAG(int64_t, steps, 3, "timed steps");
ABSL_FLAG(int, replicas, 1, "data-parallel replicas (under mpirun)");
ABSL_FLAG(int, node_count, 1, "nodes per replica");
ABSL_FLAG(int, tp, 1, "tensor-parallel degree");
ABSL_FLAG(int, ep, 1, "expert-parallel degree");
ABSL_FLAG(int, cp, 1, "context-parallel degree");
ABSL_FLAG(int64_t, max_seq_len, 0, "longest datum accepted; 0: the model's max_position_embeddings");
ABSL_FLAG(int64_t, logprob_chunk_tokens, 0, "tokens whose logits exist at once; 0: the trainer's default");
ABSL_FLAG(std::string, recompute, "auto", "per-layer activation recompute: auto, on, off");
ABSL_FLAG(std::string, dtype, "float32", "compute precision: float32 or bfloat16");
ABSL_FLAG(bool, retain_freed_memory, true, "keep freed memory in the heap (TrainerOptions::retain_freed_memory)");

int Bench();

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  absl::ParseCommandLine(argc, argv);
  int rc = Bench();
  MPI_Finalize();
  return rc;
}

int Bench() {
  using namespace lathe::runtime;
  int world = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  auto data = ReadSftJsonl(absl::GetFlag(FLAGS_data));
  if (!data.ok()) {
    std::fprintf(stderr, "%s\n", data.status().ToString().c_str());
    return 1;
  }
  TrainerOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.lora.rank = absl::GetFlag(FLAGS_lora_rank);
  options.max_seq_len = absl::GetFlag(FLAGS_max_seq_len);
  options.retain_freed_memory = absl::GetFlag(FLAGS_retain_freed_memory);
  options.logprob_chunk_tokens = absl::GetFlag(FLAGS_logprob_chunk_tokens);
  auto dtype = ParseDtype(absl::GetFlag(FLAGS_dtype), /*on_gpu=*/false);
  if (!dtype.ok()) {
    std::fprintf(stderr, "--dtype: %s\n", dtype.status().ToString().c_str());
    return 1;
  }
  options.dtype = *dtype;
  auto recompute = ParseRecompute(absl::GetFlag(FLAGS_recompute));
  if (!recompute.ok()) {
    std::fprintf(stderr, "%s\n", recompute.status().ToString().c_str());
    return 1;
  }
  options.recompute = *recompute;
  // The rank's device, as dp_worker places it (a GPU by local rank when one is visible).
  auto env = [](const char* name) -> const char* { return std::getenv(name); };
  auto info = lathe::parallel::DiscoverRankInfo(env);
  if (!info.ok()) {
    std::fprintf(stderr, "%s\n", info.status().ToString().c_str());
    return 1;
  }
  auto choice = lathe::parallel::ChooseDevice(*info, env, DetectedGpus());
  if (!choice.ok()) {
    std::fprintf(stderr, "%s\n", choice.status().ToString().c_str());
    return 1;
  }
  options.device = ComputeDevice(*choice);
  std::unique_ptr<lathe::parallel::ParallelContext> ctx;
  if (world > 1) {
    auto made = MakeModelContext(options.model_dir, absl::GetFlag(FLAGS_replicas), absl::GetFlag(FLAGS_node_count),
                                 absl::GetFlag(FLAGS_tp), absl::GetFlag(FLAGS_ep), absl::Minutes(10),
                                 absl::GetFlag(FLAGS_cp), options.device);
    if (!made.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", rank, made.status().ToString().c_str());
      return 1;
    }
    ctx = std::move(*made);
    options.parallel = ctx.get();
  }
  auto trainer = Trainer::Create(options);
  if (!trainer.ok()) {
    std::fprintf(stderr, "%s\n", trainer.status().ToString().c_str());
    return 1;
  }
  lathe::v1::ForwardBackwardInput batch;
  batch.set_loss_fn("cross_entropy");
  for (const auto& d : *data) *batch.add_data() = d;
  lathe::v1::AdamParams adam;
  double seconds = 0, tokens = 0, loss = 0;
  const int64_t warmup = absl::GetFlag(FLAGS_warmup), steps = absl::GetFlag(FLAGS_steps);
  for (int64_t step = 0; step < warmup + steps; ++step) {
    auto start = std::chrono::steady_clock::now();
    auto fb = (*trainer)->ForwardBackward(batch);
    auto opt = (*trainer)->OptimStep(adam);
    if (!fb.ok() || !opt.ok()) {
      std::fprintf(stderr, "%s %s\n", fb.status().ToString().c_str(), opt.status().ToString().c_str());
      return 1;
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (step == 0) loss = fb->metrics().at("loss:sum");
    if (step >= warmup) {
      seconds += s;
      tokens += fb->metrics().at("num_tokens:sum");
    }
  }
  // The largest peak resident set over the ranks.
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  long peak_kib = usage.ru_maxrss, max_kib = 0;
  MPI_Reduce(&peak_kib, &max_kib, 1, MPI_LONG, MPI_MAX, 0, MPI_COMM_WORLD);
  if (rank != 0) return 0;
  if (steps == 0) return 0;
  std::printf("{\"tokens_per_s\": %.3f, \"seconds\": %.4f, \"first_loss\": %.6f, \"device\": \"%s\", "
              "\"max_rank_peak_rss_mib\": %.1f}\n",
              tokens / seconds, seconds, loss, options.device < 0 ? "cpu" : "cuda", static_cast<double>(max_kib) / 1024.0);
  return 0;
}
