// lathe_sft: SFT of a Hugging Face model folder on a JSONL file of token-id
// datums, in one process or sharded under mpirun; can also generate a tiny
// model and synthetic data.
#include <mpi.h>

#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "runtime/parallel_setup.h"
#include "runtime/sft_job.h"
#include "runtime/tiny_model.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder (config.json + *.safetensors)");
ABSL_FLAG(std::string, data, "", "JSONL file of datums (see runtime/sft_job.h for the format)");
ABSL_FLAG(int64_t, steps, 20, "optimizer steps to run");
ABSL_FLAG(int64_t, batch_size, 8, "datums per step");
ABSL_FLAG(double, learning_rate, 1e-3, "AdamW learning rate");
ABSL_FLAG(double, grad_clip_norm, 0.0, "global gradient-norm clip; 0 = off");
ABSL_FLAG(int64_t, lora_rank, 32, "LoRA rank; 0 = full fine-tuning");
ABSL_FLAG(double, lora_alpha, 32.0, "LoRA alpha (scale alpha / rank)");
ABSL_FLAG(std::string, dtype, "", "compute precision: float32 or bfloat16; empty: float32 (CPU)");
ABSL_FLAG(int64_t, seed, 0, "LoRA initialisation seed");
ABSL_FLAG(std::string, make_tiny_model, "", "write a random tiny Qwen3-MoE model to this folder first");
ABSL_FLAG(std::string, make_data, "", "write synthetic SFT data to this JSONL file first");
ABSL_FLAG(int, replicas, 1, "data-parallel replicas (under mpirun; the world size is replicas x node_count x devices per node)");
ABSL_FLAG(int, node_count, 1, "nodes per replica");
ABSL_FLAG(int, tp, 1, "tensor-parallel degree inside a node");
ABSL_FLAG(int, ep, 1, "expert-parallel degree inside a replica");
ABSL_FLAG(int, cp, 1, "context-parallel degree: ranks of a data group that split each sequence");
ABSL_FLAG(int, collective_timeout_s, 600, "seconds a collective may wait for its peers before the run fails");
ABSL_FLAG(double, min_loss_drop, 0.0, "exit 1 unless the last step's loss is below the first's by this fraction");

int Main();

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("supervised fine-tuning, one process or sharded under mpirun; --helpfull lists the flags");
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  absl::ParseCommandLine(argc, argv);
  int rc = Main();
  MPI_Finalize();
  return rc;
}

int Main() {
  using namespace lathe::runtime;
  int world = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // The tiny model and data are written once, by rank 0, before anyone reads them.
  int setup_rc = 0;
  if (rank == 0) {
    if (std::string dir = absl::GetFlag(FLAGS_make_tiny_model); !dir.empty()) {
      if (auto s = WriteTinyModel(dir, TinyModelSpec{}); !s.ok()) {
        std::fprintf(stderr, "lathe_sft: %s\n", s.ToString().c_str());
        setup_rc = 1;
      } else {
        std::printf("wrote tiny Qwen3-MoE model to %s\n", dir.c_str());
      }
    }
    if (std::string path = absl::GetFlag(FLAGS_make_data); !path.empty() && setup_rc == 0) {
      if (auto s = WriteSyntheticSftData(path, TinyModelSpec{}.vocab_size, 256, 64, 1); !s.ok()) {
        std::fprintf(stderr, "lathe_sft: %s\n", s.ToString().c_str());
        setup_rc = 1;
      } else {
        std::printf("wrote synthetic SFT data to %s\n", path.c_str());
      }
    }
  }
  MPI_Bcast(&setup_rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  if (setup_rc != 0) return setup_rc;
  if (absl::GetFlag(FLAGS_model).empty() || absl::GetFlag(FLAGS_data).empty()) {
    if (!absl::GetFlag(FLAGS_make_tiny_model).empty() || !absl::GetFlag(FLAGS_make_data).empty()) return 0;
    std::fprintf(stderr, "lathe_sft: --model and --data are required (see --help)\n");
    return 2;
  }
  SftOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model);
  o.data_path = absl::GetFlag(FLAGS_data);
  o.steps = absl::GetFlag(FLAGS_steps);
  o.batch_size = absl::GetFlag(FLAGS_batch_size);
  o.learning_rate = absl::GetFlag(FLAGS_learning_rate);
  o.grad_clip_norm = absl::GetFlag(FLAGS_grad_clip_norm);
  o.lora.rank = absl::GetFlag(FLAGS_lora_rank);
  o.lora.alpha = absl::GetFlag(FLAGS_lora_alpha);
  o.lora.seed = static_cast<uint64_t>(absl::GetFlag(FLAGS_seed));
  absl::StatusOr<Dtype> dtype = ParseDtype(absl::GetFlag(FLAGS_dtype), /*on_gpu=*/false);
  if (!dtype.ok()) {
    std::fprintf(stderr, "lathe sft: --dtype: %s\n", dtype.status().ToString().c_str());
    return 2;
  }
  o.dtype = *dtype;
  std::unique_ptr<lathe::parallel::ParallelContext> ctx;
  if (world > 1) {
    auto made = MakeModelContext(o.model_dir, absl::GetFlag(FLAGS_replicas), absl::GetFlag(FLAGS_node_count),
                                 absl::GetFlag(FLAGS_tp), absl::GetFlag(FLAGS_ep),
                                 absl::Seconds(absl::GetFlag(FLAGS_collective_timeout_s)), absl::GetFlag(FLAGS_cp));
    if (!made.ok()) {
      if (rank == 0) std::fprintf(stderr, "lathe_sft: %s\n", made.status().ToString().c_str());
      return 2;
    }
    ctx = std::move(*made);
    o.parallel = ctx.get();
    o.report = rank == 0;
    if (rank == 0) {
      const auto& s = ctx->shape;
      std::printf("lathe sft: %d ranks: replicas %d x node_count %d x devices_per_node %d, tp %d, cp %d, ep %d\n",
                  world, s.replicas, s.node_count, s.devices_per_node, s.tp, s.cp, s.ep);
    }
  }
  auto summary = RunSft(o);
  if (!summary.ok()) {
    std::fprintf(stderr, "lathe_sft: %s\n", summary.status().ToString().c_str());
    return 1;
  }
  if (rank != 0) return 0;
  std::printf("done: loss %.4f -> %.4f, %.0f tokens/s\n", summary->first_loss, summary->last_loss,
              summary->tokens_per_second);
  double drop = absl::GetFlag(FLAGS_min_loss_drop);
  return summary->last_loss <= summary->first_loss * (1.0 - drop) ? 0 : 1;
}
