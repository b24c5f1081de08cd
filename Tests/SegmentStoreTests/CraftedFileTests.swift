import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

/// Files crafted to carry values that pass their checksums but are out of any sane range (issue 8, item
/// 8): a store opening or reading them must report damage (a typed error naming file and offset), never
/// trap. A trap takes the whole test process down, which is the failure.
@Suite struct CraftedFileTests {
    static let options = damageOptions

    /// Records `first ..< first + count` of stream 5, seqs from `seq`.
    static func records(_ first: LogIndex, _ count: Int, stream: StreamID = StreamID(5), seq: StreamSeq) -> [Record] {
        (0..<count).map { k in
            Record(
                index: first + UInt64(k), term: 1, stream: stream, seq: seq + UInt64(k), timestampMicros: 0,
                payload: Array("crafted \(k)".utf8))
        }
    }

    static func block(_ records: [Record]) -> [UInt8] {
        var out = [UInt8]()
        BlockCodec.encode(records[...], compress: false, into: &out)
        return out
    }

    /// A segment file: header, then the blocks; returns the bytes and each block's offset.
    static func segment(base: LogIndex, _ blocks: [[UInt8]]) -> (bytes: [UInt8], offsets: [UInt64]) {
        var bytes = SegmentHeader(shard: options.shard, baseIndex: base).encode()
        var offsets: [UInt64] = []
        for b in blocks {
            offsets.append(UInt64(bytes.count))
            bytes += b
        }
        return (bytes, offsets)
    }

    /// `b` with one payload byte changed: its checksum no longer matches.
    static func damaged(_ b: [UInt8]) -> [UInt8] {
        var d = b
        d[Layout.blockHeaderBytes + 3] ^= 0x20
        return d
    }

    static func disk(_ files: [String: [UInt8]]) throws -> SimulatedDisk { try simulatedDisk(with: files) }
    static func path(_ name: String) -> String { simDirectory + "/" + name }
    static func open(_ disk: SimulatedDisk) throws -> SegmentStore {
        try SegmentStore(directory: simDirectory, options: options, disk: disk)
    }

    /// A damaged block followed by a valid block whose first index is more than 2^32 past the expected
    /// one: resync finds the valid block, and the unreadable range between them cannot be counted in a
    /// u32 (it used to be `UInt32(next - expected)`, a trap). The segment is damage: reported at the
    /// valid block's offset and moved aside with what follows, as for a block that goes backwards.
    @Test(arguments: [true, false]) func damagedBlockThenABlockFarAhead(last: Bool) throws {
        let far: LogIndex = 4 + (1 << 32) + 5
        let seg = Self.segment(
            base: 1, [Self.block(Self.records(1, 3, seq: 1)), Self.damaged(Self.block(Self.records(4, 2, seq: 4))), Self.block(Self.records(far, 2, seq: 6))])
        var files = [SegmentName.of(1): seg.bytes]
        if !last {
            // A later segment, so this one is a sealed segment without an index: rebuilt by scanning.
            files[SegmentName.of(far + 2)] = Self.segment(base: far + 2, [Self.block(Self.records(far + 2, 1, seq: 8))]).bytes
        }
        let disk = try Self.disk(files)
        let store = try Self.open(disk)
        defer { store.close() }
        let reported = try #require(store.damage.first { $0.kind == .mismatch }, "\(store.damage)")
        #expect(reported.file == Self.path(SegmentName.of(1)))
        #expect(reported.offset == seg.offsets[2])
        #expect(store.findings.damagedFrom == 1)
        #expect(store.lastIndex == 0)
        #expect(disk.exists(Self.path("quarantine/" + SegmentName.of(1))))
    }

