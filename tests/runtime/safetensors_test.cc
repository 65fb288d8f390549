// Unit tests for the safetensors reader/writer: round trips, exact bytes, corrupt files,
// and sharded Hugging Face folders.
#include "core/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace lathe::runtime {
namespace {

// A fresh folder per test under the GoogleTest temp dir.
std::string MakeTestDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir = absl::StrCat(::testing::TempDir(), "/safetensors_", info->test_suite_name(),
                                 "_", info->name(), "_", ::getpid());
  for (char& c : dir) {
    if (c == '.') c = '_';
  }
  ::mkdir(dir.c_str(), 0755);
  return dir;
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string U64Le(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out;
}

// A file with the given header text (unpadded) followed by `data_size` zero bytes.
std::string RawFile(const std::string& header, size_t data_size) {
  return U64Le(header.size()) + header + std::string(data_size, '\0');
}

std::string ViewBytes(const TensorView& v) {
  return std::string(reinterpret_cast<const char*>(v.data), v.nbytes);
}

TEST(DtypeSizeTest, KnownAndUnknown) {
  EXPECT_EQ(DtypeSize("BOOL"), 1u);
  EXPECT_EQ(DtypeSize("F8_E4M3"), 1u);
  EXPECT_EQ(DtypeSize("F8_E5M2"), 1u);
  EXPECT_EQ(DtypeSize("BF16"), 2u);
  EXPECT_EQ(DtypeSize("F16"), 2u);
  EXPECT_EQ(DtypeSize("I32"), 4u);
  EXPECT_EQ(DtypeSize("F32"), 4u);
  EXPECT_EQ(DtypeSize("I64"), 8u);
  EXPECT_EQ(DtypeSize("U64"), 8u);
  EXPECT_EQ(DtypeSize("F128"), 0u);
  EXPECT_EQ(DtypeSize("f32"), 0u);
}

TEST(SafetensorsTest, RoundTripMixedDtypesWithMetadata) {
  const std::string path = MakeTestDir() + "/mixed.safetensors";
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x4049, 0x0000};
  const std::vector<int64_t> i64 = {-1, int64_t{1} << 40, 42};
  const float scalar = 9.75f;
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"step", "7"}};
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"w.f32", "F32", {2, 3}, f32.data(), 24},
                                {"w.bf16", "BF16", {4}, bf16.data(), 8},
                                {"ids", "I64", {3}, i64.data(), 24},
                                {"scale", "F32", {}, &scalar, 4},
                                {"empty", "F32", {0, 5}, nullptr, 0}},
                               metadata)
                  .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->names(),
            (std::vector<std::string>{"empty", "ids", "scale", "w.bf16", "w.f32"}));
  EXPECT_EQ((*file)->metadata(), metadata);
  EXPECT_EQ((*file)->path(), path);

  auto check = [&](const std::string& name, const std::string& dtype,
                   const std::vector<int64_t>& shape, const void* data, size_t nbytes) {
    SCOPED_TRACE(name);
    auto v = (*file)->Get(name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->name, name);
    EXPECT_EQ(v->dtype, dtype);
    EXPECT_EQ(v->shape, shape);
    ASSERT_EQ(v->nbytes, nbytes);
    EXPECT_EQ(ViewBytes(*v), std::string(static_cast<const char*>(data), nbytes));
  };
  check("w.f32", "F32", {2, 3}, f32.data(), 24);
  check("w.bf16", "BF16", {4}, bf16.data(), 8);
  check("ids", "I64", {3}, i64.data(), 24);
  check("scale", "F32", {}, &scalar, 4);
  check("empty", "F32", {0, 5}, "", 0);
}

TEST(SafetensorsTest, KnownTinyFileBytes) {
  const std::string path = MakeTestDir() + "/tiny.safetensors";
  const int32_t data[4] = {0, 1, 2, 3};
  ASSERT_TRUE(WriteSafetensors(path, {{"test", "I32", {2, 2}, data, 16}}).ok());
  const std::string header = R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})";
  ASSERT_EQ(header.size(), 60u);  // padded to 64 with four spaces
  const std::string expected = U64Le(64) + header + "    " +
                               std::string(reinterpret_cast<const char*>(data), 16);
  EXPECT_EQ(ReadBytes(path), expected);
}

