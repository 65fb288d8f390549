// The safetensors reader over hostile files: the first byte picks a single
// .safetensors file (the rest of the input, mapped as a file) or a sharded
// folder whose model.safetensors.index.json is the rest of the input, beside
// a valid shard "a.safetensors". Whatever opens must describe only bytes
// inside its file.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "fuzz/fuzz_util.h"
#include "core/safetensors.h"

namespace {

using lathe::runtime::SafetensorsCheckpoint;
using lathe::runtime::SafetensorsFile;
using lathe::runtime::TensorView;

void Write(int fd, const uint8_t* data, size_t size) {
  LATHE_FUZZ_CHECK(ftruncate(fd, 0) == 0);
  LATHE_FUZZ_CHECK(pwrite(fd, data, size, 0) == static_cast<ssize_t>(size));
}

// An in-memory file, rewritten for every input.
int MemFile() {
  static const int fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  LATHE_FUZZ_CHECK(fd >= 0);
  return fd;
}

// A folder holding the valid shard a.safetensors (tensors "x" and "y").
const std::string& Folder() {
  static const std::string* dir = [] {
    char name[] = "/tmp/lathe-fuzz-safetensors-XXXXXX";
    LATHE_FUZZ_CHECK(mkdtemp(name) != nullptr);
    const std::string shard = std::string(name) + "/a.safetensors";
    const float x[2] = {1.0f, 2.0f};
    const int32_t y[1] = {7};
    LATHE_FUZZ_CHECK(lathe::runtime::WriteSafetensors(shard, {{"x", "F32", {2}, x, sizeof(x)}, {"y", "I32", {1}, y, sizeof(y)}})
                   .ok());
    static std::string path = name;
    std::atexit([] {
      for (const char* f : {"/a.safetensors", "/model.safetensors.index.json"}) ::unlink((path + f).c_str());
      ::rmdir(path.c_str());
    });
    return &path;
  }();
  return *dir;
}

void CheckView(const TensorView& view, size_t file_size) {
  uint64_t bytes = 0;
  LATHE_FUZZ_CHECK(lathe::runtime::SafetensorsTensorBytes(view.shape, lathe::runtime::DtypeSize(view.dtype), &bytes));
  LATHE_FUZZ_CHECK(bytes == view.nbytes);
  LATHE_FUZZ_CHECK(view.offset >= 8 && view.offset <= file_size && view.nbytes <= file_size - view.offset);
  // Touch the first and last byte: a view past the mapping faults here.
  volatile uint8_t sink = 0;
  if (view.nbytes > 0) sink = sink + view.data[0] + view.data[view.nbytes - 1];
}

void OneFile(const uint8_t* data, size_t size) {
  const int fd = MemFile();
  Write(fd, data, size);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open("/proc/self/fd/" + std::to_string(fd));
  if (!file.ok()) return;
  for (const std::string& name : (*file)->names()) {
    absl::StatusOr<TensorView> view = (*file)->Get(name);
    LATHE_FUZZ_CHECK(view.ok());
    CheckView(*view, size);
  }
}

void Index(const uint8_t* data, size_t size) {
  const std::string index = Folder() + "/model.safetensors.index.json";
  const int fd = ::open(index.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  LATHE_FUZZ_CHECK(fd >= 0);
  Write(fd, data, size);
  ::close(fd);
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt = SafetensorsCheckpoint::Open(Folder());
  if (!ckpt.ok()) return;
  for (const std::string& name : (*ckpt)->names()) {
    LATHE_FUZZ_CHECK(name == "x" || name == "y");
    LATHE_FUZZ_CHECK((*ckpt)->Get(name).ok());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if (data[0] & 1) {
    Index(data + 1, size - 1);
  } else {
    OneFile(data + 1, size - 1);
  }
  return 0;
}
