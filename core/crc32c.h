// CRC-32C (Castagnoli), the checksum of checkpoint shards: the SSE4.2
// instruction where the CPU has it (several GB/s), a table otherwise.
#ifndef LATHE_CORE_CRC32C_H_
#define LATHE_CORE_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace lathe::runtime {

// The CRC-32C of `n` bytes at `data`, continuing from `crc` (0 to start).
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_CRC32C_H_
