// Safetensors reading: mmap, full header validation, sharded folders. Format: u64 LE header length N, N bytes of JSON, tensor data.
#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using Json = nlohmann::json;

// Same limit as the Rust library: larger headers are rejected before parsing.
constexpr uint64_t kMaxHeaderSize = 100'000'000;
// Real headers are two levels deep; the limit keeps hostile nesting from costing stack.
constexpr int kMaxJsonDepth = 64;

struct DtypeInfo {
  const char* name;
  size_t size;
};
// In the order of the Rust library's `Dtype` enum: its writer sorts tensors by descending
// position here, so the order itself is part of the byte format.
constexpr DtypeInfo kDtypes[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
    {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
    {"F32", 4},  {"C64", 8}, {"F64", 8}, {"I64", 8},     {"U64", 8},
};

}  // namespace

int SafetensorsDtypeRank(const std::string& dtype) {
  for (size_t i = 0; i < std::size(kDtypes); ++i) {
    if (dtype == kDtypes[i].name) return static_cast<int>(i);
  }
  return -1;
}

bool SafetensorsTensorBytes(const std::vector<int64_t>& shape, size_t elem_size, uint64_t* bytes) {
  uint64_t n = elem_size;
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(dim), &n)) return false;
  }
  *bytes = n;
  return true;
}

// Parses JSON without throwing; the error text is nlohmann's.
namespace {

absl::StatusOr<Json> ParseJson(const char* begin, const char* end) {
  try {
    Json::parser_callback_t limit_depth = [](int depth, Json::parse_event_t, Json&) {
      if (depth > kMaxJsonDepth) throw std::length_error("JSON nested too deeply");
      return true;
    };
    return Json::parse(begin, end, limit_depth);
  } catch (const std::exception& e) {
    return absl::DataLossError(e.what());
  }
}

// A header entry before its data pointer is set; offsets are relative to the data section.
struct RawEntry {
  TensorView view;
  uint64_t begin = 0;
  uint64_t end = 0;
};

// Checks one tensor's JSON; returns what is wrong as the error message.
absl::StatusOr<RawEntry> ParseEntry(const std::string& name, const Json& j) {
  auto bad = [&](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("tensor '", name, "': ", what));
  };
  if (!j.is_object()) return bad("entry is not an object");
  auto dtype = j.find("dtype");
  auto shape = j.find("shape");
  auto offsets = j.find("data_offsets");
  if (dtype == j.end() || !dtype->is_string()) return bad("missing or non-string dtype");
  if (shape == j.end() || !shape->is_array()) return bad("missing or non-array shape");
  if (offsets == j.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
    return bad("data_offsets must be two non-negative integers");
  }
  RawEntry e;
  e.view.name = name;
  e.view.dtype = dtype->get<std::string>();
  const size_t elem_size = DtypeSize(e.view.dtype);
  if (elem_size == 0) return bad(absl::StrCat("unknown dtype '", e.view.dtype, "'"));
  for (const Json& dim : *shape) {
    if (!dim.is_number_integer()) return bad("shape holds a non-integer");
    if (dim.is_number_unsigned() && dim.get<uint64_t>() > uint64_t{INT64_MAX}) {
      return bad("dim overflows int64");
    }
    e.view.shape.push_back(dim.get<int64_t>());
    if (e.view.shape.back() < 0) return bad("negative dim");
  }
  e.begin = (*offsets)[0].get<uint64_t>();
  e.end = (*offsets)[1].get<uint64_t>();
  if (e.end < e.begin) return bad("data_offsets end before begin");
  uint64_t bytes = 0;
  if (!SafetensorsTensorBytes(e.view.shape, elem_size, &bytes)) return bad("shape x dtype size overflows");
  if (e.end - e.begin != bytes) {
    return bad(absl::StrFormat("data_offsets span %d bytes but shape x dtype needs %d",
                               e.end - e.begin, bytes));
  }
  e.view.nbytes = e.end - e.begin;
  return e;
}

