// The native transport's data path: one stream's share of a version, sent from or received into
// a staging buffer, plus the checksummed copies that stage a version and read it back from shared
// memory. Every call has a deadline; checksums are verified before a call returns.
#pragma once

#include <cstddef>
#include <cstdint>

#include "net.hpp"
#include "wire.hpp"

namespace ww {

// Test hooks that make a sender misbehave on purpose; -1 disables each.
struct SendFaults {
    long long corrupt_chunk = -1;    // flip one payload byte of this chunk index (header left intact)
    long long cut_after_bytes = -1;  // shut the connection down after sending this many bytes
    long long stall_after_bytes = -1;  // stop sending after this many bytes until the deadline (or the peer closes)
};

// Sends stream `stream` of `streams` of `plan` from `base` (plan.total_bytes() bytes) on a
// connected socket. Throws OsError when the peer goes away or the deadline passes.
void send_stripe(int fd, const char* base, const ChunkPlan& plan, unsigned stream, unsigned streams,
                 const FrameTag& tag, double timeout_s, const SendFaults& faults, const InterruptCheck& interrupt);

// Receives stream `stream` of `streams` straight into `base` (at least plan.total_bytes() bytes),
// checking every frame header and every chunk's CRC32C against `plan`. Throws IntegrityFailure
// on a mismatch and OsError when the peer goes away or the deadline passes.
void recv_stripe(int fd, char* base, const ChunkPlan& plan, unsigned stream, unsigned streams, const FrameTag& tag,
                 double timeout_s, const InterruptCheck& interrupt);

// Copies leaf `leaf` from `src` into its place in `base`, recording each of its chunks' CRC32C
// in `plan`; uses up to `threads` threads.
void stage_leaf(char* base, const char* src, ChunkPlan& plan, std::uint32_t leaf, unsigned threads);

// Reads a whole staged version from the file `fd` (a shared segment laid out by `plan`) into
// `dst` (plan.total_bytes() long), verifying every chunk's CRC32C as it goes; throws
// IntegrityFailure naming the first bad chunk. pread, unlike a mapping, costs no page faults.
void read_verified(int fd, char* dst, const ChunkPlan& plan, unsigned threads);

}  // namespace ww
