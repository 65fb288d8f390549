// The checkpoint store on a real folder: corrupt or foreign manifests are
// skipped or DataLoss (never a crash), links never lead out of a checkpoint,
// page tokens are checked, expiry times near INT64_MAX do not wrap.
#include "coordinator/checkpoint_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "coordinator/checkpoint_meta.h"

namespace lathe::coordinator {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

void Write(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

std::string Manifest(const std::string& times) {
  return absl::StrCat(R"({"format": "lathe-checkpoint-1", "tensors": [], "lora": {})", times.empty() ? "" : ", ",
                      times, "}");
}

class CheckpointStoreTest : public ::testing::Test {
 protected:
  CheckpointStoreTest()
      : base_(fs::temp_directory_path() / absl::StrCat("lathe_ckpt_test_", ::getpid(), "_", Counter()++)),
        root_(base_ / "root"),
        outside_(base_ / "outside"),
        store_(root_.string()) {
    fs::create_directories(root_);
    Write(outside_ / "secret.txt", "outside the root");
  }
  ~CheckpointStoreTest() override { fs::remove_all(base_); }

  static int& Counter() {
    static int n = 0;
    return n;
  }

  // A training checkpoint <root>/<run>/weights/<name> with one shard file.
  fs::path Training(const std::string& run, const std::string& name, const std::string& manifest) {
    const fs::path dir = root_ / run / "weights" / name;
    Write(dir / "node_rank-0" / "rank-0.safetensors", "shard");
    Write(dir / "manifest.json", manifest);
    return dir;
  }
  fs::path Sampler(const std::string& run, const std::string& name, const std::string& sidecar) {
    const fs::path dir = root_ / run / "sampler_weights" / name;
    Write(dir / "adapter_config.json", "{}");
    Write(dir / "adapter_model.safetensors", "adapter");
    Write(dir / "lathe_sampler.json", sidecar);
    return dir;
  }

  std::vector<std::string> ListedIds(const std::string& run_id = "") {
    absl::StatusOr<std::vector<lathe::v1::Checkpoint>> list = store_.List(run_id);
    EXPECT_TRUE(list.ok()) << list.status();
    std::vector<std::string> ids;
    for (const auto& c : list.value_or(std::vector<lathe::v1::Checkpoint>{})) ids.push_back(c.id());
    return ids;
  }
  absl::StatusCode FilesCode(const std::string& id, const std::string& token = "") {
    lathe::v1::GetCheckpointFilesRequest request;
    request.set_checkpoint_id(id);
    request.set_page_token(token);
    return store_.Files(request).status().code();
  }
  std::vector<std::string> FileNames(const std::string& id) {
    lathe::v1::GetCheckpointFilesRequest request;
    request.set_checkpoint_id(id);
    absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> page = store_.Files(request);
    EXPECT_TRUE(page.ok()) << page.status();
    std::vector<std::string> names;
    if (!page.ok()) return names;
    for (const auto& f : page->files()) names.push_back(f.relative_file_name());
    return names;
  }
  // The file's bytes, or the status of the download.
  absl::StatusOr<std::string> Download(const std::string& id, const std::string& name) {
    std::string data;
    absl::Status s = store_.Download(id, name, [&](const lathe::v1::FileChunk& c) {
      data += c.data();
      return true;
    });
    if (!s.ok()) return s;
    return data;
  }

  fs::path base_, root_, outside_;
  CheckpointStore store_;
};

using Ids = std::vector<std::string>;

TEST_F(CheckpointStoreTest, AWrongTypedExpiryIsSkippedByExpiryAndListingAndDataLossWhenAsked) {
  Training("run-a", "good", Manifest(R"("created_unix_ms": 5, "expires_unix_ms": 0)"));
  Training("run-a", "bad", Manifest(R"("created_unix_ms": 6, "expires_unix_ms": "never")"));
  EXPECT_EQ(store_.Expire(absl::Now()), 0);
  EXPECT_EQ(ListedIds(), (Ids{"lathe://run-a/weights/good"}));
  const std::string bad = "lathe://run-a/weights/bad";
  EXPECT_EQ(FilesCode(bad), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Download(bad, "manifest.json").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(store_.Delete(bad).ok());  // a corrupt checkpoint can still be removed
  EXPECT_FALSE(fs::exists(root_ / "run-a" / "weights" / "bad"));
}

TEST_F(CheckpointStoreTest, AWrongTypedCreationTimeDoesNotFailTheListing) {
  Training("run-a", "good", Manifest(R"("created_unix_ms": 5)"));
  Training("run-a", "bad", Manifest(R"("created_unix_ms": "yesterday")"));
  EXPECT_EQ(ListedIds("run-a"), (Ids{"lathe://run-a/weights/good"}));
}

TEST_F(CheckpointStoreTest, EveryKindOfCorruptManifestIsSkippedAndDataLoss) {
  const std::vector<std::string> corrupt = {
      "",
      "not json",
      "[1, 2]",
      "\"a string\"",
      R"({"tensors": []})",                          // no format: not lathe's
      R"({"format": 1})",                            // format of the wrong type
      R"({"format": "someone-else-1"})",             // a foreign manifest
      Manifest(R"("expires_unix_ms": 1.5)"),
      Manifest(R"("expires_unix_ms": -1)"),
      Manifest(R"("expires_unix_ms": 18446744073709551615)"),  // > INT64_MAX
      Manifest(R"("expires_unix_ms": [1])"),
      Manifest(R"("created_unix_ms": {"ms": 1})"),
      Manifest(R"("created_unix_ms": true)"),
      Manifest(absl::StrCat(R"("x": )", std::string(100000, '['), std::string(100000, ']'))),  // too deep
      Manifest(R"("x": [1, 2)"),  // truncated
  };
  for (size_t i = 0; i < corrupt.size(); ++i) {
    const std::string name = absl::StrCat("c", i);
    Training("run-a", name, corrupt[i]);
    EXPECT_EQ(FilesCode(absl::StrCat("lathe://run-a/weights/", name)), absl::StatusCode::kDataLoss) << corrupt[i];
  }
  Training("run-a", "good", Manifest(R"("expires_unix_ms": null)"));  // null: no expiry
  // Nesting as deep as a real manifest's and more is fine.
  Training("run-a", "nested", Manifest(absl::StrCat(R"("x": )", std::string(32, '['), std::string(32, ']'))));
  EXPECT_EQ(store_.Expire(absl::Now()), 0);
  Ids listed = ListedIds();
  std::sort(listed.begin(), listed.end());
  EXPECT_EQ(listed, (Ids{"lathe://run-a/weights/good", "lathe://run-a/weights/nested"}));
}

TEST_F(CheckpointStoreTest, ACorruptSamplerSidecarIsSkippedAndDataLoss) {
  Sampler("run-a", "good", R"({"created_unix_ms": 1, "expires_unix_ms": 0})");
  Sampler("run-a", "bad", R"({"created_unix_ms": 1, "expires_unix_ms": "soon"})");
  EXPECT_EQ(store_.Expire(absl::Now()), 0);
  EXPECT_EQ(ListedIds(), (Ids{"lathe://run-a/sampler_weights/good"}));
  EXPECT_EQ(FilesCode("lathe://run-a/sampler_weights/bad"), absl::StatusCode::kDataLoss);
  fs::remove(root_ / "run-a" / "sampler_weights" / "good" / "lathe_sampler.json");
  EXPECT_EQ(FileNames("lathe://run-a/sampler_weights/good"),
            (Ids{"adapter_config.json", "adapter_model.safetensors"}));  // no sidecar: no metadata, fine
}

TEST_F(CheckpointStoreTest, ParsesTheTimesItNeeds) {
  absl::StatusOr<CheckpointMeta> meta =
      ParseCheckpointMeta(Manifest(R"("created_unix_ms": 7, "expires_unix_ms": 9223372036854775807)"), "weights");
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->created_unix_ms, 7);
  EXPECT_EQ(meta->expires_unix_ms, kMax);
  meta = ParseCheckpointMeta("{}", "sampler_weights");
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_FALSE(meta->created_unix_ms.has_value());
  EXPECT_EQ(meta->expires_unix_ms, 0);
  EXPECT_EQ(ParseCheckpointMeta("{}", "weights").status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(CheckpointStoreTest, ExpiryNearInt64MaxIsNotInThePast) {
  const int64_t now = absl::ToUnixMillis(absl::Now());
  Training("run-a", "forever", Manifest(absl::StrCat(R"("created_unix_ms": )", now, R"(, "expires_unix_ms": )", kMax)));
  Training("run-a", "nearly", Manifest(absl::StrCat(R"("expires_unix_ms": )", kMax - 1)));
  Sampler("run-a", "forever", absl::StrCat(R"({"expires_unix_ms": )", kMax, "}"));
  Training("run-a", "due", Manifest(absl::StrCat(R"("expires_unix_ms": )", now - 1)));
  EXPECT_EQ(store_.Expire(absl::Now()), 1);
  Ids listed = ListedIds();
  std::sort(listed.begin(), listed.end());
  EXPECT_EQ(listed, (Ids{"lathe://run-a/sampler_weights/forever", "lathe://run-a/weights/forever",
                         "lathe://run-a/weights/nearly"}));
  EXPECT_EQ(store_.Expire(absl::InfiniteFuture()), 3);
}

// The sweep keeps what it read of each manifest, and reads a manifest again
// once it changed: replaced by a rename (as lathe writes them) or rewritten.
TEST_F(CheckpointStoreTest, AChangedManifestIsReadAgain) {
  const int64_t now = absl::ToUnixMillis(absl::Now());
  const fs::path a = Training("run-a", "a", Manifest(absl::StrCat(R"("expires_unix_ms": )", now + 3600000)));
  const fs::path b = Training("run-a", "b", Manifest(absl::StrCat(R"("expires_unix_ms": )", now + 3600000)));
  EXPECT_EQ(store_.Expire(absl::Now()), 0);
  EXPECT_EQ(store_.Expire(absl::Now()), 0);
  Write(a / "manifest.json.new", Manifest(absl::StrCat(R"("expires_unix_ms": )", now - 1)));
  fs::rename(a / "manifest.json.new", a / "manifest.json");
  Write(b / "manifest.json", Manifest(absl::StrCat(R"("expires_unix_ms": )", 1)));  // in place, shorter
  EXPECT_EQ(store_.Expire(absl::Now()), 2);
  EXPECT_EQ(ListedIds(), Ids{});
}

TEST_F(CheckpointStoreTest, LinksInsideACheckpointAreNeitherListedNorServed) {
  const fs::path dir = Training("run-a", "c", Manifest(""));
  fs::create_symlink(outside_ / "secret.txt", dir / "hostname");
  fs::create_symlink(outside_, dir / "node_rank-1");
  fs::create_symlink("../../../../outside/secret.txt", dir / "node_rank-0" / "relative");
  const std::string id = "lathe://run-a/weights/c";
  EXPECT_EQ(FileNames(id), (Ids{"manifest.json", "node_rank-0/rank-0.safetensors"}));
  for (const std::string name : {"hostname", "node_rank-1/secret.txt", "node_rank-0/relative"}) {
    EXPECT_EQ(Download(id, name).status().code(), absl::StatusCode::kNotFound) << name;
  }
  EXPECT_EQ(*Download(id, "node_rank-0/rank-0.safetensors"), "shard");
}

TEST_F(CheckpointStoreTest, DownloadRefusesPathsThatCouldLeaveTheCheckpoint) {
  Training("run-a", "c", Manifest(""));
  const std::string id = "lathe://run-a/weights/c";
  for (const std::string& name : std::vector<std::string>{
           "../c/manifest.json", "node_rank-0/../manifest.json", "/etc/hostname", "./manifest.json",
           "node_rank-0//rank-0.safetensors", "", "a\nb", std::string(2000, 'a')}) {
    EXPECT_EQ(Download(id, name).status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
  EXPECT_EQ(Download(id, "node_rank-0").status().code(), absl::StatusCode::kNotFound);  // a folder
  EXPECT_EQ(Download(id, "missing").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CheckpointStoreTest, LinkedCheckpointRunAndKindFoldersAreNotCheckpoints) {
  // A complete checkpoint outside the root, reachable through links at each level.
  Write(outside_ / "run-x" / "weights" / "c" / "manifest.json", Manifest(R"("expires_unix_ms": 1)"));
  Write(outside_ / "run-x" / "weights" / "c" / "data", "outside");
  fs::create_directories(root_ / "run-a" / "weights");
  fs::create_symlink(outside_ / "run-x" / "weights" / "c", root_ / "run-a" / "weights" / "linked");
  fs::create_directories(root_ / "run-b");
  fs::create_symlink(outside_ / "run-x" / "weights", root_ / "run-b" / "weights");
  fs::create_symlink(outside_ / "run-x", root_ / "run-c");
  EXPECT_EQ(ListedIds(), Ids{});
  EXPECT_EQ(ListedIds("run-c"), Ids{});
  for (const std::string id : {"lathe://run-a/weights/linked", "lathe://run-b/weights/c", "lathe://run-c/weights/c"}) {
    EXPECT_EQ(FilesCode(id), absl::StatusCode::kNotFound) << id;
    EXPECT_EQ(Download(id, "data").status().code(), absl::StatusCode::kNotFound) << id;
    EXPECT_EQ(store_.Delete(id).code(), absl::StatusCode::kNotFound) << id;
  }
  EXPECT_EQ(store_.Expire(absl::InfiniteFuture()), 0);
  EXPECT_TRUE(fs::exists(outside_ / "run-x" / "weights" / "c" / "data"));
}

TEST_F(CheckpointStoreTest, DeletingACheckpointRemovesLinksInsideItNotTheirTargets) {
  const fs::path dir = Training("run-a", "c", Manifest(R"("expires_unix_ms": 1)"));
  fs::create_symlink(outside_, dir / "escape");
  EXPECT_EQ(store_.Expire(absl::Now()), 1);
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_TRUE(fs::exists(outside_ / "secret.txt"));
}

// A ".replaced" folder left by a removal that died (with a link in it) does
// not block the next delete of the same name, and nothing it links to goes.
TEST_F(CheckpointStoreTest, ALeftoverReplacedFolderDoesNotBlockADelete) {
  const fs::path dir = Training("run-a", "c", Manifest(""));
  const fs::path leftover = root_ / "run-a" / "weights" / "c.replaced";
  Write(leftover / "node_rank-0" / "rank-0.safetensors", "old");
  fs::create_symlink(outside_, leftover / "escape");
  EXPECT_TRUE(store_.Delete("lathe://run-a/weights/c").ok());
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_FALSE(fs::exists(leftover));
  EXPECT_TRUE(fs::exists(outside_ / "secret.txt"));
  EXPECT_EQ(store_.Delete("lathe://run-a/weights/c").code(), absl::StatusCode::kNotFound);
}

TEST_F(CheckpointStoreTest, PageTokensAreCheckedAndNextTokensNeverWrap) {
  const fs::path dir = Training("run-a", "c", Manifest(""));
  for (int i = 0; i < 5; ++i) Write(dir / absl::StrCat("f", i), "x");
  const std::string id = "lathe://run-a/weights/c";
  lathe::v1::GetCheckpointFilesRequest request;
  request.set_checkpoint_id(id);
  request.set_page_size(3);
  std::vector<std::string> all;
  for (int pages = 0; pages < 10; ++pages) {
    absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> page = store_.Files(request);
    ASSERT_TRUE(page.ok()) << page.status();
    EXPECT_EQ(page->total_count(), 7);
    for (const auto& f : page->files()) all.push_back(f.relative_file_name());
    if (page->next_page_token().empty()) break;
    request.set_page_token(page->next_page_token());
  }
  EXPECT_EQ(all.size(), 7u);
  EXPECT_EQ(FilesCode(id, "7"), absl::StatusCode::kOk);  // the end: an empty page
  for (const std::string& token : std::vector<std::string>{
           "2147483600", "2147483647", "8", "-1", "+1", " 1", "1 ", "abc", "0x1", "99999999999",
           std::string(1 << 20, '1')}) {
    EXPECT_EQ(FilesCode(id, token), absl::StatusCode::kInvalidArgument) << token.substr(0, 20);
  }
  request.set_page_token("");
  request.set_page_size(std::numeric_limits<int32_t>::max());
  absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> page = store_.Files(request);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_EQ(page->files_size(), 7);
  EXPECT_TRUE(page->next_page_token().empty());
}

TEST_F(CheckpointStoreTest, RunIdsMayHoldColonsCheckpointNamesMayNot) {
  // The HTTP door names runs "<session_id>:train:<model_seq_id>".
  Training("session-1:train:0", "s1", Manifest(""));
  Training("session-1:train:0", "bad:name", Manifest(""));
  EXPECT_EQ(ListedIds(), std::vector<std::string>{"lathe://session-1:train:0/weights/s1"});
  EXPECT_EQ(ListedIds("session-1:train:0"), std::vector<std::string>{"lathe://session-1:train:0/weights/s1"});
  lathe::v1::GetCheckpointFilesRequest files;
  files.set_checkpoint_id("lathe://session-1:train:0/weights/s1");
  EXPECT_TRUE(store_.Files(files).ok());
  files.set_checkpoint_id("lathe://session-1:train:0/weights/bad:name");
  EXPECT_EQ(store_.Files(files).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(runtime::ValidateRunName("a:b").ok());
  EXPECT_FALSE(runtime::ValidateCheckpointName("a:b").ok());
  EXPECT_FALSE(runtime::ValidateRunName(".a:b").ok());
  EXPECT_FALSE(runtime::ValidateRunName("a/b").ok());
  EXPECT_TRUE(store_.Delete("lathe://session-1:train:0/weights/s1").ok());
  EXPECT_TRUE(ListedIds().empty());
}

TEST_F(CheckpointStoreTest, MessagesQuoteLongInputShortened) {
  const std::string huge(1 << 20, 'x');
  for (const absl::Status& s :
       {store_.List(huge).status(), store_.Delete(huge), store_.Delete("lathe://" + huge + "/weights/c"),
        Download("lathe://run-a/weights/c", huge).status()}) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_LT(s.message().size(), 1024u) << s.message().substr(0, 200);
  }
}

}  // namespace
}  // namespace lathe::coordinator