TEST(SafetensorsTest, WriterOrdersByDtypeThenNameAndEscapes) {
  const std::string path = MakeTestDir() + "/order.safetensors";
  const char zeros[16] = {};
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"b", "I64", {1}, zeros, 8},
                                {"a", "F32", {1}, zeros, 4},
                                {"z", "BF16", {1}, zeros, 2},
                                {"a\"\n", "I64", {1}, zeros, 8},
                                {"c", "F64", {1}, zeros, 8}},
                               {{"format", "pt"}})
                  .ok());
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("a\"\n":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]},)"
      R"("c":{"dtype":"F64","shape":[1],"data_offsets":[16,24]},)"
      R"("a":{"dtype":"F32","shape":[1],"data_offsets":[24,28]},)"
      R"("z":{"dtype":"BF16","shape":[1],"data_offsets":[28,30]}})";
  const std::string bytes = ReadBytes(path);
  const size_t padded = (header.size() + 7) / 8 * 8;
  ASSERT_EQ(bytes.size(), 8 + padded + 30);
  EXPECT_EQ(bytes.substr(0, 8), U64Le(padded));
  EXPECT_EQ(bytes.substr(8, padded), header + std::string(padded - header.size(), ' '));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->Contains("a\"\n"));
}

TEST(SafetensorsTest, WriterRejectsBadInputAndLeavesNoFile) {
  const std::string dir = MakeTestDir();
  const std::string path = dir + "/bad.safetensors";
  const char zeros[16] = {};
  const std::vector<std::vector<TensorToWrite>> cases = {
      {{"a", "F32", {1}, zeros, 4}, {"a", "F32", {1}, zeros, 4}},  // duplicate
      {{"a", "F33", {1}, zeros, 4}},                               // unknown dtype
      {{"a", "F32", {2}, zeros, 4}},                               // nbytes mismatch
      {{"a", "F32", {-1}, zeros, 4}},                              // negative dim
      {{"__metadata__", "F32", {1}, zeros, 4}},                    // reserved name
      {{"\xff", "F32", {1}, zeros, 4}},                            // not UTF-8
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    absl::Status s = WriteSafetensors(path, cases[i]);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << "case " << i << ": " << s;
  }
  struct stat st;
  EXPECT_NE(::stat(path.c_str(), &st), 0);
  EXPECT_NE(::stat(absl::StrCat(path, ".tmp.", ::getpid()).c_str(), &st), 0);
}

