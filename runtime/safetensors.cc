// Safetensors reading (mmap + full header validation), sharded folders, and the atomic,
// Python-compatible writer. Format: u64 LE header length N, N bytes of JSON, tensor data.
#include "runtime/safetensors.h"

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
#include "runtime/status.h"

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

int DtypeRank(const std::string& dtype) {
  for (size_t i = 0; i < std::size(kDtypes); ++i) {
    if (dtype == kDtypes[i].name) return static_cast<int>(i);
  }
  return -1;
}

// Bytes of a tensor; false for a negative dim or on overflow.
bool TensorBytes(const std::vector<int64_t>& shape, size_t elem_size, uint64_t* bytes) {
  uint64_t n = elem_size;
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(dim), &n)) return false;
  }
  *bytes = n;
  return true;
}

// Parses JSON without throwing; the error text is nlohmann's.
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
  if (!TensorBytes(e.view.shape, elem_size, &bytes)) return bad("shape x dtype size overflows");
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
  const int rank = DtypeRank(dtype);
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

namespace {

// JSON string escaping exactly as serde_json (the Python library's serializer) does it.
void AppendJsonString(absl::string_view s, std::string* out) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\b': out->append("\\b"); break;
      case '\f': out->append("\\f"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      default:
        if (c < 0x20) {
          absl::StrAppendFormat(out, "\\u%04x", c);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

// Checks every tensor and returns them in the Python writer's order.
absl::StatusOr<std::vector<const TensorToWrite*>> OrderForWrite(
    const std::vector<TensorToWrite>& tensors) {
  std::set<std::string> seen;
  std::vector<const TensorToWrite*> order;
  for (const TensorToWrite& t : tensors) {
    auto bad = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': ", what));
    };
    if (t.name == "__metadata__") return bad("reserved name");
    if (!seen.insert(t.name).second) return bad("duplicate name");
    const size_t elem_size = DtypeSize(t.dtype);
    if (elem_size == 0) return bad(absl::StrCat("unknown dtype '", t.dtype, "'"));
    uint64_t bytes = 0;
    if (!TensorBytes(t.shape, elem_size, &bytes)) return bad("negative dim or size overflow");
    if (bytes != t.nbytes) {
      return bad(absl::StrFormat("nbytes %d but shape x dtype needs %d", t.nbytes, bytes));
    }
    if (t.data == nullptr && t.nbytes > 0) return bad("null data");
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    const int ra = DtypeRank(a->dtype), rb = DtypeRank(b->dtype);
    return ra != rb ? ra > rb : a->name < b->name;
  });
  return order;
}

std::string BuildHeader(const std::vector<const TensorToWrite*>& order,
                        const std::map<std::string, std::string>& metadata) {
  std::string h = "{";
  if (!metadata.empty()) {
    h.append("\"__metadata__\":{");
    for (const auto& [key, value] : metadata) {
      if (h.back() != '{') h.push_back(',');
      AppendJsonString(key, &h);
      h.push_back(':');
      AppendJsonString(value, &h);
    }
    h.push_back('}');
  }
  uint64_t offset = 0;
  for (const TensorToWrite* t : order) {
    if (h.size() > 1) h.push_back(',');
    AppendJsonString(t->name, &h);
    absl::StrAppend(&h, ":{\"dtype\":\"", t->dtype, "\",\"shape\":[",
                    absl::StrJoin(t->shape, ","), "],\"data_offsets\":[", offset, ",",
                    offset + t->nbytes, "]}");
    offset += t->nbytes;
  }
  h.push_back('}');
  h.append((8 - h.size() % 8) % 8, ' ');
  return h;
}

absl::Status WriteAll(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return absl::ErrnoToStatus(errno, absl::StrCat("write ", path));
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status WriteFile(int fd, const std::string& tmp, const std::string& header,
                       const std::vector<const TensorToWrite*>& order) {
  unsigned char len[8];  // little-endian on any host
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(header.size() >> (8 * i));
  LATHE_RETURN_IF_ERROR(WriteAll(fd, len, sizeof(len), tmp));
  LATHE_RETURN_IF_ERROR(WriteAll(fd, header.data(), header.size(), tmp));
  for (const TensorToWrite* t : order) {
    LATHE_RETURN_IF_ERROR(WriteAll(fd, t->data, t->nbytes, tmp));
  }
  if (::fsync(fd) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("fsync ", tmp));
  return absl::OkStatus();
}

// Makes the rename durable; a crash before this may leave either the old or the new file.
absl::Status SyncParentDir(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open ", dir));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return absl::ErrnoToStatus(err, absl::StrCat("fsync ", dir));
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  LATHE_ASSIGN_OR_RETURN(std::vector<const TensorToWrite*> order, OrderForWrite(tensors));
  const std::string header = BuildHeader(order, metadata);
  // Our own reader (and Python's) rejects a header that is not valid UTF-8 JSON.
  if (!Json::accept(header)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor names and metadata must be valid UTF-8"));
  }
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("create ", tmp));
  absl::Status s = WriteFile(fd, tmp, header, order);
  if (::close(fd) != 0 && s.ok()) s = absl::ErrnoToStatus(errno, absl::StrCat("close ", tmp));
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    s = absl::ErrnoToStatus(errno, absl::StrCat("rename ", tmp, " to ", path));
  }
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  return SyncParentDir(path);
}

}  // namespace lathe::runtime
