import SegmentFormat
import Testing
import WeftCore
import WeftTesting

/// Decoders fed garbage must throw or return; never trap, loop or allocate without bound. A trap here
/// takes the whole test process down, which is the failure.
@Suite struct HostileInputTests {
    /// Feeds `bytes` to every decoder; returns how many accepted it.
    @discardableResult
    static func feed(_ bytes: [UInt8]) -> Int {
        var accepted = 0
        if (try? SegmentHeader.decode(bytes)) != nil { accepted += 1 }
        if let (h, records) = try? BlockCodec.decode(bytes, offset: 0) {
            accepted += 1
            checkDecoded(h, records)
        }
        let src = MemoryByteSource(bytes: bytes)
        if let idx = try? SegmentIndexFile.open(src) {
            accepted += 1
            exercise(idx, src)
        }
        if let hw = try? HighWaterFile.decode(bytes) {
            accepted += 1
            #expect(hw.firstIndex >= 1 && hw.marks.values.allSatisfy { $0 >= 1 } && hw.marks[.none] == nil)
            #expect((try? HighWaterFile.decode(hw.encode())) == hw)
        }
        if var scanner = try? SegmentScanner(src) {
            accepted += 1
            var steps = 0
            var last: UInt64 = 0
            while let item = try? scanner.next() {
                if case .block(let b) = item {
                    #expect(b.offset >= last && b.offset + UInt64(b.bytes.count) <= UInt64(bytes.count))
                    last = b.offset + UInt64(b.bytes.count)
                    if let records = try? b.records() { checkDecoded(b.header, records) }
                }
                steps += 1
                if steps > bytes.count + 1 {
                    Issue.record("scanner made \(steps) steps over \(bytes.count) bytes")
                    break
                }
            }
        }
        return accepted
    }

    /// What a successful decode promises.
    static func checkDecoded(_ h: BlockHeader, _ records: [Record]) {
        #expect(records.count == Int(h.count))
        for (k, r) in records.enumerated() {
            #expect(r.index == h.firstIndex + UInt64(k))
            #expect(r.payload.count <= Limits.recordPayloadBytesMax)
        }
    }

