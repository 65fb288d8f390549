// InvariantLinear against at::mm (MKL) on decode-shaped products: time per
// call and the ratio, for row counts 1..64.
//   build/bench/linear_bench [--k 1024] [--n 3072] [--threads 2]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "tensor/invariant_linear.h"

ABSL_FLAG(int64_t, k, 1024, "input width");
ABSL_FLAG(int64_t, n, 3072, "output width");
ABSL_FLAG(int, threads, 2, "intra-op threads");

namespace {

template <typename F>
double Millis(F f) {
  for (int i = 0; i < 3; ++i) f();
  int reps = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < 0.3 || reps < 5) {
    f();
    ++reps;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return elapsed / reps * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  at::set_num_threads(absl::GetFlag(FLAGS_threads));
  const int64_t k = absl::GetFlag(FLAGS_k), n = absl::GetFlag(FLAGS_n);
  at::Tensor w = at::randn({n, k});
  std::printf("k %lld n %lld threads %d\n%6s %12s %12s %8s\n", static_cast<long long>(k), static_cast<long long>(n),
              absl::GetFlag(FLAGS_threads), "rows", "mm ms", "invariant ms", "ratio");
  for (int64_t m : {1, 2, 4, 8, 16, 32, 64}) {
    at::Tensor x = at::randn({m, k});
    const double base = Millis([&] { at::mm(x, w.t()); });
    const double ours = Millis([&] { lathe::runtime::InvariantLinear(x, w); });
    std::printf("%6lld %12.3f %12.3f %7.2fx\n", static_cast<long long>(m), base, ours, base / ours);
  }
  return 0;
}