    /// A sealed segment whose damage reaches its end, followed by a segment whose name (and header) puts
    /// its base more than 2^32 records later: the unreadable range up to that base used to be counted as
    /// `UInt32(expectedEnd - expected + 1)`, a trap. The damage is reported; the segment ends where its
    /// valid blocks end, and the far segment is a hole: moved aside, lost from there.
    @Test func sealedSegmentDamagedToItsEndBeforeAFarBase() throws {
        let far: LogIndex = 7 + (1 << 33)
        let first = Self.segment(base: 1, [Self.block(Self.records(1, 3, seq: 1)), Self.damaged(Self.block(Self.records(4, 3, seq: 4)))])
        let second = Self.segment(base: far, [Self.block(Self.records(far, 2, seq: 7))])
        let disk = try Self.disk([SegmentName.of(1): first.bytes, SegmentName.of(far): second.bytes])
        let store = try Self.open(disk)
        defer { store.close() }
        let reported = try #require(store.damage.first { $0.file == Self.path(SegmentName.of(1)) }, "\(store.damage)")
        #expect(reported.offset == first.offsets[1])
        #expect(store.damagedFrom == 4)
        #expect(store.lastIndex == 3)
        #expect(try store.read(from: 1, to: 3).map(\.seq) == [1, 2, 3])
        #expect(disk.exists(Self.path("quarantine/" + SegmentName.of(far))))
    }

    /// A truncate intent whose checksum is right but whose cut offset is past what a file offset can be
    /// (it used to reach `off_t(offset)` / `Int(size)`, a trap): not replayed, reported, removed.
    @Test func intentWithAnImpossibleOffset() throws {
        let seg = Self.segment(base: 1, [Self.block(Self.records(1, 3, seq: 1)), Self.block(Self.records(4, 3, seq: 4))])
        var intent = Array("WEFTTRN\0".utf8)
        intent.appendLE(UInt64(1))
        intent.appendLE(UInt64(1) << 63 + 5)
        let replacement = Self.block(Self.records(4, 1, seq: 4))
        intent.appendLE(UInt32(replacement.count))
        intent += replacement
        intent.appendLE(CRC32C.checksum(intent))
        let disk = try Self.disk([SegmentName.of(1): seg.bytes, "truncate.intent": intent])
        let store = try Self.open(disk)
        defer { store.close() }
        let reported = try #require(store.damage.first { $0.file == Self.path("truncate.intent") }, "\(store.damage)")
        #expect(reported.offset == 16)
        #expect(!disk.exists(Self.path("truncate.intent")))
        #expect(store.lastIndex == 6)
        #expect(store.findings.notes.contains { $0.contains("truncate.intent") }, "\(store.findings.notes)")
    }

    /// A file named as the segment of base 0 (no log index is 0): not a segment of this log, so it is
    /// not read (it used to make the log's last index `0 - 1`, a trap). A header claiming base 0 is
    /// malformed.
    @Test func segmentOfBaseZero() throws {
        let zero = Self.segment(base: 0, []).bytes
        #expect(throws: FormatError.self) { try SegmentHeader.decode(zero) }
        let disk = try Self.disk([String(repeating: "0", count: 20) + ".seg": zero])
        let store = try Self.open(disk)
        defer { store.close() }
        #expect(store.lastIndex == 0)
        #expect(store.firstIndex == 1)
    }

    /// An index file whose runs (checksummed, so they pass) describe a run ending past seq 2^64-1 or
    /// holding no records: a stream read used to compute `firstSeq + count - 1` and trap. The chunk is
    /// rejected as damage; the read rebuilds the index from the data and answers.
    @Test(arguments: [(UInt64.max - 1, UInt32(3)), (UInt64(0), UInt32(0))])
    func indexRunsOutOfRange(firstSeq: UInt64, count: UInt32) throws {
        let disk = SimulatedDisk()
        let (written, model) = try filledStore(disk: disk, options: Self.options, seed: 800, batches: 60)
        written.close()
        let segs = try segmentFiles(disk)
        try #require(segs.count >= 3)
        let idxPath = Self.path(segs[0].indexName)
        var idx = try readFile(disk, idxPath)
        let opened = try SegmentIndexFile.open(MemoryByteSource(bytes: idx))
        let stream = try #require(opened.streams.first)
        // Rewrite the stream's first run, then every checksum over it.
        let runsOffset = idx.count - Int(opened.runCount) * Layout.indexRunEntryBytes
        let at = runsOffset + Int(stream.firstRun) * Layout.indexRunEntryBytes
        idx.storeLE(firstSeq, at: at)
        idx.storeLE(count, at: at + 8)
        let chunk = Int(stream.firstRun) / Layout.indexRunsPerChunk
        let chunkStart = runsOffset + chunk * Layout.indexRunsPerChunk * Layout.indexRunEntryBytes
        let chunkEnd = min(idx.count, chunkStart + Layout.indexRunsPerChunk * Layout.indexRunEntryBytes)
        let crcsOffset = runsOffset - 4 * ((Int(opened.runCount) + Layout.indexRunsPerChunk - 1) / Layout.indexRunsPerChunk)
        idx.storeLE(CRC32C.checksum(idx[chunkStart..<chunkEnd]), at: crcsOffset + 4 * chunk)
        idx.storeLE(CRC32C.checksum(idx[Layout.indexHeaderBytes..<runsOffset]), at: 56)
        idx.storeLE(CRC32C.checksum(idx[0..<60]), at: 60)
        disk.setContents(idxPath, idx)

        let store = try Self.open(disk)
        defer { store.close() }
        #expect(noFindings(store.findings), "\(store.findings)")
        let got = try store.readStream(stream.stream, fromSeq: 0, limit: .max)
        #expect(got == model.stream(stream.stream, fromSeq: 0, limit: .max))
        #expect(store.damage.contains { $0.file == idxPath }, "\(store.damage)")
        try checkFully(store, model, "after the crafted index was rebuilt")
    }