TEST(SafetensorsTest, OverwriteReplacesFileAtomically) {
  const std::string path = MakeTestDir() + "/over.safetensors";
  const float one = 1.0f, two = 2.0f;
  ASSERT_TRUE(WriteSafetensors(path, {{"x", "F32", {}, &one, 4}}).ok());
  ASSERT_TRUE(WriteSafetensors(path, {{"y", "F32", {}, &two, 4}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->names(), std::vector<std::string>{"y"});
  struct stat st;
  EXPECT_NE(::stat(absl::StrCat(path, ".tmp.", ::getpid()).c_str(), &st), 0);

  // Rewrite the file from its own mapping, adding a tensor.
  TensorView y = (*file)->Get("y").value();
  ASSERT_TRUE(WriteSafetensors(path, {{"y", y.dtype, y.shape, y.data, y.nbytes},
                                      {"x", "F32", {}, &one, 4}})
                  .ok());
  auto reread = SafetensorsFile::Open(path);
  ASSERT_TRUE(reread.ok()) << reread.status();
  EXPECT_EQ((*reread)->names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(ViewBytes((*reread)->Get("y").value()),
            std::string(reinterpret_cast<const char*>(&two), 4));
}

TEST(SafetensorsTest, MissingFileAndMissingTensorAreNotFound) {
  const std::string dir = MakeTestDir();
  EXPECT_TRUE(absl::IsNotFound(SafetensorsFile::Open(dir + "/nope.safetensors").status()));
  const std::string path = dir + "/one.safetensors";
  const float x = 1.0f;
  ASSERT_TRUE(WriteSafetensors(path, {{"x", "F32", {}, &x, 4}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  absl::Status s = (*file)->Get("y").status();
  EXPECT_TRUE(absl::IsNotFound(s));
  EXPECT_NE(s.message().find("'y'"), std::string::npos) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_FALSE((*file)->Contains("y"));
}

TEST(SafetensorsTest, AcceptsHandBuiltEdgeCases) {
  const std::string dir = MakeTestDir();
  struct Case {
    std::string header;
    size_t data_size;
  };
  const std::vector<Case> cases = {
      {"{}", 0},  // no tensors
      {R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 2},  // unpadded header
      {R"({"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
       R"("a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})", 4},  // empty at the end
      {R"({"__metadata__":{},"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1],)"
       R"("extra":1}})", 1},  // unknown fields are ignored, as in the Rust reader
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = absl::StrCat(dir, "/ok", i, ".safetensors");
    WriteBytes(path, RawFile(cases[i].header, cases[i].data_size));
    auto file = SafetensorsFile::Open(path);
    EXPECT_TRUE(file.ok()) << "case " << i << ": " << file.status();
  }
}

struct CorruptCase {
  const char* label;
  std::string bytes;
};

std::vector<CorruptCase> CorruptCases(const std::string& valid) {
  const std::string t = R"("t":{"dtype":"F32","shape":[2],"data_offsets":)";
  auto header_len = [&](uint64_t n) { return U64Le(n) + valid.substr(8); };
  uint64_t valid_n = 0;
  std::memcpy(&valid_n, valid.data(), 8);  // tests run on little-endian hosts
  const std::string nested = std::string(100000, '[') + std::string(100000, ']');
  return {
      {"shorter than 8 bytes", std::string("\x08\0\0\0", 4)},
      {"truncated by 1 byte", valid.substr(0, valid.size() - 1)},
      {"one byte appended", valid + "x"},
      {"header length too large", header_len(200'000'000)},
      {"header length past file end", header_len(valid.size())},
      {"header length 0", header_len(0)},
      {"header length low bit flipped", header_len(valid_n ^ 0x1)},
      {"header length high bit flipped", header_len(valid_n ^ (uint64_t{1} << 60))},
      {"bad JSON", RawFile(R"({"t":{"dtype":)", 0)},
      {"not an object", RawFile("[1,2]", 0)},
      {"leading space", RawFile(R"( {})", 0)},
      {"nested too deep", RawFile("{\"a\":" + nested + "}", 0)},
      {"NUL in header", RawFile(std::string("{}\0x", 4), 0)},
      {"invalid UTF-8", RawFile("{\"\xff\":1}", 0)},
      {"entry not object", RawFile(R"({"t":5})", 0)},
      {"missing dtype", RawFile(R"({"t":{"shape":[1],"data_offsets":[0,4]}})", 4)},
      {"missing shape", RawFile(R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", 4)},
      {"missing offsets", RawFile(R"({"t":{"dtype":"F32","shape":[1]}})", 4)},
      {"dtype not string", RawFile(R"({"t":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4)},
      {"shape not array", RawFile(R"({"t":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", 4)},
      {"float dim", RawFile(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8)},
      {"three offsets", RawFile("{" + t + "[0,8,8]}}", 8)},
      {"negative offset", RawFile("{" + t + "[-8,0]}}", 8)},
      {"bad dtype", RawFile(R"({"t":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", 16)},
      {"negative dim", RawFile(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", 0)},
      {"end before begin", RawFile("{" + t + "[8,0]}}", 8)},
      {"size mismatch", RawFile("{" + t + "[0,12]}}", 12)},
      {"shape overflow",
       RawFile(R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})",
               0)},
      {"hole between tensors",
       RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12)},
      {"overlapping tensors",
       RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)},
      {"not starting at 0", RawFile("{" + t + "[4,12]}}", 12)},
      {"metadata value not string", RawFile(R"({"__metadata__":{"a":1}})", 0)},
      {"metadata not object", RawFile(R"({"__metadata__":"pt"})", 0)},
  };
}

TEST(SafetensorsTest, CorruptFilesAreDataLossNamingTheFile) {
  const std::string dir = MakeTestDir();
  const std::string valid_path = dir + "/valid.safetensors";
  const float data[3] = {1, 2, 3};
  ASSERT_TRUE(WriteSafetensors(valid_path, {{"t", "F32", {3}, data, 12}}).ok());
  const std::string valid = ReadBytes(valid_path);
  ASSERT_TRUE(SafetensorsFile::Open(valid_path).ok());
  int index = 0;
  for (const CorruptCase& c : CorruptCases(valid)) {
    const std::string path = absl::StrCat(dir, "/corrupt", index++, ".safetensors");
    WriteBytes(path, c.bytes);
    absl::Status s = SafetensorsFile::Open(path).status();
    EXPECT_TRUE(absl::IsDataLoss(s)) << c.label << ": " << s;
    EXPECT_NE(s.message().find(path), std::string::npos) << c.label << ": " << s;
  }
}

// Writes a two-shard folder: a, b in shard 1; c in shard 2.
void WriteShardedFolder(const std::string& dir, const std::string& index_json) {
  const float a = 1, b = 2, c = 3;
  ASSERT_TRUE(WriteSafetensors(dir + "/model-00001-of-00002.safetensors",
                               {{"a", "F32", {}, &a, 4}, {"b", "F32", {}, &b, 4}})
                  .ok());
  ASSERT_TRUE(
      WriteSafetensors(dir + "/model-00002-of-00002.safetensors", {{"c", "F32", {}, &c, 4}})
          .ok());
  WriteBytes(dir + "/model.safetensors.index.json", index_json);
}

const char kIndex[] = R"({"metadata":{"total_size":12},"weight_map":{
  "a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors",
  "c":"model-00002-of-00002.safetensors"}})";

TEST(SafetensorsCheckpointTest, ShardedFolderRoundTrip) {
  const std::string dir = MakeTestDir();
  WriteShardedFolder(dir, kIndex);
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->names(), (std::vector<std::string>{"a", "b", "c"}));
  for (const auto& [name, value] : std::vector<std::pair<std::string, float>>{
           {"a", 1.0f}, {"b", 2.0f}, {"c", 3.0f}}) {
    auto v = (*ckpt)->Get(name);
    ASSERT_TRUE(v.ok()) << v.status();
    float got;
    std::memcpy(&got, v->data, 4);
    EXPECT_EQ(got, value) << name;
  }
  EXPECT_FALSE((*ckpt)->Contains("d"));
  EXPECT_TRUE(absl::IsNotFound((*ckpt)->Get("d").status()));
}

TEST(SafetensorsCheckpointTest, MissingShardIsDataLossNamingIt) {
  const std::string dir = MakeTestDir();
  WriteShardedFolder(dir, kIndex);
  ASSERT_EQ(::unlink((dir + "/model-00002-of-00002.safetensors").c_str()), 0);
  absl::Status s = SafetensorsCheckpoint::Open(dir).status();
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("model-00002-of-00002.safetensors"), std::string::npos) << s;
}