// Tensors sorted by offset must tile [0, data_size) exactly: no holes, overlaps or tail.
absl::Status ValidateLayout(std::vector<const RawEntry*> order, uint64_t data_size) {
  std::sort(order.begin(), order.end(), [](const RawEntry* a, const RawEntry* b) {
    return std::tie(a->begin, a->end) < std::tie(b->begin, b->end);
  });
  uint64_t expected = 0;
  for (const RawEntry* e : order) {
    if (e->begin != expected) {
      return absl::DataLossError(absl::StrFormat(
          "tensor '%s' starts at %d but the previous tensor ends at %d (%s)", e->view.name,
          e->begin, expected, e->begin > expected ? "hole" : "overlap"));
    }
    expected = e->end;
  }
  if (expected != data_size) {
    return absl::DataLossError(absl::StrFormat(
        "tensors end at data offset %d but the file holds %d data bytes", expected, data_size));
  }
  return absl::OkStatus();
}

absl::Status ParseMetadata(const Json& j, std::map<std::string, std::string>* out) {
  if (!j.is_object()) return absl::DataLossError("__metadata__ is not an object");
  for (const auto& [key, value] : j.items()) {
    if (!value.is_string()) {
      return absl::DataLossError(absl::StrCat("__metadata__ value for '", key,
                                              "' is not a string"));
    }
    (*out)[key] = value.get<std::string>();
  }
  return absl::OkStatus();
}

absl::Status WithPath(const std::string& path, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

}  // namespace

size_t DtypeSize(const std::string& dtype) {
  const int rank = SafetensorsDtypeRank(dtype);
  return rank < 0 ? 0 : kDtypes[rank].size;
}

// ---------------------------------------------------------------- SafetensorsFile

SafetensorsFile::SafetensorsFile(std::string path, const uint8_t* base, size_t size)
    : path_(std::move(path)), base_(base), size_(size) {}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) munmap(const_cast<uint8_t*>(base_), size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("no such file: ", path));
    return absl::ErrnoToStatus(errno, absl::StrCat("open ", path));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("fstat ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(
        absl::StrFormat("%s: file is %d bytes, shorter than the 8-byte header length", path,
                        size));
  }
  void* base = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int mmap_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (base == MAP_FAILED) return absl::ErrnoToStatus(mmap_errno, absl::StrCat("mmap ", path));
  // Readers go through the whole file front to back: ask the kernel to read
  // ahead now rather than fault page by page (a hint; failure is harmless).
  madvise(base, size, MADV_SEQUENTIAL);
  madvise(base, size, MADV_WILLNEED);
  std::unique_ptr<SafetensorsFile> file(
      new SafetensorsFile(path, static_cast<const uint8_t*>(base), size));
  absl::Status s = file->ParseHeader();
  if (!s.ok()) return WithPath(path, s);
  return file;
}

absl::Status SafetensorsFile::ParseHeader() {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | base_[i];  // little-endian on any host
  if (n > kMaxHeaderSize) {
    return absl::DataLossError(
        absl::StrFormat("header length %d exceeds the limit %d", n, kMaxHeaderSize));
  }
  if (8 + n > size_) {
    return absl::DataLossError(
        absl::StrFormat("header length %d runs past the end of the %d-byte file", n, size_));
  }
  const char* text = reinterpret_cast<const char*>(base_ + 8);
  if (n == 0 || text[0] != '{') return absl::DataLossError("header does not start with '{'");
  // nlohmann stops at a NUL as if at end of input; serde_json (Python) rejects it.
  if (std::memchr(text, '\0', n) != nullptr) return absl::DataLossError("header holds a NUL byte");
  absl::StatusOr<Json> header = ParseJson(text, text + n);
  if (!header.ok()) {
    return absl::DataLossError(
        absl::StrCat("header is not valid JSON: ", header.status().message()));
  }
  if (!header->is_object()) return absl::DataLossError("header is not a JSON object");

  std::vector<RawEntry> raw;
  for (const auto& [key, value] : header->items()) {
    if (key == "__metadata__") {
      LATHE_RETURN_IF_ERROR(ParseMetadata(value, &metadata_));
      continue;
    }
    LATHE_ASSIGN_OR_RETURN(RawEntry e, ParseEntry(key, value));
    raw.push_back(std::move(e));
  }
  std::vector<const RawEntry*> order;
  for (const RawEntry& e : raw) order.push_back(&e);
  LATHE_RETURN_IF_ERROR(ValidateLayout(std::move(order), size_ - 8 - n));

  const uint8_t* data = base_ + 8 + n;
  for (RawEntry& e : raw) {
    e.view.data = data + e.begin;
    e.view.offset = 8 + n + e.begin;
    names_.push_back(e.view.name);
    entries_.emplace(e.view.name, std::move(e.view));
  }
  std::sort(names_.begin(), names_.end());
  return absl::OkStatus();
}

