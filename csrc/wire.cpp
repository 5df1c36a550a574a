#include "wire.hpp"

#include <cstring>
#include <stdexcept>
#include <string>

#include "checksum.hpp"
#include "errors.hpp"

namespace ww {
namespace {

// Fixed little-endian offsets of the header fields.
constexpr std::size_t kMagicAt = 0, kVersionAt = 4, kFlagsAt = 6, kEpochAt = 8, kWeightIdAt = 16, kLeafAt = 24,
                      kLengthAt = 28, kOffsetAt = 32, kPayloadCrcAt = 40, kHeaderCrcAt = 44;
static_assert(kHeaderCrcAt + 4 == kFrameHeaderSize, "header layout");

template <typename T>
void put(unsigned char* out, std::size_t at, T value) {
    for (std::size_t i = 0; i < sizeof(T); ++i) out[at + i] = static_cast<unsigned char>(value >> (8 * i));
}

template <typename T>
T get(const unsigned char* in, std::size_t at) {
    T value = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) value |= static_cast<T>(static_cast<T>(in[at + i]) << (8 * i));
    return value;
}

std::uint64_t round_up(std::uint64_t n, std::uint64_t to) { return (n + to - 1) / to * to; }

[[noreturn]] void bad_field(const char* field, std::uint64_t got, std::uint64_t want, const Chunk& expected) {
    throw IntegrityFailure("bad frame header for leaf " + std::to_string(expected.leaf) + " at offset " +
                           std::to_string(expected.leaf_offset) + ": " + field + " is " + std::to_string(got) +
                           ", expected " + std::to_string(want));
}

}  // namespace

ChunkPlan::ChunkPlan(const std::vector<std::uint64_t>& leaf_nbytes, std::uint64_t chunk_bytes)
    : chunk_bytes_(chunk_bytes), leaf_nbytes_(leaf_nbytes) {
    if (chunk_bytes < kMinChunkBytes || chunk_bytes > kMaxChunkBytes) {
        throw std::invalid_argument("chunk_bytes must be in " + std::to_string(kMinChunkBytes) + ".." +
                                    std::to_string(kMaxChunkBytes) + ", got " + std::to_string(chunk_bytes));
    }
    if (leaf_nbytes.size() > UINT32_MAX) throw std::invalid_argument("too many leaves");
    // Sizes are checked and chunks counted before anything is allocated, so absurd sizes are a
    // ValueError, not an allocation the machine cannot make.
    constexpr std::uint64_t kMaxTotal = std::uint64_t{1} << 62;  // headroom for the rounding
    std::uint64_t offset = 0, count = 0;
    for (const std::uint64_t n : leaf_nbytes) {
        if (n > kMaxTotal || offset > kMaxTotal - n) throw std::invalid_argument("leaf sizes add up to more than 2^62 bytes");
        offset = round_up(offset + n, kLeafAlignment);
        count += (n + chunk_bytes - 1) / chunk_bytes;
    }
    if (count > kMaxChunks) {
        throw std::invalid_argument(std::to_string(count) + " chunks exceed the limit of " + std::to_string(kMaxChunks) +
                                    "; use larger chunks");
    }
    leaf_offsets_.reserve(leaf_nbytes.size());
    chunks_.reserve(count);
    offset = 0;
    for (std::size_t leaf = 0; leaf < leaf_nbytes.size(); ++leaf) {
        const std::uint64_t n = leaf_nbytes[leaf];
        leaf_offsets_.push_back(offset);
        for (std::uint64_t at = 0; at < n; at += chunk_bytes) {
            const std::uint64_t len = n - at < chunk_bytes ? n - at : chunk_bytes;
            chunks_.push_back(Chunk{static_cast<std::uint32_t>(leaf), at, offset + at, len, 0});
        }
        offset = round_up(offset + n, kLeafAlignment);
    }
    total_bytes_ = offset;
}

std::vector<std::uint32_t> ChunkPlan::crcs() const {
    std::vector<std::uint32_t> out;
    out.reserve(chunks_.size());
    for (const Chunk& c : chunks_) out.push_back(c.crc);
    return out;
}

void ChunkPlan::set_crcs(const std::vector<std::uint32_t>& crcs) {
    if (crcs.size() != chunks_.size()) {
        throw std::invalid_argument("expected " + std::to_string(chunks_.size()) + " chunk checksums, got " +
                                    std::to_string(crcs.size()));
    }
    for (std::size_t i = 0; i < crcs.size(); ++i) chunks_[i].crc = crcs[i];
}

void encode_frame_header(const FrameTag& tag, const Chunk& chunk, unsigned char out[kFrameHeaderSize]) {
    put<std::uint32_t>(out, kMagicAt, kFrameMagic);
    put<std::uint16_t>(out, kVersionAt, kProtocolVersion);
    put<std::uint16_t>(out, kFlagsAt, 0);
    put<std::uint64_t>(out, kEpochAt, tag.epoch);
    put<std::uint64_t>(out, kWeightIdAt, tag.weight_id);
    put<std::uint32_t>(out, kLeafAt, chunk.leaf);
    put<std::uint32_t>(out, kLengthAt, static_cast<std::uint32_t>(chunk.length));
    put<std::uint64_t>(out, kOffsetAt, chunk.leaf_offset);
    put<std::uint32_t>(out, kPayloadCrcAt, chunk.crc);
    put<std::uint32_t>(out, kHeaderCrcAt, crc32c(out, kHeaderCrcAt));
}

void check_frame_header(const unsigned char* bytes, std::size_t n, const FrameTag& tag, const Chunk& expected) {
    if (n != kFrameHeaderSize) bad_field("header size", n, kFrameHeaderSize, expected);
    const auto check = [&](const char* field, std::uint64_t got, std::uint64_t want) {
        if (got != want) bad_field(field, got, want, expected);
    };
    check("magic", get<std::uint32_t>(bytes, kMagicAt), kFrameMagic);
    check("protocol version", get<std::uint16_t>(bytes, kVersionAt), kProtocolVersion);
    // Then the header's own checksum, so a header damaged in flight is reported as such.
    check("header checksum", get<std::uint32_t>(bytes, kHeaderCrcAt), crc32c(bytes, kHeaderCrcAt));
    check("flags", get<std::uint16_t>(bytes, kFlagsAt), 0);
    check("epoch tag", get<std::uint64_t>(bytes, kEpochAt), tag.epoch);
    check("weight_id", get<std::uint64_t>(bytes, kWeightIdAt), tag.weight_id);
    check("leaf", get<std::uint32_t>(bytes, kLeafAt), expected.leaf);
    check("length", get<std::uint32_t>(bytes, kLengthAt), expected.length);
    check("offset", get<std::uint64_t>(bytes, kOffsetAt), expected.leaf_offset);
    check("payload checksum", get<std::uint32_t>(bytes, kPayloadCrcAt), expected.crc);
}

}  // namespace ww
