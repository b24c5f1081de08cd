import SegmentFormat
import Testing
import WeftCore
import WeftTesting

@Suite struct IndexTests {
    /// Everything the builder was given comes back out of the encoded file.
    func checkRoundTrip(_ seg: BuiltSegment) throws {
        let bytes = seg.indexBytes
        let src = MemoryByteSource(name: "t.idx", bytes: bytes)
        let idx = try SegmentIndexFile.open(src)
        #expect(idx.shard == seg.shard)
        #expect(idx.baseIndex == seg.baseIndex)
        #expect(idx.segmentBytes == UInt64(seg.bytes.count))
        #expect(idx.recordCount == UInt64(seg.records.count))

        var expectedBlocks = [BlockEntry]()
        for (k, records) in seg.blockRecords.enumerated() {
            let h = try BlockHeader.decode(Array(seg.bytes[seg.range(ofBlock: k)]), offset: seg.offsets[k])
            expectedBlocks.append(BlockEntry(firstIndex: records[0].index, offset: seg.offsets[k], count: UInt32(records.count), storedBytes: h.storedBytes))
        }
        #expect(idx.blocks == expectedBlocks)

        let runs = expectedRuns(seg)
        #expect(idx.streams.map(\.stream) == runs.keys.sorted())
        #expect(Int(idx.runCount) == runs.values.reduce(0) { $0 + $1.count })
        for entry in idx.streams {
            let want = try #require(runs[entry.stream])
            let seqs = seg.records.filter { $0.stream == entry.stream }.map(\.seq)
            #expect(entry.firstSeq == seqs.first)
            #expect(entry.lastSeq == seqs.last)
            #expect(Int(entry.runCount) == want.count)
            #expect(idx.stream(entry.stream) == entry)
            var got = [StreamRun]()
            for k in 0..<entry.runCount {
                let run = entry.firstRun + k
                let chunk = try idx.readChunk(containing: run, from: src)
                got.append(chunk.runs[Int(run - chunk.first)])
            }
            #expect(got == want, "stream \(entry.stream)")
        }
        #expect(idx.stream(StreamID.none) == nil)
        #expect(idx.stream(StreamID(UInt64.max)) == nil)

        // The block table answers "which block holds index i".
        for (k, records) in seg.blockRecords.enumerated() {
            for r in records { #expect(blockOrdinal(containing: r.index, in: idx.blocks) == k) }
        }
        #expect(blockOrdinal(containing: seg.baseIndex - 1, in: idx.blocks) == nil)
        #expect(blockOrdinal(containing: seg.baseIndex + UInt64(seg.records.count), in: idx.blocks) == nil)
    }

    @Test func roundTripSmall() throws {
        var rng = SeededRNG(seed: 41)
        try checkRoundTrip(try BuiltSegment(rng: &rng, blocks: 5, perBlock: 6, streams: 4))
        try checkRoundTrip(try BuiltSegment(rng: &rng, blocks: 1, perBlock: 1, streams: 1, baseIndex: 1_000_000))
    }

    /// Enough runs for several checksummed chunks.
    @Test func roundTripManyChunks() throws {
        var rng = SeededRNG(seed: 42)
        let seg = try BuiltSegment(rng: &rng, blocks: 40, perBlock: 30, streams: 300, baseIndex: 77)
        let idx = try SegmentIndexFile.open(MemoryByteSource(bytes: seg.indexBytes))
        #expect(Int(idx.runCount) > 2 * Layout.indexRunsPerChunk)
        try checkRoundTrip(seg)
    }

    @Test func emptyIndex() throws {
        let bytes = SegmentIndexBuilder().encode(shard: ShardID(2), baseIndex: 10, segmentBytes: 64)
        let idx = try SegmentIndexFile.open(MemoryByteSource(bytes: bytes))
        #expect(idx.blocks.isEmpty && idx.streams.isEmpty && idx.runCount == 0 && idx.recordCount == 0)
        #expect(idx.baseIndex == 10)
    }

    /// Truncating the builder to k blocks gives the index of a segment of those k blocks, byte for byte.
    @Test func builderTruncateMatchesRebuild() throws {
        var rng = SeededRNG(seed: 43)
        let seg = try BuiltSegment(rng: &rng, blocks: 12, perBlock: 10, streams: 6)
        for k in 0...seg.blockRecords.count {
            var truncated = seg.builder
            truncated.truncate(blockCount: k)
            var rebuilt = SegmentIndexBuilder()
            for b in 0..<k {
                let h = try BlockHeader.decode(Array(seg.bytes[seg.range(ofBlock: b)]), offset: seg.offsets[b])
                rebuilt.add(offset: seg.offsets[b], header: h, records: seg.blockRecords[b])
            }
            #expect(truncated.blocks == rebuilt.blocks)
            #expect(truncated.recordCount == rebuilt.recordCount)
            #expect(
                truncated.encode(shard: seg.shard, baseIndex: 1, segmentBytes: 999)
                    == rebuilt.encode(shard: seg.shard, baseIndex: 1, segmentBytes: 999), "truncated to \(k) blocks")
        }
    }

