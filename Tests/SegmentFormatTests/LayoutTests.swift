import SegmentFormat
import Testing
import WeftCore
import WeftTesting

@Suite struct LayoutTests {
    /// The on-disk sizes are a format: changing one is a deliberate format change, caught here.
    @Test func pinnedSizes() {
        #expect(Layout.segmentHeaderBytes == 64)
        #expect(Layout.blockHeaderBytes == 32)
        #expect(Layout.recordHeaderBytes == 40)
        #expect(Layout.indexHeaderBytes == 64)
        #expect(Layout.indexRunEntryBytes == 16)
        #expect(Layout.indexStreamEntryBytes == 32)
        #expect(Layout.indexBlockEntryBytes == 24)
        #expect(Layout.segmentMagic == Array("WEFTSEG\0".utf8))
        #expect(Layout.indexMagic == Array("WEFTIDX\0".utf8))
        #expect(withUnsafeBytes(of: Layout.blockMagic.littleEndian) { Array($0) } == Array("WBLK".utf8))
        #expect(Layout.highWaterHeaderBytes == 32)
        #expect(Layout.highWaterEntryBytes == 16)
        #expect(Layout.highWaterMagic == Array("WEFTHWM\0".utf8))
        #expect(Layout.highWaterVersion == 1)
        #expect(Layout.segmentVersion == 1)
        #expect(Layout.indexVersion == 1)
        #expect(Codec.raw.rawValue == 0)
        #expect(Codec.lz4.rawValue == 1)
    }

    /// The encoders produce exactly the pinned sizes.
    @Test func encodersProducePinnedSizes() throws {
        #expect(SegmentHeader(shard: ShardID(1), baseIndex: 1).encode().count == Layout.segmentHeaderBytes)

        let empty = Record(index: 9, term: 1, stream: StreamID(4), seq: 1, timestampMicros: 0, payload: [])
        var raw = [UInt8]()
        RecordCodec.encode(empty, into: &raw)
        #expect(raw.count == Layout.recordHeaderBytes)
        var withPayload = empty
        withPayload.payload = [1, 2, 3]
        #expect(RecordCodec.encodedBytes(withPayload) == Layout.recordHeaderBytes + 3)

        let block = encodeBlock([empty], compress: false)
        #expect(block.count == Layout.blockHeaderBytes + Layout.recordHeaderBytes)

        var builder = SegmentIndexBuilder()
        builder.add(offset: 64, header: try BlockHeader.decode(block, offset: 64), records: [empty])
        let idx = builder.encode(shard: ShardID(1), baseIndex: 9, segmentBytes: UInt64(64 + block.count))
        // header + one block entry + one stream entry + one chunk crc + one run
        #expect(
            idx.count
                == Layout.indexHeaderBytes + Layout.indexBlockEntryBytes + Layout.indexStreamEntryBytes + 4
                + Layout.indexRunEntryBytes)
    }

    /// Field offsets of the segment and block headers (Docs/segment-format.md §1, §2).
    @Test func headerFieldOffsets() throws {
        let h = SegmentHeader(shard: ShardID(0x0102_0304_0506_0708), baseIndex: 0x1112_1314_1516_1718).encode()
        #expect(h.loadLE(UInt16.self, at: 8) == 1)
        #expect(h.loadLE(UInt16.self, at: 10) == 64)
        #expect(h.loadLE(UInt32.self, at: 12) == 0)
        #expect(h.loadLE(UInt64.self, at: 16) == 0x0102_0304_0506_0708)
        #expect(h.loadLE(UInt64.self, at: 24) == 0x1112_1314_1516_1718)
        #expect(h[32..<60].allSatisfy { $0 == 0 })
        #expect(h.loadLE(UInt32.self, at: 60) == CRC32C.checksum(h[0..<60]))

        let records = [Record(index: 77, term: 5, stream: StreamID(6), seq: 3, type: RecordType(9), timestampMicros: -4, payload: [0xAA])]
        let b = encodeBlock(records, compress: false)
        #expect(b.loadLE(UInt32.self, at: 0) == Layout.blockMagic)
        #expect(b[4] == Codec.raw.rawValue)
        #expect(b[5..<8].allSatisfy { $0 == 0 })
        #expect(b.loadLE(UInt32.self, at: 8) == 1)
        #expect(b.loadLE(UInt32.self, at: 12) == 41)
        #expect(b.loadLE(UInt32.self, at: 16) == 41)
        #expect(b.loadLE(UInt64.self, at: 20) == 77)
        #expect(b.loadLE(UInt32.self, at: 28) == CRC32C.checksum(b[32...], continuing: CRC32C.checksum(b[0..<28])))
        // Record header (§3): length, type, reserved, term, stream, seq, timestamp, then the payload.
        #expect(b.loadLE(UInt32.self, at: 32) == 1)
        #expect(b.loadLE(UInt16.self, at: 36) == 9)
        #expect(b.loadLE(UInt16.self, at: 38) == 0)
        #expect(b.loadLE(UInt64.self, at: 40) == 5)
        #expect(b.loadLE(UInt64.self, at: 48) == 6)
        #expect(b.loadLE(UInt64.self, at: 56) == 3)
        #expect(b.loadLE(Int64.self, at: 64) == -4)
        #expect(b[72] == 0xAA)
    }
}

