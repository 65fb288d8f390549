// One Gated DeltaNet layer's math (tensor/gated_delta_net.h), forward and forward+backward,
// on random inputs of one sequence (or --docs packed ones): wall and process CPU
// milliseconds per call (medians of --reps after a warm-up; CPU time is the figure to read
// on a busy machine).
// bench/gated_delta_net.py runs it next to transformers' torch path.
//   build/bench/gdn_bench [--tokens 4096] [--docs 1] [--k_heads 16] [--v_heads 16] [--head_dim 128]
//                         [--threads 1] [--reps 5]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "tensor/gated_delta_net.h"

ABSL_FLAG(int64_t, tokens, 4096, "sequence length");
ABSL_FLAG(int64_t, k_heads, 16, "key heads");
ABSL_FLAG(int64_t, v_heads, 16, "value heads");
ABSL_FLAG(int64_t, head_dim, 128, "key and value head dim");
ABSL_FLAG(int, threads, 1, "intra-op threads");
ABSL_FLAG(int, reps, 5, "timed calls");
ABSL_FLAG(int64_t, docs, 1, "packed sequences of equal length (tokens / docs each)");

namespace {

double CpuMillis() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

struct Timing {
  double wall_ms;
  double cpu_ms;  // of the whole process (all threads)
};

// Medians over `reps` calls after one warm-up call.
template <typename F>
Timing Measure(F f, int reps) {
  f();
  std::vector<double> wall, cpu;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    const double cpu_start = CpuMillis();
    f();
    cpu.push_back(CpuMillis() - cpu_start);
    wall.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(wall.begin(), wall.end());
  std::sort(cpu.begin(), cpu.end());
  return {wall[wall.size() / 2], cpu[cpu.size() / 2]};
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  at::set_num_threads(absl::GetFlag(FLAGS_threads));
  at::manual_seed(0);
  lathe::runtime::GdnDims d;
  d.num_k_heads = absl::GetFlag(FLAGS_k_heads);
  d.num_v_heads = absl::GetFlag(FLAGS_v_heads);
  d.head_k_dim = d.head_v_dim = absl::GetFlag(FLAGS_head_dim);
  const int64_t t = absl::GetFlag(FLAGS_tokens), docs = absl::GetFlag(FLAGS_docs);
  if (docs < 1 || t % docs != 0) {
    std::fprintf(stderr, "--docs %lld must be >= 1 and divide --tokens %lld\n", static_cast<long long>(docs),
                 static_cast<long long>(t));
    return 1;
  }
  const std::vector<int64_t> lengths(docs, t / docs);
  auto leaf = [](at::Tensor x) { return x.requires_grad_(true); };
  lathe::runtime::GdnInputs in{leaf(at::randn({t, d.conv_dim()})), leaf(at::randn({t, d.value_dim()})),
                               leaf(at::randn({t, d.num_v_heads})), leaf(at::randn({t, d.num_v_heads}))};
  lathe::runtime::GdnWeights w{leaf(at::randn({d.conv_dim(), d.conv_kernel}) * 0.5),
                               leaf(at::rand({d.num_v_heads}) * 2.7), leaf(at::ones({d.num_v_heads})),
                               leaf(at::ones({d.head_v_dim}))};
  const at::Tensor grad = at::randn({t, d.value_dim()});
  const int reps = absl::GetFlag(FLAGS_reps);
  const Timing fwd = Measure([&] {
    at::NoGradGuard no_grad;
    lathe::runtime::GatedDeltaNet(d, w, in, lengths);
  }, reps);
  const Timing fwd_bwd = Measure([&] {
    at::Tensor out = lathe::runtime::GatedDeltaNet(d, w, in, lengths);
    torch::autograd::backward({out}, {grad});
  }, reps);
  std::printf(
      "{\"tokens\": %lld, \"docs\": %lld, \"threads\": %d, \"forward_ms\": %.2f, \"forward_cpu_ms\": %.2f, "
      "\"forward_backward_ms\": %.2f, \"forward_backward_cpu_ms\": %.2f}\n",
      static_cast<long long>(t), static_cast<long long>(docs), absl::GetFlag(FLAGS_threads), fwd.wall_ms,
      fwd.cpu_ms, fwd_bwd.wall_ms, fwd_bwd.cpu_ms);
  return 0;
}
