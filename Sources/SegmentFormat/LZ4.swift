import CLZ4

/// liblz4's block API. Decompression uses LZ4_decompress_safe, which never reads or writes out of bounds
/// on hostile input.
enum LZ4 {
    static func compressBound(_ count: Int) -> Int { Int(LZ4_compressBound(Int32(count))) }

    /// Compresses `src` into `dst` (capacity `capacity`); returns the compressed size, or nil when the
    /// result would not fit (the caller then stores the block raw).
    static func compress(
        _ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawPointer, capacity: Int
    ) -> Int? {
        guard let s = src.baseAddress, src.count > 0 else { return nil }
        let n = LZ4_compress_default(
            s.assumingMemoryBound(to: CChar.self), dst.assumingMemoryBound(to: CChar.self),
            Int32(src.count), Int32(capacity))
        return n > 0 ? Int(n) : nil
    }

    /// Decompresses exactly `rawCount` bytes; nil if the input is not a valid LZ4 block of that size.
    static func decompress(_ src: UnsafeRawBufferPointer, rawCount: Int) -> [UInt8]? {
        // Sizes come from a block header: the C API takes int, so anything an int cannot hold is refused
        // here rather than trapping (the header's limits keep real blocks far below).
        guard let s = src.baseAddress, src.count > 0, rawCount > 0, let srcCount = Int32(exactly: src.count),
            let dstCount = Int32(exactly: rawCount)
        else { return nil }
        var failed = false
        let out = [UInt8](unsafeUninitializedCapacity: rawCount) { buf, initialized in
            guard let dst = buf.baseAddress else {
                failed = true
                initialized = 0
                return
            }
            let n = LZ4_decompress_safe(
                s.assumingMemoryBound(to: CChar.self), UnsafeMutableRawPointer(dst).assumingMemoryBound(to: CChar.self),
                srcCount, dstCount)
            if n != dstCount {
                failed = true
                initialized = 0
            } else {
                initialized = rawCount
            }
        }
        return failed ? nil : out
    }
}
