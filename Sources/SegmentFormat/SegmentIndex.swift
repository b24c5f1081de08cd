import WeftCore

/// Where one block of a segment is (§5.2).
public struct BlockEntry: Equatable, Sendable {
    public var firstIndex: LogIndex
    public var offset: UInt64
    public var count: UInt32
    public var storedBytes: UInt32
    public var lastIndex: LogIndex { firstIndex + UInt64(count) - 1 }
    public init(firstIndex: LogIndex, offset: UInt64, count: UInt32, storedBytes: UInt32) {
        self.firstIndex = firstIndex
        self.offset = offset
        self.count = count
        self.storedBytes = storedBytes
    }
}

/// The records of one stream inside one block (§5.4). A stream has exactly one run per block it appears in.
public struct StreamRun: Equatable, Sendable {
    public var firstSeq: StreamSeq
    public var count: UInt32
    /// Ordinal of the block in the segment's block table.
    public var block: UInt32
    public init(firstSeq: StreamSeq, count: UInt32, block: UInt32) {
        self.firstSeq = firstSeq
        self.count = count
        self.block = block
    }

    /// Seqs are dense, so the run covers `firstSeq ... firstSeq + count - 1` (saturating: a run built
    /// from crafted records that are not dense must not overflow; reading it then finds the mismatch).
    public var lastSeq: StreamSeq {
        let (end, overflow) = firstSeq.addingReportingOverflow(UInt64(count))
        return overflow ? .max : (end == 0 ? 0 : end - 1)
    }
}

/// One stream's summary in one segment (§5.3).
public struct StreamEntry: Equatable, Sendable {
    public var stream: StreamID
    public var firstSeq: StreamSeq
    public var lastSeq: StreamSeq
    public var firstRun: UInt32
    public var runCount: UInt32
}

/// The index of one segment, built in memory while blocks are appended (the active segment) or while a
/// segment is scanned, and encoded into the segment's `.idx` file when it is sealed.
///
/// Pure: no IO. The store and `weft-dump --verify` both build it from data, so an index file can be
/// checked by rebuilding it and comparing bytes.
public struct SegmentIndexBuilder: Sendable {
    public struct Runs: Sendable {
        public var firstSeq: StreamSeq
        public var lastSeq: StreamSeq
        public var runs: [StreamRun]
    }

    public private(set) var blocks: [BlockEntry] = []
    public private(set) var streams: [StreamID: Runs] = [:]
    public private(set) var recordCount: UInt64 = 0

    public init() {}

    /// Adds a block, in log order, with the records it holds.
    public mutating func add(offset: UInt64, header: BlockHeader, records: some Collection<Record>) {
        let ordinal = UInt32(blocks.count)
        blocks.append(BlockEntry(firstIndex: header.firstIndex, offset: offset, count: header.count, storedBytes: header.storedBytes))
        recordCount += UInt64(header.count)
        for r in records where r.stream != .none {
            // Mutate in place (through the dictionary's values): copying a stream's entry out and back
            // would copy its runs array on every record.
            if let i = streams.index(forKey: r.stream) {
                streams.values[i].lastSeq = r.seq
                let last = streams.values[i].runs.count - 1
                if streams.values[i].runs[last].block == ordinal {
                    streams.values[i].runs[last].count += 1
                } else {
                    streams.values[i].runs.append(StreamRun(firstSeq: r.seq, count: 1, block: ordinal))
                }
            } else {
                streams[r.stream] = Runs(firstSeq: r.seq, lastSeq: r.seq, runs: [StreamRun(firstSeq: r.seq, count: 1, block: ordinal)])
            }
        }
    }

