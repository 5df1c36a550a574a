// The native transport's wire format: how a version is cut into chunks, and the frame header
// sent before each chunk. Receivers trust nothing from the wire: every header is checked against
// the chunk they expect next, which they computed themselves from the manifest.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ww {

constexpr std::uint32_t kFrameMagic = 0x31465757u;  // "WWF1" as little-endian bytes
constexpr std::uint16_t kProtocolVersion = 1;
constexpr std::size_t kFrameHeaderSize = 48;
// Leaves start on page boundaries in a staging buffer, so each can be viewed as an aligned array.
constexpr std::uint64_t kLeafAlignment = 4096;
constexpr std::uint64_t kMinChunkBytes = 4096;
constexpr std::uint64_t kMaxChunkBytes = std::uint64_t{1} << 30;  // lengths travel as u32
constexpr std::uint64_t kMaxChunks = std::uint64_t{1} << 22;       // bounds a plan's own memory

struct Chunk {
    std::uint32_t leaf = 0;
    std::uint64_t leaf_offset = 0;    // where the chunk starts within its leaf
    std::uint64_t buffer_offset = 0;  // where it starts within the staging buffer
    std::uint64_t length = 0;
    std::uint32_t crc = 0;  // CRC32C of its bytes, computed by the sender when it stages them
};

// Identifies the version a frame belongs to: a frame of another version is a protocol error.
struct FrameTag {
    std::uint64_t epoch = 0;  // the first 64 bits of the trainer's epoch uuid
    std::uint64_t weight_id = 0;
};

// Leaves laid out back to back in one staging buffer, each on a kLeafAlignment boundary, cut
// into chunks of at most chunk_bytes that never span two leaves. Stream s of n carries chunks
// s, s + n, s + 2n, ... in that order.
class ChunkPlan {
public:
    ChunkPlan(const std::vector<std::uint64_t>& leaf_nbytes, std::uint64_t chunk_bytes);

    std::uint64_t total_bytes() const { return total_bytes_; }
    std::uint64_t chunk_bytes() const { return chunk_bytes_; }
    const std::vector<std::uint64_t>& leaf_offsets() const { return leaf_offsets_; }
    const std::vector<std::uint64_t>& leaf_nbytes() const { return leaf_nbytes_; }
    const std::vector<Chunk>& chunks() const { return chunks_; }
    std::vector<Chunk>& chunks() { return chunks_; }

    std::vector<std::uint32_t> crcs() const;
    void set_crcs(const std::vector<std::uint32_t>& crcs);  // one per chunk, in chunk order

private:
    std::uint64_t chunk_bytes_;
    std::uint64_t total_bytes_ = 0;
    std::vector<std::uint64_t> leaf_offsets_;
    std::vector<std::uint64_t> leaf_nbytes_;
    std::vector<Chunk> chunks_;
};

void encode_frame_header(const FrameTag& tag, const Chunk& chunk, unsigned char out[kFrameHeaderSize]);

// Throws IntegrityFailure naming the first field of `bytes` that is not what the receiver
// expects for `expected` of version `tag` (`n` must be kFrameHeaderSize).
void check_frame_header(const unsigned char* bytes, std::size_t n, const FrameTag& tag, const Chunk& expected);

}  // namespace ww
