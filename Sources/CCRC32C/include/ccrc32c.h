#ifndef WEFT_CCRC32C_H
#define WEFT_CCRC32C_H

#include <stddef.h>
#include <stdint.h>

/// Whether this CPU has the CRC-32C instruction (x86-64 SSE4.2); the Swift side falls back to its
/// table-driven code otherwise.
int weft_crc32c_hw_available(void);

/// CRC-32C of `n` bytes with the CPU's instruction, continuing from the raw (not inverted) register
/// value `crc`. Call only when `weft_crc32c_hw_available()`.
uint32_t weft_crc32c_hw(uint32_t crc, const void *p, size_t n);

#endif
