// CRC32C (Castagnoli), the per-leaf checksum of host paths: carry-less multiplication folding
// where the CPU has it (AVX-512 VPCLMULQDQ), hardware crc32 instructions (SSE4.2) otherwise, a
// table on other CPUs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ww {

// CRC32C of `n` bytes, continuing from `crc` (0 to start); the usual final XOR is applied, so
// crc32c("123456789") == 0xE3069283 and crc32c(b, crc32c(a)) == crc32c(a + b).
std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc = 0);

// The implementations this CPU can run, fastest first ("vpclmul", "sse42", "table"), and one of
// them by name, so tests can hold each to the same results; invalid_argument for any other.
std::vector<std::string> crc32c_implementations();
std::uint32_t crc32c_with(const std::string& implementation, const void* data, std::size_t n, std::uint32_t crc);

}  // namespace ww