    /// True when opening the file or reading any of its run chunks fails.
    static func detected(_ bytes: [UInt8]) -> Bool {
        let src = MemoryByteSource(bytes: bytes)
        guard let idx = try? SegmentIndexFile.open(src) else { return true }
        var run: UInt32 = 0
        while run < idx.runCount {
            if (try? idx.readChunk(containing: run, from: src)) == nil { return true }
            run += UInt32(Layout.indexRunsPerChunk)
        }
        return false
    }

    @Test func everyBitFlipIsDetected() throws {
        var rng = SeededRNG(seed: 44)
        let bytes = try BuiltSegment(rng: &rng, blocks: 8, perBlock: 8, streams: 6).indexBytes
        #expect(!Self.detected(bytes))
        let undetected = (0..<(bytes.count * 8)).filter { !Self.detected(flippingBit(bytes, $0)) }
        #expect(undetected.isEmpty, "\(bytes.count)-byte index: flips of bits \(undetected.prefix(10)) went unnoticed")
    }

    @Test func bitFlipsInMultiChunkIndexAreDetected() throws {
        var rng = SeededRNG(seed: 45)
        let bytes = try BuiltSegment(rng: &rng, blocks: 40, perBlock: 30, streams: 300).indexBytes
        #expect(!Self.detected(bytes))
        // Every bit of the header and the first 512 bytes of tables, then a random sample over the rest.
        var bits = Array(0..<((Layout.indexHeaderBytes + 512) * 8))
        for _ in 0..<2000 { bits.append(rng.int(0..<(bytes.count * 8))) }
        let undetected = bits.filter { !Self.detected(flippingBit(bytes, $0)) }
        #expect(undetected.isEmpty, "flips of bits \(undetected.prefix(10)) went unnoticed")
    }

    @Test func openReportsWhatIsWrong() throws {
        var rng = SeededRNG(seed: 46)
        let good = try BuiltSegment(rng: &rng, blocks: 4, perBlock: 5, streams: 3).indexBytes
        func kind(_ b: [UInt8]) -> FormatError.Kind? { formatErrorKind { _ = try SegmentIndexFile.open(MemoryByteSource(bytes: b)) } }
        #expect(kind([]) == .badMagic)
        #expect(kind(flippingBit(good, 3)) == .badMagic)
        #expect(kind(Array(good.prefix(40))) == .truncated)
        #expect(kind(Array(good.dropLast())) == .truncated)
        #expect(kind(good + [0]) == .truncated)
        var v = good
        v.storeLE(UInt16(9), at: 8)
        #expect(kind(v) == .unsupportedVersion)
        #expect(kind(flippingBit(good, 20 * 8)) == .checksumMismatch)  // shard: header crc
        #expect(kind(flippingBit(good, (Layout.indexHeaderBytes + 3) * 8)) == .checksumMismatch)  // block table
    }
}
