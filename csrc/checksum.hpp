// CRC32C (Castagnoli), the per-leaf checksum of host paths: hardware crc32 instructions where
// the CPU has them (SSE4.2), a table otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ww {

// CRC32C of `n` bytes, continuing from `crc` (0 to start); the usual final XOR is applied, so
// crc32c("123456789") == 0xE3069283 and crc32c(b, crc32c(a)) == crc32c(a + b).
std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc = 0);

}  // namespace ww
