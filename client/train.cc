// The client-side SFT loop.
#include "client/train.h"

#include <cstdio>
#include <deque>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/sft_data.h"
#include "core/status.h"

namespace lathe::client {
namespace {

struct Step {
  int64_t index = 0;
  OpFuture forward_backward;
  OpFuture optim_step;
};

absl::StatusOr<Step> SubmitStep(TrainingRun& run, const std::vector<lathe::v1::Datum>& data, size_t& cursor,
                                int64_t index, const TrainOptions& o) {
  lathe::v1::ForwardBackwardInput batch;
  batch.set_loss_fn("cross_entropy");
  for (int64_t i = 0; i < o.batch_size; ++i, cursor = (cursor + 1) % data.size()) *batch.add_data() = data[cursor];
  lathe::v1::AdamParams adam;
  adam.set_learning_rate(o.learning_rate);
  adam.set_grad_clip_norm(o.grad_clip_norm);
  LATHE_ASSIGN_OR_RETURN(OpFuture fb, run.ForwardBackward(batch));
  LATHE_ASSIGN_OR_RETURN(OpFuture opt, run.OptimStep(adam));
  return Step{index, fb, opt};
}

}  // namespace

absl::StatusOr<TrainSummary> Train(Client& client, const TrainOptions& o) {
  LATHE_ASSIGN_OR_RETURN(std::vector<lathe::v1::Datum> data, runtime::ReadSftJsonl(o.data_path));
  if (data.empty()) return absl::InvalidArgumentError(absl::StrCat(o.data_path, " holds no datums"));
  if (o.steps < 1 || o.batch_size < 1) return absl::InvalidArgumentError("--steps and --batch_size must be >= 1");
  auto say = [&o](const std::string& line) {
    if (o.print) std::printf("%s\n", line.c_str()), std::fflush(stdout);
  };
  const absl::Time create_start = absl::Now();
  LATHE_ASSIGN_OR_RETURN(auto created, client.CreateRun(o.lora, o.op_timeout));
  TrainingRun& run = created.first;
  const lathe::v1::RunInfo& info = created.second;
  say(absl::StrCat("lathe train: run ", run.run_id(), " on ", info.base_model(), " (",
                   info.lora().rank() == 0 ? "full fine-tuning" : absl::StrCat("LoRA rank ", info.lora().rank()), ", ",
                   info.trainable_parameters(), " trainable parameters, ", info.layout().replicas(),
                   " replica(s)), ready in ", absl::FormatDuration(absl::Trunc(absl::Now() - create_start, absl::Milliseconds(1)))));
  TrainSummary summary;
  summary.run_id = run.run_id();
  size_t cursor = 0;
  std::deque<Step> in_flight;
  double tokens = 0;
  absl::Time first_done, last_done = absl::Now();
  for (int64_t next = 1; next <= o.steps || !in_flight.empty();) {
    // Keep two steps queued on the deployment.
    while (next <= o.steps && in_flight.size() < 2) {
      LATHE_ASSIGN_OR_RETURN(Step s, SubmitStep(run, data, cursor, next, o));
      in_flight.push_back(s);
      ++next;
    }
    Step step = in_flight.front();
    in_flight.pop_front();
    absl::StatusOr<lathe::v1::OpResult> fb = step.forward_backward.result(o.op_timeout);
    if (!fb.ok()) return absl::Status(fb.status().code(), absl::StrCat("step ", step.index, ": ", fb.status().message()));
    absl::StatusOr<lathe::v1::OpResult> opt = step.optim_step.result(o.op_timeout);
    if (!opt.ok()) return absl::Status(opt.status().code(), absl::StrCat("step ", step.index, ": ", opt.status().message()));
    const auto& m = fb->forward_backward().metrics();
    const double loss = m.at("loss:sum") / std::max(1.0, m.at("num_loss_tokens:sum"));
    const absl::Time now = absl::Now();
    if (step.index == 1) summary.first_loss = loss, first_done = now;
    else tokens += m.at("num_tokens:sum");
    summary.last_loss = loss;
    const double rate = step.index > 1 ? tokens / absl::ToDoubleSeconds(now - first_done) : 0;
    const double per_step = absl::ToDoubleSeconds(now - last_done);
    last_done = now;
    say(absl::StrFormat("step %4d/%d  loss %.4f  grad_norm %.3f  %.0f tokens/s  eta %.0fs", step.index, o.steps, loss,
                        opt->optim_step().metrics().at("grad_norm:mean"), rate,
                        per_step * static_cast<double>(o.steps - step.index)));
  }
  summary.tokens_per_second = o.steps > 1 ? tokens / absl::ToDoubleSeconds(last_done - first_done) : 0;
  if (!o.save_name.empty()) {
    lathe::v1::SubmitRequest save;
    save.mutable_save_state()->set_name(o.save_name);
    LATHE_ASSIGN_OR_RETURN(OpFuture future, run.Submit(std::move(save)));
    LATHE_ASSIGN_OR_RETURN(lathe::v1::OpResult saved, future.result(o.op_timeout));
    summary.checkpoint = saved.save_state().path();
    say(absl::StrCat("lathe train: saved ", summary.checkpoint));
  }
  return summary;
}

}  // namespace lathe::client