TEST(SafetensorsCheckpointTest, TensorAbsentFromItsShardIsDataLoss) {
  const std::string dir = MakeTestDir();
  WriteShardedFolder(dir, R"({"weight_map":{"a":"model-00001-of-00002.safetensors",
                              "c":"model-00001-of-00002.safetensors"}})");
  absl::Status s = SafetensorsCheckpoint::Open(dir).status();
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("'c'"), std::string::npos) << s;
}

TEST(SafetensorsCheckpointTest, MalformedIndexIsDataLoss) {
  const std::vector<std::string> bad = {
      "{\"weight_map\":", "[]", "{}", R"({"weight_map":[]})", R"({"weight_map":{"a":1}})",
      R"({"weight_map":{"a":"../x.safetensors"}})", R"({"metadata":3,"weight_map":{}})"};
  for (const std::string& index : bad) {
    const std::string dir = MakeTestDir();
    WriteShardedFolder(dir, index);
    absl::Status s = SafetensorsCheckpoint::Open(dir).status();
    EXPECT_TRUE(absl::IsDataLoss(s)) << index << ": " << s;
  }
}

TEST(SafetensorsCheckpointTest, SingleFileFolder) {
  const std::string dir = MakeTestDir();
  const int64_t x[2] = {5, 6};
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", {{"x", "I64", {2}, x, 16}}).ok());
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->names(), std::vector<std::string>{"x"});
  auto v = (*ckpt)->Get("x");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(ViewBytes(*v), std::string(reinterpret_cast<const char*>(x), 16));
}

TEST(SafetensorsCheckpointTest, EmptyFolderIsNotFound) {
  EXPECT_TRUE(absl::IsNotFound(SafetensorsCheckpoint::Open(MakeTestDir()).status()));
}

}  // namespace
}  // namespace lathe::runtime
