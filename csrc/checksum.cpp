#include "checksum.hpp"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace ww {
namespace {

constexpr std::uint32_t kPolynomial = 0x82F63B78u;  // CRC32C, reflected

std::array<std::uint32_t, 256> make_table() {
    std::array<std::uint32_t, 256> table{};
    for (std::uint32_t i = 0; i < 256; ++i) {
        std::uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1u) ? kPolynomial : 0u);
        table[i] = c;
    }
    return table;
}

std::uint32_t crc32c_table(const unsigned char* p, std::size_t n, std::uint32_t c) {
    static const std::array<std::uint32_t, 256> table = make_table();
    for (std::size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
    return c;
}

// CRC32C register update for n zero bytes is linear in the register: a 32x32 matrix over GF(2),
// stored as the images of the 32 unit vectors. Used to join CRCs computed side by side.
using Gf2Matrix = std::array<std::uint32_t, 32>;

std::uint32_t gf2_apply(const Gf2Matrix& m, std::uint32_t v) {
    std::uint32_t out = 0;
    for (int i = 0; v != 0; ++i, v >>= 1) {
        if (v & 1u) out ^= m[i];
    }
    return out;
}

Gf2Matrix gf2_compose(const Gf2Matrix& a, const Gf2Matrix& b) {  // a after b
    Gf2Matrix out{};
    for (int i = 0; i < 32; ++i) out[i] = gf2_apply(a, b[i]);
    return out;
}

// The register update for `n` zero bytes, as four byte-indexed tables.
using ShiftTables = std::array<std::array<std::uint32_t, 256>, 4>;

ShiftTables make_shift_tables(std::size_t n) {
    Gf2Matrix bit{};  // one zero bit: shift right, folding the low bit back in as the polynomial
    bit[0] = kPolynomial;
    for (int i = 1; i < 32; ++i) bit[i] = 1u << (i - 1);
    Gf2Matrix byte = gf2_compose(bit, bit);
    byte = gf2_compose(byte, byte);
    byte = gf2_compose(byte, byte);  // 8 bits
    Gf2Matrix op{};
    for (int i = 0; i < 32; ++i) op[i] = 1u << i;  // identity
    for (; n != 0; n >>= 1, byte = gf2_compose(byte, byte)) {
        if (n & 1u) op = gf2_compose(byte, op);
    }
    ShiftTables tables{};
    for (int k = 0; k < 4; ++k) {
        for (std::uint32_t v = 0; v < 256; ++v) tables[k][v] = gf2_apply(op, v << (8 * k));
    }
    return tables;
}

std::uint32_t shift(const ShiftTables& t, std::uint32_t c) {
    return t[0][c & 0xFFu] ^ t[1][(c >> 8) & 0xFFu] ^ t[2][(c >> 16) & 0xFFu] ^ t[3][c >> 24];
}

#if defined(__x86_64__)
// The crc32 instruction has a latency of about three cycles but can start one per cycle, so
// three independent chains over three adjacent blocks run about three times as fast as one;
// their registers are then joined with the zero-shift tables.
constexpr std::size_t kBlock = 8192;

__attribute__((target("sse4.2"))) std::uint64_t crc32c_chain(std::uint64_t c, const unsigned char* p,
                                                             std::size_t n) {
    for (; n >= 8; p += 8, n -= 8) {
        std::uint64_t word;
        std::memcpy(&word, p, 8);
        c = _mm_crc32_u64(c, word);
    }
    for (; n > 0; --n) c = _mm_crc32_u8(static_cast<std::uint32_t>(c), *p++);
    return c;
}

__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(const unsigned char* p, std::size_t n,
                                                             std::uint32_t c) {
    static const ShiftTables block_shift = make_shift_tables(kBlock);
    std::uint64_t c0 = c;
    for (; n >= 3 * kBlock; p += 3 * kBlock, n -= 3 * kBlock) {
        std::uint64_t c1 = 0, c2 = 0;
        for (std::size_t i = 0; i < kBlock; i += 8) {
            std::uint64_t a, b, d;
            std::memcpy(&a, p + i, 8);
            std::memcpy(&b, p + kBlock + i, 8);
            std::memcpy(&d, p + 2 * kBlock + i, 8);
            c0 = _mm_crc32_u64(c0, a);
            c1 = _mm_crc32_u64(c1, b);
            c2 = _mm_crc32_u64(c2, d);
        }
        c0 = shift(block_shift, shift(block_shift, static_cast<std::uint32_t>(c0)) ^ static_cast<std::uint32_t>(c1)) ^
             static_cast<std::uint32_t>(c2);
    }
    return static_cast<std::uint32_t>(crc32c_chain(c0, p, n));
}

bool has_sse42() {
    static const bool yes = __builtin_cpu_supports("sse4.2");
    return yes;
}
#endif

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc) {
    const auto* p = static_cast<const unsigned char*>(data);
    std::uint32_t c = ~crc;
#if defined(__x86_64__)
    if (has_sse42()) return ~crc32c_sse42(p, n, c);
#endif
    return ~crc32c_table(p, n, c);
}

}  // namespace ww
