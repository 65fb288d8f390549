// A test fixture for writers of files from a trainer: a small tiny model
// written once per suite, and a fresh empty folder per test.
#ifndef LATHE_TESTS_RUNTIME_TINY_MODEL_TEST_H_
#define LATHE_TESTS_RUNTIME_TINY_MODEL_TEST_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "runtime/tiny_model.h"

namespace lathe::runtime {

// `Name` names the suite's folders under the test temp dir.
template <const char* Name>
class TinyModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    TinyModelSpec spec;
    spec.vocab_size = 64;
    spec.hidden_size = 32;
    spec.head_dim = 8;
    spec.num_experts = 4;
    ASSERT_TRUE(WriteTinyModel(Model(), spec).ok());
  }
  static std::string Model() { return ::testing::TempDir() + "/" + Name + "_model"; }

  void SetUp() override {
    root_ = ::testing::TempDir() + "/" + Name + "/" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  // The names in the test's folder, sorted.
  std::vector<std::string> Entries() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(root_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

  std::string root_;
};

}  // namespace lathe::runtime

#endif  // LATHE_TESTS_RUNTIME_TINY_MODEL_TEST_H_