    /// Encodes the `.idx` file for a segment whose data ends at `segmentBytes`.
    public func encode(shard: ShardID, baseIndex: LogIndex, segmentBytes: UInt64) -> [UInt8] {
        let ids = streams.keys.sorted()
        var streamTable = [UInt8]()
        streamTable.reserveCapacity(ids.count * Layout.indexStreamEntryBytes)
        var runBytes = [UInt8]()
        var runCount: UInt32 = 0
        for id in ids {
            let s = streams[id]!  // key comes from the dictionary itself
            streamTable.appendLE(id.rawValue)
            streamTable.appendLE(s.firstSeq)
            streamTable.appendLE(s.lastSeq)
            streamTable.appendLE(runCount)
            streamTable.appendLE(UInt32(s.runs.count))
            for r in s.runs {
                runBytes.appendLE(r.firstSeq)
                runBytes.appendLE(r.count)
                runBytes.appendLE(r.block)
            }
            runCount += UInt32(s.runs.count)
        }
        var blockTable = [UInt8]()
        blockTable.reserveCapacity(blocks.count * Layout.indexBlockEntryBytes)
        for b in blocks {
            blockTable.appendLE(b.firstIndex)
            blockTable.appendLE(b.offset)
            blockTable.appendLE(b.count)
            blockTable.appendLE(b.storedBytes)
        }
        let chunkBytes = Layout.indexRunsPerChunk * Layout.indexRunEntryBytes
        var chunkCRCs = [UInt8]()
        var pos = 0
        while pos < runBytes.count {
            let end = min(pos + chunkBytes, runBytes.count)
            chunkCRCs.appendLE(CRC32C.checksum(runBytes[pos..<end]))
            pos = end
        }
        var tablesCRC = CRC32C.checksum(blockTable)
        tablesCRC = CRC32C.checksum(streamTable, continuing: tablesCRC)
        tablesCRC = CRC32C.checksum(chunkCRCs, continuing: tablesCRC)

        var out = [UInt8]()
        out.reserveCapacity(Layout.indexHeaderBytes + blockTable.count + streamTable.count + chunkCRCs.count + runBytes.count)
        out.append(contentsOf: Layout.indexMagic)
        out.appendLE(Layout.indexVersion)
        out.appendLE(UInt16(Layout.indexHeaderBytes))
        out.appendLE(UInt32(blocks.count))
        out.appendLE(shard.rawValue)
        out.appendLE(baseIndex)
        out.appendLE(segmentBytes)
        out.appendLE(UInt32(ids.count))
        out.appendLE(runCount)
        out.appendLE(recordCount)
        out.appendLE(tablesCRC)
        out.appendLE(CRC32C.checksum(out))
        out.append(contentsOf: blockTable)
        out.append(contentsOf: streamTable)
        out.append(contentsOf: chunkCRCs)
        out.append(contentsOf: runBytes)
        return out
    }
}

/// A sealed segment's `.idx` file, opened: header and tables in memory, runs read on demand, one
/// checksummed chunk at a time.
public struct SegmentIndexFile: Sendable {
    public var shard: ShardID
    public var baseIndex: LogIndex
    public var segmentBytes: UInt64
    public var recordCount: UInt64
    public var blocks: [BlockEntry]
    /// The stream table as read (32-byte entries, §5 of segment-format.md), checked at open and searched
    /// in place: a segment with a stream per user has hundreds of thousands of entries, and turning each
    /// into a value at open was most of the time to open a large shard (issue 10).
    /// (The index file's tables as read; the stream table starts at `streamTableOffset`.)
    var streamTable: [UInt8] = []
    var streamTableOffset = 0
    public private(set) var streamCount: Int = 0
    public var runCount: UInt32
    var chunkCRCs: [UInt32]
    var runsOffset: UInt64

