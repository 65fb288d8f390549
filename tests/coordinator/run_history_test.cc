// Run histories on disk: appends, torn lines, repeated op ids.
#include "coordinator/run_history.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace lathe::coordinator {
namespace {

std::string TempRoot() {
  std::string templ = (std::filesystem::temp_directory_path() / "run_history_test_XXXXXX").string();
  return mkdtemp(templ.data());
}

TEST(RunHistoryTest, AppendsLinesAndReadsThemBack) {
  const std::string root = TempRoot();
  RunHistory history(root);
  ASSERT_TRUE(history.Append("r1", {{"op_id", "r1/1"}, {"loss", 1.5}}).ok());
  ASSERT_TRUE(history.Append("r1", {{"op_id", "r1/2"}, {"loss", 0.5}}).ok());
  auto lines = history.Read("r1");
  ASSERT_TRUE(lines.ok()) << lines.status();
  ASSERT_EQ(lines->size(), 2u);
  EXPECT_EQ((*lines)[1]["loss"], 0.5);
  EXPECT_TRUE(std::filesystem::exists(root + "/r1/history.jsonl"));
  EXPECT_EQ(history.Read("other").status().code(), absl::StatusCode::kNotFound);
  std::filesystem::remove_all(root);
}

TEST(RunHistoryTest, SkipsTornLinesAndKeepsTheLastOfAnOpId) {
  const std::string root = TempRoot();
  RunHistory history(root);
  ASSERT_TRUE(history.Append("r", {{"op_id", "r/1"}, {"v", 1}}).ok());
  ASSERT_TRUE(history.Append("r", {{"op_id", "r/2"}, {"v", 2}}).ok());
  { std::ofstream(history.PathOf("r"), std::ios::app) << "{\"op_id\": \"r/3\", \"v\""; }  // cut by a crash
  { std::ofstream(history.PathOf("r"), std::ios::app) << "\n"; }
  // Lines of other field types (a hand-edited file) are skipped, not read.
  { std::ofstream(history.PathOf("r"), std::ios::app) << "{\"op_id\": 7}\n{\"type\": []}\n{\"metrics\": 1}\n"; }
  ASSERT_TRUE(history.Append("r", {{"op_id", "r/1"}, {"v", 10}}).ok());  // written again after a restart
  auto lines = history.Read("r");
  ASSERT_TRUE(lines.ok()) << lines.status();
  ASSERT_EQ(lines->size(), 2u);
  EXPECT_EQ((*lines)[0]["v"], 10);
  EXPECT_EQ((*lines)[1]["v"], 2);
  auto newest = history.Read("r", 1);
  ASSERT_TRUE(newest.ok());
  ASSERT_EQ(newest->size(), 1u);
  EXPECT_EQ((*newest)[0]["v"], 10);  // the file's last line
  std::filesystem::remove_all(root);
}

TEST(RunHistoryTest, LinksAreNotFollowed) {
  const std::string root = TempRoot(), outside = TempRoot();
  RunHistory elsewhere(outside);
  ASSERT_TRUE(elsewhere.Append("r", {{"op_id", "r/1"}}).ok());
  std::filesystem::create_directory_symlink(outside + "/r", root + "/linked");
  RunHistory history(root);
  EXPECT_EQ(history.Read("linked").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(history.Append("linked", {{"op_id", "linked/1"}}).ok());
  std::filesystem::create_directory(root + "/file");
  std::filesystem::create_symlink(outside + "/r/history.jsonl", root + "/file/history.jsonl");
  EXPECT_EQ(history.Read("file").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(history.Append("file", {{"op_id", "file/1"}}).ok());
  auto kept = elsewhere.Read("r");
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ(kept->size(), 1u);  // nothing was written through the links
  std::filesystem::remove_all(root);
  std::filesystem::remove_all(outside);
}

TEST(RunHistoryTest, WithoutARootNothingIsWritten) {
  RunHistory history("");
  EXPECT_FALSE(history.enabled());
  EXPECT_TRUE(history.Append("r", {{"op_id", "r/1"}}).ok());
  EXPECT_EQ(history.Read("r").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lathe::coordinator
