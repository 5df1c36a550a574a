#include "checksum.hpp"

#include <array>
#include <cstring>
#include <stdexcept>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
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

// Carry-less multiplication folds 16 lanes of 128 bits at once, 256 bytes a step, several times
// faster than the crc32 instruction, so checking received bytes costs little next to receiving
// them. Reflected CRC arithmetic: a lane loaded from memory holds the high half of its
// polynomial in its low quadword, and a reflected carry-less product carries one extra factor x,
// hence the exponents one below the fold distance. The folded remainder is finished by the crc32
// instruction, which also handles the bytes past the last full step.
constexpr std::size_t kFoldBytes = 256;
constexpr std::size_t kMinFoldBytes = 2 * kFoldBytes;

// x^n mod P, as the high half of a reflected quadword (bit 63 - j holds the coefficient of x^j).
std::uint64_t x_pow_mod(unsigned n) {
    std::uint32_t r = 0x80000000u;  // x^0
    for (unsigned i = 0; i < n; ++i) r = (r >> 1) ^ ((r & 1u) ? kPolynomial : 0u);
    return std::uint64_t{r} << 32;
}

// A lane's multipliers for moving it `bits` further along the message.
std::array<std::uint64_t, 2> fold_constants(unsigned bits) { return {x_pow_mod(bits + 63), x_pow_mod(bits - 1)}; }

struct FoldConstants {
    std::array<std::uint64_t, 2> step;  // one 256-byte step
    // Per lane, moving it to the end of the last step; lane 15 already is there (zeros: it is
    // added as it is).
    std::array<std::uint64_t, 32> tail{};

    FoldConstants() : step(fold_constants(8 * kFoldBytes)) {
        for (unsigned lane = 0; lane < 15; ++lane) {
            const auto k = fold_constants(128 * (15 - lane));
            tail[2 * lane] = k[0];
            tail[2 * lane + 1] = k[1];
        }
    }
};

__attribute__((target("avx512f,vpclmulqdq,sse4.2"))) __m512i fold(__m512i acc, __m512i k, __m512i data) {
    const __m512i high = _mm512_clmulepi64_epi128(acc, k, 0x00);
    const __m512i low = _mm512_clmulepi64_epi128(acc, k, 0x11);
    return _mm512_ternarylogic_epi64(high, low, data, 0x96);  // high ^ low ^ data
}

// The raw register (no final XOR) after `c` and then n >= kMinFoldBytes bytes.
__attribute__((target("avx512f,vpclmulqdq,sse4.2"))) std::uint32_t crc32c_vpclmul(const unsigned char* p,
                                                                                  std::size_t n,
                                                                                  std::uint32_t c) {
    static const FoldConstants constants;
    // The register enters as the first 32 bits of the message.
    const __m512i c_lane = _mm512_castsi128_si512(_mm_cvtsi32_si128(static_cast<int>(c)));
    __m512i a0 = _mm512_xor_si512(_mm512_loadu_si512(p), c_lane);
    __m512i a1 = _mm512_loadu_si512(p + 64);
    __m512i a2 = _mm512_loadu_si512(p + 128);
    __m512i a3 = _mm512_loadu_si512(p + 192);
    const auto& step = constants.step;
    const __m512i k = _mm512_set_epi64(step[1], step[0], step[1], step[0], step[1], step[0], step[1], step[0]);
    std::size_t at = kFoldBytes;
    for (; at + kFoldBytes <= n; at += kFoldBytes) {
        a0 = fold(a0, k, _mm512_loadu_si512(p + at));
        a1 = fold(a1, k, _mm512_loadu_si512(p + at + 64));
        a2 = fold(a2, k, _mm512_loadu_si512(p + at + 128));
        a3 = fold(a3, k, _mm512_loadu_si512(p + at + 192));
    }
    const auto* tail = constants.tail.data();
    __m512i sum = fold(a0, _mm512_loadu_si512(tail), _mm512_maskz_mov_epi64(0xC0, a3));  // lane 15 as it is
    sum = _mm512_xor_si512(sum, fold(a1, _mm512_loadu_si512(tail + 8), _mm512_setzero_si512()));
    sum = _mm512_xor_si512(sum, fold(a2, _mm512_loadu_si512(tail + 16), _mm512_setzero_si512()));
    sum = _mm512_xor_si512(sum, fold(a3, _mm512_loadu_si512(tail + 24), _mm512_setzero_si512()));
    const __m128i folded = _mm_xor_si128(
        _mm_xor_si128(_mm512_castsi512_si128(sum), _mm512_extracti32x4_epi32(sum, 1)),
        _mm_xor_si128(_mm512_extracti32x4_epi32(sum, 2), _mm512_extracti32x4_epi32(sum, 3)));
    std::uint64_t r = _mm_crc32_u64(0, static_cast<std::uint64_t>(_mm_cvtsi128_si64(folded)));
    r = _mm_crc32_u64(r, static_cast<std::uint64_t>(_mm_extract_epi64(folded, 1)));
    return static_cast<std::uint32_t>(crc32c_chain(r, p + at, n - at));
}

bool has_sse42() {
    static const bool yes = __builtin_cpu_supports("sse4.2");
    return yes;
}

bool has_vpclmul() {
    static const bool yes = has_sse42() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
    return yes;
}
#endif

enum class Implementation { kVpclmul, kSse42, kTable };

// The implementations this CPU runs, fastest first.
std::vector<std::pair<std::string, Implementation>> available() {
    std::vector<std::pair<std::string, Implementation>> out;
#if defined(__x86_64__)
    if (has_vpclmul()) out.emplace_back("vpclmul", Implementation::kVpclmul);
    if (has_sse42()) out.emplace_back("sse42", Implementation::kSse42);
#endif
    out.emplace_back("table", Implementation::kTable);
    return out;
}

// The raw register after `c` and n bytes, by an implementation this CPU runs.
std::uint32_t run(Implementation implementation, const unsigned char* p, std::size_t n, std::uint32_t c) {
#if defined(__x86_64__)
    switch (implementation) {
        case Implementation::kVpclmul:
            if (n >= kMinFoldBytes) return crc32c_vpclmul(p, n, c);
            [[fallthrough]];  // too short to fold: the crc32 instruction
        case Implementation::kSse42:
            return crc32c_sse42(p, n, c);
        case Implementation::kTable:
            break;
    }
#endif
    return crc32c_table(p, n, c);
}

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc) {
    static const Implementation fastest = available().front().second;
    return ~run(fastest, static_cast<const unsigned char*>(data), n, ~crc);
}

std::vector<std::string> crc32c_implementations() {
    std::vector<std::string> names;
    for (const auto& entry : available()) names.push_back(entry.first);
    return names;
}

std::uint32_t crc32c_with(const std::string& implementation, const void* data, std::size_t n, std::uint32_t crc) {
    for (const auto& [name, which] : available()) {
        if (name == implementation) return ~run(which, static_cast<const unsigned char*>(data), n, ~crc);
    }
    throw std::invalid_argument("CRC32C implementation " + implementation + " is not available on this CPU");
}

}  // namespace ww
