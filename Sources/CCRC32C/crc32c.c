// The CRC-32C instruction for SegmentFormat.CRC32C (Docs/segment-format.md §2): every block, index and
// snapshot is checksummed, and the table-driven code ran at ~1.5 GB/s, a visible part of opening a large
// shard. No library on the machine offers CRC-32C (zlib's crc32 is another polynomial), so this is the
// one function Weft writes in C. Compiled for SSE4.2 only inside the function; callers check the CPU
// first.
#include "ccrc32c.h"

#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n > 0) {
        c32 = _mm_crc32_u8(c32, *p);
        p++;
        n--;
    }
    return c32;
}
#endif

int weft_crc32c_hw_available(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    return 0;
#endif
}

uint32_t weft_crc32c_hw(uint32_t crc, const void *p, size_t n) {
#if defined(__x86_64__)
    return crc32c_sse42(crc, (const uint8_t *)p, n);
#else
    (void)p;
    (void)n;
    return crc;
#endif
}