    /// A stream whose records reach seq 2^64-1 (checksums right): reading forward past it, backward, and
    /// appending after it must not overflow.
    @Test func streamAtTheLastSeq() throws {
        let top = UInt64.max
        let seg = Self.segment(base: 1, [Self.block(Self.records(1, 3, seq: top - 2))])
        let disk = try Self.disk([SegmentName.of(1): seg.bytes])
        let store = try Self.open(disk)
        defer { store.close() }
        #expect(store.lastSeq(of: StreamID(5)) == top)
        #expect(try store.readStream(StreamID(5), fromSeq: top - 1, limit: 10).map(\.seq) == [top - 1, top])
        #expect(try store.readStream(StreamID(5), fromSeq: 0, limit: .max).map(\.seq) == [top - 2, top - 1, top])
        #expect(try store.readStreamBackward(StreamID(5), limit: .max).map(\.seq) == [top, top - 1, top - 2])
        let next = Record(index: 4, term: 1, stream: StreamID(5), seq: 1, timestampMicros: 0, payload: [])
        #expect(storeError { try store.append([next]) } != nil)
        // Appending seq 2^64-1 is refused (no seq could follow it).
        let fresh = Record(index: 4, term: 1, stream: StreamID(6), seq: top, timestampMicros: 0, payload: [])
        #expect(storeError { try store.append([fresh]) } != nil)
    }

    /// A stream record with seq 0 (only `.none` records have seq 0; checksums right): reading the stream
    /// backward used to step below seq 0.
    @Test func streamRecordWithSeqZero() throws {
        let seg = Self.segment(base: 1, [Self.block(Self.records(1, 1, seq: 0))])
        let disk = try Self.disk([SegmentName.of(1): seg.bytes])
        let store = try Self.open(disk)
        defer { store.close() }
        _ = try? store.readStreamBackward(StreamID(5), limit: .max)
        _ = try? store.readStream(StreamID(5), fromSeq: 0, limit: .max)
        #expect(store.lastIndex == 1)
    }
}

extension CraftedFileTests {
    /// Offsets read from files reach the real disk too: one past what a file offset (`off_t`) can hold is
    /// an IO error, not a trap in `off_t(offset)`.
    @Test func posixFileRefusesOffsetsPastInt64() throws {
        let tmp = try TempDirectory(prefix: "weft-crafted")
        defer { tmp.remove() }
        let f = try PosixDisk().open(tmp.path + "/f", create: true)
        defer { f.close() }
        try f.write([1, 2, 3], at: 0)
        let huge = UInt64(Int64.max) + 9
        #expect(throws: DiskError.self) { try f.read(at: huge, count: 4) }
        #expect(throws: DiskError.self) { try f.read(at: UInt64(Int64.max) - 1, count: 4) }
        #expect(throws: DiskError.self) { try f.write([9], at: huge) }
        #expect(throws: DiskError.self) { try f.truncate(to: huge) }
        #expect(try f.read(at: 0, count: 8) == [1, 2, 3])
    }
}

/// File names as the store writes them (Docs/segment-format.md).
enum SegmentName {
    static func of(_ base: LogIndex) -> String {
        let s = String(base)
        return String(repeating: "0", count: max(0, 20 - s.count)) + s + ".seg"
    }
}