    /// Reads and checks the header and tables. Runs are checked chunk by chunk when read.
    public static func open(_ src: any ByteSource) throws -> SegmentIndexFile {
        let file = src.name
        let head = try src.read(at: 0, count: Layout.indexHeaderBytes)
        guard head.count >= 8, Array(head[0..<8]) == Layout.indexMagic else {
            throw FormatError(.badMagic, file: file, offset: 0, "not a Weft index file (magic is not WEFTIDX)")
        }
        guard head.count == Layout.indexHeaderBytes else {
            throw FormatError(.truncated, file: file, offset: UInt64(head.count), "index header needs \(Layout.indexHeaderBytes) bytes")
        }
        let version: UInt16 = head.loadLE(at: 8)
        guard version == Layout.indexVersion else {
            throw FormatError(.unsupportedVersion, file: file, offset: 8, "index version \(version), this build reads \(Layout.indexVersion)")
        }
        let hcrc: UInt32 = head.loadLE(at: 60)
        guard hcrc == CRC32C.checksum(head[0..<60]) else {
            throw FormatError(.checksumMismatch, file: file, offset: 60, "index header crc")
        }
        let blockCount = Int(head.loadLE(UInt32.self, at: 12))
        let streamCount = Int(head.loadLE(UInt32.self, at: 40))
        let runCount: UInt32 = head.loadLE(at: 44)
        let chunkCount = (Int(runCount) + Layout.indexRunsPerChunk - 1) / Layout.indexRunsPerChunk
        let tablesBytes = blockCount * Layout.indexBlockEntryBytes + streamCount * Layout.indexStreamEntryBytes + chunkCount * 4
        let expected = UInt64(Layout.indexHeaderBytes + tablesBytes) + UInt64(runCount) * UInt64(Layout.indexRunEntryBytes)
        guard src.size == expected else {
            throw FormatError(.truncated, file: file, offset: min(src.size, expected), "index file is \(src.size) bytes, its header implies \(expected)")
        }
        let tables = try src.read(at: UInt64(Layout.indexHeaderBytes), count: tablesBytes)
        guard tables.count == tablesBytes else {
            throw FormatError(.truncated, file: file, offset: UInt64(Layout.indexHeaderBytes + tables.count), "index tables cut short")
        }
        guard CRC32C.checksum(tables) == head.loadLE(UInt32.self, at: 56) else {
            throw FormatError(.checksumMismatch, file: file, offset: UInt64(Layout.indexHeaderBytes), "index tables crc")
        }
        var idx = SegmentIndexFile(
            shard: ShardID(head.loadLE(UInt64.self, at: 16)), baseIndex: head.loadLE(at: 24),
            segmentBytes: head.loadLE(at: 32), recordCount: head.loadLE(at: 48), blocks: [],
            runCount: runCount, chunkCRCs: [], runsOffset: UInt64(Layout.indexHeaderBytes + tablesBytes))
        try tables.withUnsafeBytes { t in
            var p = 0
            idx.blocks.reserveCapacity(blockCount)
            var next = idx.baseIndex
            var total: UInt64 = 0
            for i in 0..<blockCount {
                let b = BlockEntry(firstIndex: t.loadLE(at: p), offset: t.loadLE(at: p + 8), count: t.loadLE(at: p + 16), storedBytes: t.loadLE(at: p + 20))
                // Hostile entries must not overflow: compare by subtraction, and keep lastIndex representable.
                guard b.firstIndex == next, b.count >= 1, b.firstIndex <= UInt64.max - UInt64(b.count),
                    b.offset <= idx.segmentBytes,
                    UInt64(Layout.blockHeaderBytes) + UInt64(b.storedBytes) <= idx.segmentBytes - b.offset
                else {
                    throw FormatError(.badRecord, file: file, offset: UInt64(Layout.indexHeaderBytes + p), "block entry \(i) is inconsistent")
                }
                next = b.firstIndex + UInt64(b.count)
                total += UInt64(b.count)
                idx.blocks.append(b)
                p += Layout.indexBlockEntryBytes
            }
            guard total == idx.recordCount else {
                throw FormatError(.badRecord, file: file, offset: 48, "record count \(idx.recordCount) but blocks hold \(total)")
            }
            let streamsAt = p
            var runsSeen: UInt64 = 0
            var previous: UInt64 = 0
            for i in 0..<streamCount {
                let stream: UInt64 = t.loadLE(at: p)
                let firstSeq: UInt64 = t.loadLE(at: p + 8)
                let lastSeq: UInt64 = t.loadLE(at: p + 16)
                let firstRun: UInt32 = t.loadLE(at: p + 24)
                let runs: UInt32 = t.loadLE(at: p + 28)
                guard UInt64(firstRun) == runsSeen, runs >= 1, firstSeq <= lastSeq, i == 0 || previous < stream else {
                    throw FormatError(.badRecord, file: file, offset: UInt64(Layout.indexHeaderBytes + p), "stream entry \(i) is inconsistent")
                }
                previous = stream
                runsSeen += UInt64(runs)
                p += Layout.indexStreamEntryBytes
            }
            idx.streamTableOffset = streamsAt
            idx.streamCount = streamCount
            guard runsSeen == UInt64(runCount) else {
                throw FormatError(.badRecord, file: file, offset: 44, "run count \(runCount) but streams reference \(runsSeen)")
            }
            for _ in 0..<chunkCount {
                idx.chunkCRCs.append(t.loadLE(at: p))
                p += 4
            }
        }
        idx.streamTable = tables
        return idx
    }

    /// Entry `i` of the stream table (sorted by stream id; checked at open).
    public func streamEntry(at i: Int) -> StreamEntry {
        streamTable.withUnsafeBytes { t in
            let p = streamTableOffset + i * Layout.indexStreamEntryBytes
            return StreamEntry(
                stream: StreamID(t.loadLE(UInt64.self, at: p)), firstSeq: t.loadLE(at: p + 8), lastSeq: t.loadLE(at: p + 16),
                firstRun: t.loadLE(at: p + 24), runCount: t.loadLE(at: p + 28))
        }
    }

    /// Every stream entry, sorted by stream id (built on each call: for tools and retention's marks).
    public var streams: [StreamEntry] { (0..<streamCount).map(streamEntry(at:)) }