    static func exercise(_ idx: SegmentIndexFile, _ src: any ByteSource) {
        // The first and last run of every chunk.
        var run: UInt32 = 0
        while run < idx.runCount {
            for r in [run, min(idx.runCount, run + UInt32(Layout.indexRunsPerChunk)) - 1] {
                if let chunk = try? idx.readChunk(containing: r, from: src) {
                    #expect(chunk.first <= r && Int(r - chunk.first) < chunk.runs.count)
                }
            }
            run += UInt32(Layout.indexRunsPerChunk)
        }
        for s in idx.streams { #expect(idx.stream(s.stream) == s) }
        _ = idx.stream(StreamID(12345))
        for b in idx.blocks {
            #expect(b.offset <= idx.segmentBytes && UInt64(Layout.blockHeaderBytes) + UInt64(b.storedBytes) <= idx.segmentBytes - b.offset)
            _ = blockOrdinal(containing: b.firstIndex, in: idx.blocks)
            _ = blockOrdinal(containing: b.lastIndex, in: idx.blocks)
        }
    }

    @Test func randomBytes() {
        var rng = SeededRNG(seed: 31)
        let magics: [[UInt8]] = [
            [], Layout.segmentMagic, Layout.indexMagic, withUnsafeBytes(of: Layout.blockMagic.littleEndian) { Array($0) },
            Layout.highWaterMagic,
        ]
        for _ in 0..<3000 {
            let bytes = magics[rng.int(0..<magics.count)] + rng.bytes(rng.int(0...300))
            Self.feed(bytes)
        }
        // Headers that pass, followed by garbage sprinkled with block magics.
        for _ in 0..<300 {
            var bytes = SegmentHeader(shard: ShardID(1), baseIndex: 1).encode()
            for _ in 0..<rng.int(0...20) {
                if rng.oneIn(2) { bytes += withUnsafeBytes(of: Layout.blockMagic.littleEndian) { Array($0) } }
                bytes += rng.bytes(rng.int(0...60))
            }
            #expect(Self.feed(bytes) >= 2)  // header and scanner accept the file
        }
    }

    /// Valid blocks with bytes changed. Half get their checksum recomputed, so the LZ4 and record decoders
    /// see the hostile payloads too.
    @Test func mutatedBlocks() {
        var rng = SeededRNG(seed: 32)
        var blocks = BlockTests.sampleBlocks().map(\.1)
        for _ in 0..<6 { blocks.append(encodeBlock(randomRecords(count: rng.int(1...12), firstIndex: 1, rng: &rng, maxPayload: 120))) }
        for _ in 0..<4000 {
            var b = blocks[rng.int(0..<blocks.count)]
            for _ in 0..<rng.int(1...4) {
                let at = rng.oneIn(2) ? rng.int(0..<min(b.count, 72)) : rng.int(0..<b.count)
                b[at] = rng.oneIn(3) ? [0, 0xFF, 1, 0x80][rng.int(0..<4)] : UInt8.random(in: 0...255, using: &rng)
            }
            if rng.oneIn(5) { b = Array(b.prefix(rng.int(0...b.count))) }
            if rng.oneIn(5) { b += rng.bytes(rng.int(1...64)) }
            if rng.oneIn(2), b.count >= Layout.blockHeaderBytes {
                let stored = Int(b.loadLE(UInt32.self, at: 12))
                if stored <= b.count - Layout.blockHeaderBytes {
                    let crc = b.withUnsafeBytes {
                        BlockCodec.computeCRC(
                            header: $0, payload: UnsafeRawBufferPointer(rebasing: $0[Layout.blockHeaderBytes..<(Layout.blockHeaderBytes + stored)]))
                    }
                    b.storeLE(crc, at: 28)
                }
            }
            Self.feed(b)
            // Also inside a segment, for the scanner.
            Self.feed(SegmentHeader(shard: ShardID(1), baseIndex: 1).encode() + b + blocks[0])
        }
    }

    /// Recomputes an index file's chunk, table and header checksums from its (possibly mutated) header,
    /// so that mutations reach the table and run checks behind them.
    static func resealIndex(_ b: inout [UInt8]) {
        guard b.count >= Layout.indexHeaderBytes else { return }
        let blocks = Int(b.loadLE(UInt32.self, at: 12))
        let streams = Int(b.loadLE(UInt32.self, at: 40))
        let runs = Int(b.loadLE(UInt32.self, at: 44))
        let chunks = (runs + Layout.indexRunsPerChunk - 1) / Layout.indexRunsPerChunk
        let crcAt = Layout.indexHeaderBytes + blocks * Layout.indexBlockEntryBytes + streams * Layout.indexStreamEntryBytes
        let runsAt = crcAt + chunks * 4
        if runsAt + runs * Layout.indexRunEntryBytes == b.count {
            for c in 0..<chunks {
                let from = runsAt + c * Layout.indexRunsPerChunk * Layout.indexRunEntryBytes
                let to = min(b.count, from + Layout.indexRunsPerChunk * Layout.indexRunEntryBytes)
                b.storeLE(CRC32C.checksum(b[from..<to]), at: crcAt + c * 4)
            }
        }
        if runsAt <= b.count { b.storeLE(CRC32C.checksum(b[Layout.indexHeaderBytes..<runsAt]), at: 56) }
        b.storeLE(CRC32C.checksum(b[0..<60]), at: 60)
    }

    @Test func mutatedIndexFiles() throws {
        var rng = SeededRNG(seed: 33)
        let indexes = [
            try BuiltSegment(rng: &rng, blocks: 6, perBlock: 8, streams: 5).indexBytes,
            try BuiltSegment(rng: &rng, blocks: 30, perBlock: 25, streams: 200).indexBytes,
        ]
        for idx in indexes { #expect(try SegmentIndexFile.open(MemoryByteSource(bytes: idx)).runCount > 0) }
        for _ in 0..<3000 {
            var b = indexes[rng.oneIn(4) ? 1 : 0]
            for _ in 0..<rng.int(1...3) {
                let at = rng.oneIn(2) ? rng.int(0..<min(b.count, 400)) : rng.int(0..<b.count)
                b[at] = rng.oneIn(3) ? [0, 0xFF, 1, 0x80][rng.int(0..<4)] : UInt8.random(in: 0...255, using: &rng)
            }
            if rng.oneIn(8) { b = Array(b.prefix(rng.int(0...b.count))) }
            if !rng.oneIn(4) { Self.resealIndex(&b) }
            Self.feed(b)
        }
    }

    /// Block-table entries that would overflow 64-bit arithmetic, with every checksum valid.
    @Test func indexEntriesNearIntegerLimits() throws {
        var rng = SeededRNG(seed: 34)
        let seg = try BuiltSegment(rng: &rng, blocks: 3, perBlock: 4, streams: 3)
        let good = seg.indexBytes
        let table = Layout.indexHeaderBytes

        var b = good  // first block's offset near UInt64.max: offset + header + stored wraps around
        b.storeLE(UInt64.max - 8, at: table + 8)
        Self.resealIndex(&b)
        #expect(formatErrorKind { _ = try SegmentIndexFile.open(MemoryByteSource(bytes: b)) } == .badRecord)

        b = good  // base index near UInt64.max: first + count wraps around
        b.storeLE(UInt64.max - 1, at: 24)
        b.storeLE(UInt64.max - 1, at: table)
        Self.resealIndex(&b)
        #expect(formatErrorKind { _ = try SegmentIndexFile.open(MemoryByteSource(bytes: b)) } == .badRecord)

        b = good  // stored bytes at the u32 limit
        b.storeLE(UInt32.max, at: table + 20)
        Self.resealIndex(&b)
        #expect(formatErrorKind { _ = try SegmentIndexFile.open(MemoryByteSource(bytes: b)) } == .badRecord)

        // Runs are checked when their chunk is read: one ending past seq 2^64-1, one of no records, one
        // of seq 0, one pointing past the block table.
        let runsAt = good.count - Int(try SegmentIndexFile.open(MemoryByteSource(bytes: good)).runCount) * Layout.indexRunEntryBytes
        for (firstSeq, count, block) in [(UInt64.max - 1, UInt32(3), UInt32(0)), (5, 0, 0), (0, 1, 0), (5, 1, 3)] {
            b = good
            b.storeLE(firstSeq, at: runsAt)
            b.storeLE(count, at: runsAt + 8)
            b.storeLE(block, at: runsAt + 12)
            Self.resealIndex(&b)
            let src = MemoryByteSource(bytes: b)
            let opened = try SegmentIndexFile.open(src)
            #expect(formatErrorKind { _ = try opened.readChunk(containing: 0, from: src) } == .badRecord, "\(firstSeq) \(count) \(block)")
        }
        // The last seq of a run is computed without overflow even for runs no reader accepts.
        #expect(StreamRun(firstSeq: .max, count: 1, block: 0).lastSeq == .max)
        #expect(StreamRun(firstSeq: .max - 1, count: 7, block: 0).lastSeq == .max)
        #expect(StreamRun(firstSeq: 0, count: 0, block: 0).lastSeq == 0)
        #expect(StreamRun(firstSeq: 10, count: 3, block: 0).lastSeq == 12)

        b = good  // control: resealing the unmodified file keeps it valid
        Self.resealIndex(&b)
        #expect(b == good)
    }

    /// High-water files with bytes changed; most get their CRC recomputed, so the entry checks see them.
    @Test func mutatedHighWaterFiles() throws {
        var rng = SeededRNG(seed: 37)
        var marks: [StreamID: StreamSeq] = [:]
        for _ in 0..<40 { marks[StreamID(UInt64(rng.int(1...1_000)))] = UInt64(rng.int(1...100_000)) }
        let good = HighWaterFile(shard: ShardID(3), firstIndex: 777, incomplete: false, marks: marks).encode()
        #expect(try HighWaterFile.decode(good).marks == marks)
        var accepted = 0
        for _ in 0..<3000 {
            var b = good
            for _ in 0..<rng.int(1...3) {
                let at = rng.oneIn(2) ? rng.int(0..<min(b.count, 40)) : rng.int(0..<b.count)
                b[at] = rng.oneIn(3) ? [0, 0xFF, 1, 0x80][rng.int(0..<4)] : UInt8.random(in: 0...255, using: &rng)
            }
            if rng.oneIn(8) { b = Array(b.prefix(rng.int(0...b.count))) }
            if rng.oneIn(8) { b += rng.bytes(rng.int(1...40)) }
            if !rng.oneIn(4), b.count >= 4 { b.storeLE(CRC32C.checksum(b[0..<(b.count - 4)]), at: b.count - 4) }
            accepted += Self.feed(b)
        }
        #expect(accepted > 0)
        // A count that claims 2^32-1 entries is a size mismatch, found before anything is allocated.
        var huge = good
        huge.storeLE(UInt32.max, at: 12)
        huge.storeLE(CRC32C.checksum(huge[0..<(huge.count - 4)]), at: huge.count - 4)
        #expect(formatErrorKind { _ = try HighWaterFile.decode(huge) } == .truncated)
        #expect(formatErrorKind { _ = try HighWaterFile.read(MemoryByteSource(bytes: huge)) } == .truncated)
    }

    /// A segment header naming base index 0, and a block read asked for past the end of the file.
    @Test func segmentHeaderAndScannerBounds() throws {
        #expect(formatErrorKind { _ = try SegmentHeader.decode(SegmentHeader(shard: ShardID(1), baseIndex: 0).encode()) } == .badRecord)
        var rng = SeededRNG(seed: 36)
        let seg = try BuiltSegment(rng: &rng, blocks: 2, perBlock: 3, streams: 2)
        let scanner = try SegmentScanner(MemoryByteSource(bytes: seg.bytes))
        #expect(formatErrorKind { _ = try scanner.readBlock(at: UInt64(seg.bytes.count) + 100) } == .truncated)
        #expect(formatErrorKind { _ = try scanner.readBlock(at: .max) } == .truncated)
    }

    @Test func mutatedSegments() throws {
        var rng = SeededRNG(seed: 35)
        let seg = try BuiltSegment(rng: &rng, blocks: 8, perBlock: 6, streams: 4)
        for _ in 0..<400 {
            var b = seg.bytes
            for _ in 0..<rng.int(1...6) {
                b[rng.int(0..<b.count)] = UInt8.random(in: 0...255, using: &rng)
            }
            if rng.oneIn(4) { b = Array(b.prefix(rng.int(0...b.count))) }
            Self.feed(b)
        }
    }
}
