// The single-process SFT loop.
#include "runtime/sft_job.h"

#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "runtime/trainer.h"

namespace lathe::runtime {

absl::StatusOr<SftSummary> RunSft(const SftOptions& o) {
  LATHE_ASSIGN_OR_RETURN(std::vector<lathe::v1::Datum> data, ReadSftJsonl(o.data_path));
  // Progress lines go to stdout on reporting ranks only.
  auto say = [&o](const char* fmt, auto... args) {
    if (!o.report) return;
    std::printf(fmt, args...);
    std::fflush(stdout);
  };
  say("lathe sft: loading %s\n", o.model_dir.c_str());
  auto load_start = std::chrono::steady_clock::now();
  TrainerOptions options{o.model_dir, o.lora, 0, 0};
  options.parallel = o.parallel;
  options.dtype = o.dtype;
  LATHE_ASSIGN_OR_RETURN(auto trainer, Trainer::Create(options));
  say("lathe sft: loaded in %.1fs\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count());
  TrainerInfo info = trainer->GetInfo();
  say("lathe sft: %s, %s, %s, %lld trainable parameters, %zu datums, %lld steps of %lld\n",
              info.architecture.c_str(), DtypeName(info.dtype), o.lora.full_finetune() ? "full fine-tuning" :
              absl::StrCat("LoRA rank ", o.lora.rank).c_str(),
              static_cast<long long>(info.trainable_parameters), data.size(),
              static_cast<long long>(o.steps), static_cast<long long>(o.batch_size));
  lathe::v1::AdamParams adam;
  adam.set_learning_rate(o.learning_rate);
  adam.set_grad_clip_norm(o.grad_clip_norm);
  SftSummary summary;
  double total_tokens = 0, total_seconds = 0;
  size_t cursor = 0;
  for (int64_t step = 1; step <= o.steps; ++step) {
    auto start = std::chrono::steady_clock::now();
    lathe::v1::ForwardBackwardInput batch;
    batch.set_loss_fn("cross_entropy");
    for (int64_t i = 0; i < o.batch_size; ++i, cursor = (cursor + 1) % data.size()) {
      *batch.add_data() = data[cursor];
    }
    LATHE_ASSIGN_OR_RETURN(auto fb, trainer->ForwardBackward(batch));
    LATHE_ASSIGN_OR_RETURN(auto opt, trainer->OptimStep(adam));
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double tokens = fb.metrics().at("num_tokens:sum");
    double loss = fb.metrics().at("loss:sum") / std::max(1.0, fb.metrics().at("num_loss_tokens:sum"));
    total_tokens += tokens;
    total_seconds += seconds;
    if (step == 1) summary.first_loss = loss;
    summary.last_loss = loss;
    double eta = total_seconds / static_cast<double>(step) * static_cast<double>(o.steps - step);
    say("step %4lld/%lld  loss %.4f  grad_norm %.3f  %.0f tokens/s  eta %.0fs\n",
                static_cast<long long>(step), static_cast<long long>(o.steps), loss,
                opt.metrics().at("grad_norm:mean"), tokens / seconds, eta);
  }
  summary.tokens_per_second = total_seconds > 0 ? total_tokens / total_seconds : 0;
  return summary;
}

}  // namespace lathe::runtime