    /// The stream's entry, by binary search in the table.
    public func stream(_ id: StreamID) -> StreamEntry? {
        let key = id.rawValue
        return streamTable.withUnsafeBytes { t -> StreamEntry? in
            var lo = 0
            var hi = streamCount
            while lo < hi {
                let mid = (lo + hi) / 2
                if t.loadLE(UInt64.self, at: streamTableOffset + mid * Layout.indexStreamEntryBytes) < key { lo = mid + 1 } else { hi = mid }
            }
            guard lo < streamCount, t.loadLE(UInt64.self, at: streamTableOffset + lo * Layout.indexStreamEntryBytes) == key else { return nil }
            return streamEntry(at: lo)
        }
    }

    /// Reads and verifies the chunk holding run number `run`; returns the chunk's first run number and runs.
    public func readChunk(containing run: UInt32, from src: any ByteSource) throws -> (first: UInt32, runs: [StreamRun]) {
        precondition(run < runCount)
        let chunk = Int(run) / Layout.indexRunsPerChunk
        let first = chunk * Layout.indexRunsPerChunk
        let n = min(Layout.indexRunsPerChunk, Int(runCount) - first)
        let offset = runsOffset + UInt64(first * Layout.indexRunEntryBytes)
        let bytes = try src.read(at: offset, count: n * Layout.indexRunEntryBytes)
        guard bytes.count == n * Layout.indexRunEntryBytes else {
            throw FormatError(.truncated, file: src.name, offset: offset + UInt64(bytes.count), "index runs cut short")
        }
        guard CRC32C.checksum(bytes) == chunkCRCs[chunk] else {
            throw FormatError(.checksumMismatch, file: src.name, offset: offset, "index run chunk \(chunk) crc")
        }
        var runs = [StreamRun]()
        runs.reserveCapacity(n)
        try bytes.withUnsafeBytes { b in
            for i in 0..<n {
                let r = StreamRun(firstSeq: b.loadLE(at: i * 16), count: b.loadLE(at: i * 16 + 8), block: b.loadLE(at: i * 16 + 12))
                // A run holds records of a stream (seqs >= 1), its last seq `firstSeq + count - 1` is
                // representable, and it points into the block table.
                guard r.count >= 1, r.firstSeq >= 1, r.firstSeq - 1 <= UInt64.max - UInt64(r.count), Int(r.block) < blocks.count else {
                    throw FormatError(
                        .badRecord, file: src.name, offset: offset + UInt64(i * Layout.indexRunEntryBytes),
                        "run \(first + i) (seq \(r.firstSeq), \(r.count) records, block \(r.block)) is inconsistent")
                }
                runs.append(r)
            }
        }
        return (UInt32(first), runs)
    }
}

/// Finds the block holding `index` in a block table sorted by first index.
public func blockOrdinal(containing index: LogIndex, in blocks: [BlockEntry]) -> Int? {
    var lo = 0
    var hi = blocks.count
    while lo < hi {
        let mid = (lo + hi) / 2
        if blocks[mid].lastIndex < index { lo = mid + 1 } else { hi = mid }
    }
    return lo < blocks.count && blocks[lo].firstIndex <= index ? lo : nil
}

extension SegmentIndexBuilder {
    /// Adds a block-table entry for a damaged region whose records cannot be read: it keeps the table
    /// contiguous, and any read that reaches it fails its checksum instead of skipping records silently.
    public mutating func addUnreadable(offset: UInt64, firstIndex: LogIndex, count: UInt32, storedBytes: UInt32) {
        precondition(count >= 1)
        blocks.append(BlockEntry(firstIndex: firstIndex, offset: offset, count: count, storedBytes: storedBytes))
        recordCount += UInt64(count)
    }

    /// Forgets blocks from ordinal `blockCount` on (suffix truncation). Stream sequences are dense, so a
    /// run of `count` records starting at `firstSeq` ends at `firstSeq + count - 1`.
    public mutating func truncate(blockCount: Int) {
        guard blockCount < blocks.count else { return }
        recordCount -= blocks[blockCount...].reduce(0) { $0 + UInt64($1.count) }
        blocks.removeSubrange(blockCount...)
        for id in Array(streams.keys) {
            guard var s = streams[id] else { continue }
            while let last = s.runs.last, Int(last.block) >= blockCount { s.runs.removeLast() }
            if let last = s.runs.last {
                s.lastSeq = last.lastSeq
                streams[id] = s
            } else {
                streams[id] = nil
            }
        }
    }
}
