import SegmentFormat
import Testing
import WeftCore
import WeftTesting

@Suite struct ScannerTests {
    static func segment() throws -> BuiltSegment {
        var rng = SeededRNG(seed: 51)
        return try BuiltSegment(rng: &rng, blocks: 10, perBlock: 8, streams: 5, baseIndex: 500)
    }

    static func blocks(_ seg: BuiltSegment, _ ordinals: some Sequence<Int>) -> [Scanned] {
        ordinals.map { k in
            .block(offset: seg.offsets[k], firstIndex: seg.blockRecords[k][0].index, count: UInt32(seg.blockRecords[k].count))
        }
    }

    @Test func findsEveryBlock() throws {
        let seg = try Self.segment()
        #expect(try scanAll(seg.bytes) == Self.blocks(seg, seg.offsets.indices))

        var scanner = try SegmentScanner(MemoryByteSource(bytes: seg.bytes))
        #expect(scanner.header == SegmentHeader(shard: seg.shard, baseIndex: seg.baseIndex))
        var records = [Record]()
        while let item = try scanner.next() {
            guard case .block(let b) = item else {
                Issue.record("unexpected damage")
                break
            }
            records += try b.records()
            if records.count > seg.records.count {
                Issue.record("scanner does not stop")
                break
            }
        }
        #expect(records == seg.records)
        #expect(scanner.offset == UInt64(seg.bytes.count))
    }

    @Test func headerOnlySegmentHasNoBlocks() throws {
        #expect(try scanAll(SegmentHeader(shard: ShardID(1), baseIndex: 1).encode()).isEmpty)
    }

    @Test func badHeaderIsRejected() throws {
        let seg = try Self.segment()
        #expect(formatErrorKind { _ = try SegmentScanner(MemoryByteSource(bytes: flippingBit(seg.bytes, 0))) } == .badMagic)
        #expect(formatErrorKind { _ = try SegmentScanner(MemoryByteSource(bytes: flippingBit(seg.bytes, 200))) } == .checksumMismatch)
        #expect(formatErrorKind { _ = try SegmentScanner(MemoryByteSource(bytes: Array(seg.bytes.prefix(30)))) } == .truncated)
    }

    /// A damaged block in the middle: the blocks before, the damage with the next block's offset, then the
    /// blocks after.
    @Test func damagedMiddleBlockResumesAtNext() throws {
        let seg = try Self.segment()
        let n = seg.offsets.count
        for k in 1..<(n - 1) {
            let r = seg.range(ofBlock: k)
            // Byte positions to damage: magic, codec, count, stored size, first index, crc, payload.
            let positions = [0, 4, 8, 13, 21, 29, 32, (r.count + 32) / 2, r.count - 1]
            for p in positions {
                var b = seg.bytes
                b[r.lowerBound + p] ^= 0x41
                let got = try scanAll(b)
                let before = Self.blocks(seg, 0..<k)
                let after = Self.blocks(seg, (k + 1)..<n)
                #expect(Array(got.prefix(k)) == before, "block \(k) byte \(p)")
                #expect(Array(got.dropFirst(k + 1)) == after, "block \(k) byte \(p)")
                guard got.count == n, case .damaged(let offset, _, let resume) = got[k] else {
                    Issue.record("block \(k) byte \(p): \(got)")
                    continue
                }
                #expect(offset >= seg.offsets[k] && offset < seg.offsets[k + 1])
                #expect(resume == seg.offsets[k + 1], "block \(k) byte \(p)")
            }
        }
        // The kind reported for a payload flip.
        var b = seg.bytes
        b[seg.range(ofBlock: 3).upperBound - 1] ^= 1
        let got = try scanAll(b)
        try #require(got.count == seg.offsets.count)
        #expect(got[3] == .damaged(offset: seg.offsets[3], kind: .checksumMismatch, resumeAt: seg.offsets[4]))
    }

    /// A file cut anywhere inside its last block: the blocks before, then damage with nowhere to resume.
    @Test func cutTailHasNoResumePoint() throws {
        let seg = try Self.segment()
        let n = seg.offsets.count
        let last = Int(seg.offsets[n - 1])
        #expect(try scanAll(Array(seg.bytes.prefix(last))) == Self.blocks(seg, 0..<(n - 1)))
        for length in (last + 1)..<seg.bytes.count {
            let got = try scanAll(Array(seg.bytes.prefix(length)))
            #expect(Array(got.prefix(n - 1)) == Self.blocks(seg, 0..<(n - 1)), "cut at \(length)")
            guard got.count == n, case .damaged(let offset, let kind, let resume) = got[n - 1] else {
                Issue.record("cut at \(length): \(got)")
                continue
            }
            #expect(offset == UInt64(last))
            #expect(kind == .truncated)
            #expect(resume == nil)
        }
    }

    @Test func damagedLastBlockHasNoResumePoint() throws {
        let seg = try Self.segment()
        let n = seg.offsets.count
        var b = seg.bytes
        b[b.count - 1] ^= 0x80
        let got = try scanAll(b)
        #expect(Array(got.prefix(n - 1)) == Self.blocks(seg, 0..<(n - 1)))
        #expect(got.last == .damaged(offset: seg.offsets[n - 1], kind: .checksumMismatch, resumeAt: nil))
        #expect(got.count == n)
    }

    /// Garbage between blocks is skipped to the next real block.
    @Test func garbageBetweenBlocksIsSkipped() throws {
        let seg = try Self.segment()
        let cut = seg.range(ofBlock: 4).lowerBound
        let junk: [UInt8] = withUnsafeBytes(of: Layout.blockMagic.littleEndian) { Array($0) } + [UInt8](repeating: 0xEE, count: 50)
        let bytes = Array(seg.bytes[..<cut]) + junk + Array(seg.bytes[cut...])
        let got = try scanAll(bytes)
        try #require(got.count == seg.offsets.count + 1, "\(got)")
        #expect(Array(got.prefix(4)) == Self.blocks(seg, 0..<4))
        guard case .damaged(let offset, _, let resume) = got[4] else {
            Issue.record("\(got)")
            return
        }
        #expect(offset >= UInt64(cut) && offset < UInt64(cut + junk.count))
        #expect(resume == UInt64(cut + junk.count))
        if case .block(let o, let first, _) = got[5] {
            #expect(o == UInt64(cut + junk.count))
            #expect(first == seg.blockRecords[4][0].index)
        } else {
            Issue.record("no block after the junk: \(got)")
        }
    }
}