absl::StatusOr<TensorView> SafetensorsFile::Get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", name, "' not found in ", path_));
  }
  return it->second;
}

// ---------------------------------------------------------------- SafetensorsCheckpoint

namespace {

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return absl::StrCat(dir, "/", name);
}

// Reads the index and returns its weight_map; DataLoss for anything malformed.
absl::StatusOr<std::map<std::string, std::string>> ReadWeightMap(const std::string& path) {
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (errno != 0) return absl::ErrnoToStatus(errno, absl::StrCat("open ", path));
    return absl::UnknownError(absl::StrCat("cannot open ", path));
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  absl::StatusOr<Json> index = ParseJson(text.data(), text.data() + text.size());
  if (!index.ok()) return absl::DataLossError(absl::StrCat(path, ": ", index.status().message()));
  auto weight_map = index->is_object() ? index->find("weight_map") : index->end();
  if (!index->is_object() || weight_map == index->end() || !weight_map->is_object()) {
    return absl::DataLossError(absl::StrCat(path, ": no \"weight_map\" object"));
  }
  auto metadata = index->find("metadata");
  if (metadata != index->end() && !metadata->is_object() && !metadata->is_null()) {
    return absl::DataLossError(absl::StrCat(path, ": \"metadata\" is not an object"));
  }
  std::map<std::string, std::string> out;
  for (const auto& [tensor, value] : weight_map->items()) {
    const std::string shard = value.is_string() ? value.get<std::string>() : "";
    // Shards are plain file names beside the index; anything else could escape the folder.
    if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos) {
      return absl::DataLossError(
          absl::StrCat(path, ": weight_map entry for '", tensor, "' is not a shard file name"));
    }
    out[tensor] = shard;
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir) {
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint(dir));
  const std::string index = JoinPath(dir, "model.safetensors.index.json");
  if (FileExists(index)) {
    LATHE_RETURN_IF_ERROR(ckpt->LoadIndex(index));
    return ckpt;
  }
  const std::string single = JoinPath(dir, "model.safetensors");
  if (!FileExists(single)) {
    return absl::NotFoundError(
        absl::StrCat("no model.safetensors or model.safetensors.index.json in ", dir));
  }
  LATHE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single));
  for (const std::string& name : file->names()) ckpt->by_name_[name] = file.get();
  ckpt->files_.push_back(std::move(file));
  return ckpt;
}

absl::Status SafetensorsCheckpoint::LoadIndex(const std::string& index_path) {
  LATHE_ASSIGN_OR_RETURN(auto weight_map, ReadWeightMap(index_path));
  std::map<std::string, const SafetensorsFile*> shards;  // each file mapped once
  for (const auto& [tensor, shard] : weight_map) {
    auto it = shards.find(shard);
    if (it == shards.end()) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
          SafetensorsFile::Open(JoinPath(dir_, shard));
      if (absl::IsNotFound(file.status())) {
        return absl::DataLossError(absl::StrCat(index_path, ": shard '", shard,
                                                "' named in weight_map is missing"));
      }
      if (!file.ok()) return file.status();
      it = shards.emplace(shard, file->get()).first;
      files_.push_back(std::move(file).value());
    }
    if (!it->second->Contains(tensor)) {
      return absl::DataLossError(absl::StrCat(index_path, ": tensor '", tensor,
                                              "' is listed but absent from shard '", shard, "'"));
    }
    by_name_[tensor] = it->second;
  }
  return absl::OkStatus();
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& entry : by_name_) out.push_back(entry.first);
  return out;
}

absl::StatusOr<TensorView> SafetensorsCheckpoint::Get(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", name, "' not found in ", dir_));
  }
  return it->second->Get(name);
}

// ---------------------------------------------------------------- WriteSafetensors

}  // namespace lathe::runtime
