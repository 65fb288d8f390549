// The atomic safetensors writer, byte-compatible with the Python library.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "core/safetensors.h"
#include "core/status.h"

namespace lathe::runtime {

using Json = nlohmann::json;

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
    if (!SafetensorsTensorBytes(t.shape, elem_size, &bytes)) return bad("negative dim or size overflow");
    if (bytes != t.nbytes) {
      return bad(absl::StrFormat("nbytes %d but shape x dtype needs %d", t.nbytes, bytes));
    }
    if (t.data == nullptr && t.nbytes > 0) return bad("null data");
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    const int ra = SafetensorsDtypeRank(a->dtype), rb = SafetensorsDtypeRank(b->dtype);
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
