// service_bench: a client of a running deployment that measures
//   --round_trips N: an empty operation's round trip (Submit noop + Retrieve)
//     next to a bare unary call (Health), N of each, interleaved;
//   --data F: forward_backward + optim_step steps on the whole file as one
//     batch (warmup untimed), as bench/train_bench does in process.
// Prints one JSON line; bench/service_throughput.py drives it.
#include <algorithm>
#include <chrono>
#include <deque>
#include <cstdio>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "client/lathe_client.h"
#include "core/sft_data.h"

ABSL_FLAG(std::string, address, "127.0.0.1:7777", "coordinator host:port");
ABSL_FLAG(int, round_trips, 0, "empty-operation round trips to time (0: skip)");
ABSL_FLAG(std::string, data, "", "JSONL datums; the whole file is one batch (empty: skip)");
ABSL_FLAG(int, lora_rank, 32, "LoRA rank; 0 = full fine-tuning");
ABSL_FLAG(int64_t, warmup, 1, "untimed steps");
ABSL_FLAG(int64_t, steps, 3, "timed steps");
ABSL_FLAG(int, queued_steps, 2, "steps kept submitted ahead of the one awaited (1: strictly one at a time)");

namespace {

using lathe::client::Client;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "service_bench: %s\n", s.ToString().c_str());
  return 1;
}

// Median of the per-call times, in microseconds.
double MedianUs(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2] * 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  lathe::client::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  auto client = Client::Connect(options);
  if (absl::Status s = client->WaitServing(absl::Seconds(120)); !s.ok()) return Fail(s);
  lathe::v1::LoraConfig lora;
  lora.set_rank(absl::GetFlag(FLAGS_lora_rank));
  auto created = client->CreateRun(lora, absl::Minutes(30));
  if (!created.ok()) return Fail(created.status());
  lathe::client::TrainingRun& run = created->first;
  std::printf("{");
  if (int n = absl::GetFlag(FLAGS_round_trips); n > 0) {
    std::vector<double> bare, op, submit, retrieve;
    for (int i = 0; i < n + 50; ++i) {  // the first 50 of each warm the connection
      auto start = Clock::now();
      if (auto h = client->Health(); !h.ok()) return Fail(h.status());
      if (i >= 50) bare.push_back(Seconds(start));
      start = Clock::now();
      auto future = run.Noop();
      if (!future.ok()) return Fail(future.status());
      const double submitted = Seconds(start);
      if (auto r = future->result(absl::Seconds(30)); !r.ok()) return Fail(r.status());
      if (i >= 50) op.push_back(Seconds(start)), submit.push_back(submitted), retrieve.push_back(op.back() - submitted);
    }
    std::printf("\"bare_unary_us\": %.1f, \"empty_op_us\": %.1f, \"submit_us\": %.1f, \"retrieve_us\": %.1f",
                MedianUs(bare), MedianUs(op), MedianUs(submit), MedianUs(retrieve));
  }
  if (std::string path = absl::GetFlag(FLAGS_data); !path.empty()) {
    auto data = lathe::runtime::ReadSftJsonl(path);
    if (!data.ok()) return Fail(data.status());
    lathe::v1::ForwardBackwardInput batch;
    batch.set_loss_fn("cross_entropy");
    for (const auto& d : *data) *batch.add_data() = d;
    const int64_t warmup = absl::GetFlag(FLAGS_warmup), steps = absl::GetFlag(FLAGS_steps);
    const size_t queued = std::max(1, absl::GetFlag(FLAGS_queued_steps));
    double tokens = 0, loss = 0;
    Clock::time_point start;
    // As `lathe train` does: keep `queued` steps submitted; time from the
    // end of the warmup steps to the end of the last.
    std::deque<std::pair<lathe::client::OpFuture, lathe::client::OpFuture>> pending;
    int64_t submitted = 0;
    for (int64_t step = 0; step < warmup + steps; ++step) {
      while (submitted < warmup + steps && pending.size() < queued) {
        auto fb = run.ForwardBackward(batch);
        if (!fb.ok()) return Fail(fb.status());
        auto opt = run.OptimStep(lathe::v1::AdamParams());
        if (!opt.ok()) return Fail(opt.status());
        pending.emplace_back(*fb, *opt);
        ++submitted;
      }
      auto fb_result = pending.front().first.result(absl::Minutes(30));
      if (!fb_result.ok()) return Fail(fb_result.status());
      if (auto r = pending.front().second.result(absl::Minutes(30)); !r.ok()) return Fail(r.status());
      pending.pop_front();
      if (step == 0) loss = fb_result->forward_backward().metrics().at("loss:sum");
      if (step + 1 == warmup) start = Clock::now();
      if (step >= warmup) tokens += fb_result->forward_backward().metrics().at("num_tokens:sum");
    }
    const double seconds = Seconds(start);
    std::printf("%s\"tokens_per_s\": %.3f, \"seconds\": %.4f, \"first_loss\": %.6f",
                absl::GetFlag(FLAGS_round_trips) > 0 ? ", " : "", tokens / seconds, seconds, loss);
  }
  std::printf("}\n");
  return 0;
}
