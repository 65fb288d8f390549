// Reads and writes Hugging Face safetensors checkpoints: one memory-mapped file, or a folder
// of shards named by model.safetensors.index.json. Writes are atomic and byte-identical to
// the Python `safetensors` writer.
#ifndef LATHE_CORE_SAFETENSORS_H_
#define LATHE_CORE_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lathe::runtime {

// A read-only view of one tensor inside a mapped file; valid while its file object lives.
struct TensorView {
  std::string name;
  std::string dtype;  // safetensors dtype string, e.g. "F32", "BF16", "F16", "I64", "I32"
  std::vector<int64_t> shape;      // [] for a scalar
  const uint8_t* data = nullptr;   // little-endian, row-major; no alignment guarantee
  size_t nbytes = 0;
  size_t offset = 0;               // of `data` from the start of the file
};

// Bytes per element of a safetensors dtype string, 0 for an unknown one. Known: BOOL, U8, I8,
// F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64.
// Sub-byte dtypes (F4, F6_*) are not supported.
// Position of a dtype in the Python library's dtype order (-1 if unknown);
// its writer sorts tensors by descending position.
int SafetensorsDtypeRank(const std::string& dtype);
// Bytes of a tensor of `shape`; false for a negative dim or on overflow.
bool SafetensorsTensorBytes(const std::vector<int64_t>& shape, size_t elem_size, uint64_t* bytes);

size_t DtypeSize(const std::string& dtype);

// One memory-mapped .safetensors file (mmap PROT_READ, MAP_PRIVATE; unmapped in the dtor).
// The whole header is validated by Open, so every Get on a live object is in bounds.
// Immutable after Open: all const methods are thread-safe. Not copyable.
// The file must not be truncated while mapped (the OS would raise SIGBUS on access).
class SafetensorsFile {
 public:
  // Maps and validates `path`. NotFoundError if it does not exist; DataLossError, naming the
  // file and the defect, for any malformed header, offsets or size; other I/O errors map
  // from errno. Never throws.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::vector<std::string>& names() const { return names_; }  // sorted
  bool Contains(const std::string& name) const { return entries_.count(name) > 0; }
  // NotFoundError naming the tensor and the file when absent.
  absl::StatusOr<TensorView> Get(const std::string& name) const;
  // The "__metadata__" map; empty when the header has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile(std::string path, const uint8_t* base, size_t size);
  absl::Status ParseHeader();

  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorView> entries_;  // views into [base_, base_ + size_)
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

// A Hugging Face model folder: either model.safetensors, or model.safetensors.index.json
// ({"metadata": {...}, "weight_map": {tensor: shard file}}) naming shard files in the same
// folder. When both exist the index wins. Every shard is opened (mapped once) and checked
// by Open, so Get never fails for a listed name. Immutable after Open; thread-safe.
class SafetensorsCheckpoint {
 public:
  // NotFoundError when the folder holds neither file. DataLossError for a malformed index,
  // a shard named in weight_map that is missing (naming it), a tensor listed in the index
  // but absent from its shard, or any corrupt shard.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& dir);

  // All tensors across shards, sorted. For an index these are the weight_map keys.
  std::vector<std::string> names() const;
  bool Contains(const std::string& name) const { return by_name_.count(name) > 0; }
  // NotFoundError naming the tensor and the folder when absent.
  absl::StatusOr<TensorView> Get(const std::string& name) const;

 private:
  explicit SafetensorsCheckpoint(std::string dir) : dir_(std::move(dir)) {}
  absl::Status LoadIndex(const std::string& index_path);

  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> by_name_;
};

// One tensor for WriteSafetensors; `data` (not owned) holds `nbytes` little-endian bytes.
struct TensorToWrite {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Writes `path` atomically: to "<path>.tmp.<pid>", fsync, rename, fsync of the folder; the
// temporary file is removed on failure. `data` may point into a SafetensorsFile mapping
// `path` itself (the old file stays mapped until that object dies).
// InvalidArgumentError for a duplicate name, the name "__metadata__", an unknown dtype, a
// negative dim, nbytes that do not match shape x dtype size, or names/metadata that are not
// valid UTF-8; errno-mapped errors for I/O.
// The bytes match the Python `safetensors` writer: tensors ordered by descending dtype (its
// enum order: U64, I64, F64, C64, F32, U32, I32, BF16, F16, U16, I16, F8_*, I8, U8, BOOL)
// then by name, offsets back to back, compact header JSON with "__metadata__" first when
// `metadata` is non-empty (keys sorted; Python's order is unspecified for several keys),
// header padded with spaces to a multiple of 8.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace lathe::runtime

#endif  // LATHE_CORE_SAFETENSORS_H_
