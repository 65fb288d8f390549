// InvariantLinear: every row's result is bitwise the same whatever the row
// count, the neighbouring rows and the thread count; close to at::mm.
#include "tensor/invariant_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <array>

namespace lathe::runtime {
namespace {

TEST(InvariantLinearTest, RowsDoNotDependOnTheBatch) {
  at::manual_seed(3);
  for (auto [k, n] : std::vector<std::pair<int64_t, int64_t>>{{64, 96}, {100, 37}, {1024, 256}, {7, 5}, {16, 1}}) {
    at::Tensor w = at::randn({n, k});
    at::Tensor x = at::randn({70, k});
    at::Tensor whole = InvariantLinear(x, w);
    EXPECT_TRUE(at::allclose(whole, at::mm(x, w.t()), 1e-4, 1e-4)) << k << "x" << n;
    for (int64_t m : {1, 2, 3, 5, 8, 13, 16, 17, 33}) {
      for (int64_t off : {0, 1, 30}) {
        ASSERT_TRUE(at::equal(InvariantLinear(x.narrow(0, off, m), w), whole.narrow(0, off, m)))
            << "k " << k << " n " << n << " rows " << m << " at " << off;
      }
    }
    // Other rows beside it change nothing.
    at::Tensor other = x.clone();
    other.narrow(0, 1, 69).normal_();
    EXPECT_TRUE(at::equal(InvariantLinear(other, w)[0], whole[0]));
  }
}

TEST(InvariantLinearTest, EveryKernelGivesTheSameBits) {
  at::manual_seed(6);
  for (auto [m, k, n] : std::vector<std::array<int64_t, 3>>{{1, 64, 9}, {7, 100, 13}, {16, 1024, 40}, {3, 5, 4}}) {
    at::Tensor x = at::randn({m, k}), w = at::randn({n, k});
    at::Tensor portable = InvariantLinear(x, w, InvariantKernel::kPortable);
    for (InvariantKernel kernel : {InvariantKernel::kAvx2, InvariantKernel::kAvx512}) {
      if (!InvariantKernelSupported(kernel)) continue;
      EXPECT_TRUE(at::equal(InvariantLinear(x, w, kernel), portable))
          << static_cast<int>(kernel) << " " << m << "x" << k;
    }
  }
}

TEST(InvariantLinearTest, ThreadCountChangesNothing) {
  at::manual_seed(4);
  at::Tensor w = at::randn({515, 333});
  at::Tensor x = at::randn({9, 333});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  at::Tensor one = InvariantLinear(x, w);
  at::set_num_threads(std::max(2, threads));
  at::Tensor more = InvariantLinear(x, w);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, more));
}

TEST(InvariantLinearTest, StridedInputsAndOtherDtypes) {
  at::manual_seed(5);
  at::Tensor w = at::randn({40, 24});
  at::Tensor x = at::randn({24, 6}).t();  // not contiguous
  EXPECT_TRUE(at::allclose(InvariantLinear(x, w), at::mm(x, w.t()), 1e-5, 1e-5));
  at::Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble);
  at::Tensor yd = InvariantLinear(xd, wd);
  EXPECT_EQ(yd.sizes(), (at::IntArrayRef{6, 40}));
  EXPECT_TRUE(at::allclose(yd, at::mm(xd, wd.t())));
  EXPECT_EQ(InvariantLinear(at::randn({0, 24}), w).sizes(), (at::IntArrayRef{0, 40}));
}

}  // namespace
}  // namespace lathe::runtime