@Suite struct SegmentHeaderTests {
    @Test func roundTrip() throws {
        var rng = SeededRNG(seed: 11)
        for _ in 0..<200 {
            let h = SegmentHeader(shard: ShardID(rng.next()), baseIndex: rng.next())
            let bytes = h.encode()
            #expect(try SegmentHeader.decode(bytes) == h)
            // Extra bytes after the header (the first block) are not its business.
            #expect(try SegmentHeader.decode(bytes + rng.bytes(rng.int(1...50))) == h)
        }
    }

    @Test func rejectsBadMagic() {
        let good = SegmentHeader(shard: ShardID(1), baseIndex: 10).encode()
        for i in 0..<8 {
            var b = good
            b[i] ^= 0x20
            #expect(formatErrorKind { _ = try SegmentHeader.decode(b) } == .badMagic, "byte \(i)")
        }
        #expect(formatErrorKind { _ = try SegmentHeader.decode([]) } == .badMagic)
        #expect(formatErrorKind { _ = try SegmentHeader.decode(Array(good.prefix(7))) } == .badMagic)
        #expect(formatErrorKind { _ = try SegmentHeader.decode(Layout.indexMagic + good[8...]) } == .badMagic)
    }

    @Test func rejectsTruncatedHeader() {
        let good = SegmentHeader(shard: ShardID(1), baseIndex: 10).encode()
        for n in 8..<good.count {
            #expect(formatErrorKind { _ = try SegmentHeader.decode(Array(good.prefix(n))) } == .truncated, "\(n) bytes")
        }
    }

    @Test func rejectsUnknownVersion() {
        for version: UInt16 in [0, 2, 0xFFFF] {
            var b = SegmentHeader(shard: ShardID(1), baseIndex: 10).encode()
            b.storeLE(version, at: 8)
            b.storeLE(CRC32C.checksum(b[0..<60]), at: 60)  // a well-formed header of another version
            #expect(formatErrorKind { _ = try SegmentHeader.decode(b) } == .unsupportedVersion, "version \(version)")
        }
    }

    @Test func rejectsHeaderCRCMismatch() {
        let good = SegmentHeader(shard: ShardID(1), baseIndex: 10).encode()
        // Every bit after magic and version: header size, flags, shard, base, reserved bytes, the crc itself.
        for bit in (10 * 8)..<(good.count * 8) {
            #expect(formatErrorKind { _ = try SegmentHeader.decode(flippingBit(good, bit)) } == .checksumMismatch, "bit \(bit)")
        }
    }

    /// Field offsets of `streams.hwm` (Docs/segment-format.md §7).
    @Test func highWaterFieldOffsets() throws {
        let hw = HighWaterFile(
            shard: ShardID(0x0102_0304_0506_0708), firstIndex: 0x1112_1314_1516_1718, incomplete: true,
            marks: [StreamID(9): 4, StreamID(2): 0x2122_2324_2526_2728])
        let b = hw.encode()
        #expect(b.count == Layout.highWaterHeaderBytes + 2 * Layout.highWaterEntryBytes + 4)
        #expect(Array(b[0..<8]) == Layout.highWaterMagic)
        #expect(b.loadLE(UInt16.self, at: 8) == 1)
        #expect(b.loadLE(UInt16.self, at: 10) == 1)  // incomplete
        #expect(b.loadLE(UInt32.self, at: 12) == 2)
        #expect(b.loadLE(UInt64.self, at: 16) == 0x0102_0304_0506_0708)
        #expect(b.loadLE(UInt64.self, at: 24) == 0x1112_1314_1516_1718)
        // Entries sorted by stream id.
        #expect(b.loadLE(UInt64.self, at: 32) == 2)
        #expect(b.loadLE(UInt64.self, at: 40) == 0x2122_2324_2526_2728)
        #expect(b.loadLE(UInt64.self, at: 48) == 9)
        #expect(b.loadLE(UInt64.self, at: 56) == 4)
        #expect(b.loadLE(UInt32.self, at: 64) == CRC32C.checksum(b[0..<64]))
        #expect(try HighWaterFile.decode(b) == hw)
        let empty = HighWaterFile(shard: ShardID(1), firstIndex: 5, incomplete: false, marks: [:]).encode()
        #expect(empty.count == 36)
        #expect(try HighWaterFile.decode(empty).marks.isEmpty)
    }
}
