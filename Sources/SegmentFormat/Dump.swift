import WeftCore

/// What the dumper reports about one block.
public struct BlockInfo: Sendable {
    public var file: String
    public var offset: UInt64
    public var header: BlockHeader
    public var crcOK: Bool
    public var payloadOffset: UInt64 { offset + UInt64(Layout.blockHeaderBytes) }
    /// raw / stored.
    public var ratio: Double { header.storedBytes == 0 ? 1 : Double(header.rawBytes) / Double(header.storedBytes) }
}

public enum DumpEvent: Sendable {
    case file(path: String, header: SegmentHeader, bytes: UInt64)
    case block(BlockInfo)
    case record(Record)
    /// Damage or a disagreement, as `file:offset: reason`.
    case problem(FormatError)
}

public struct DumpFilter: Sendable {
    public var stream: StreamID?
    public var from: LogIndex?
    public var to: LogIndex?
    /// Decode and report records (off for --verify, which still decodes every block to check it).
    public var records: Bool

    public init(stream: StreamID? = nil, from: LogIndex? = nil, to: LogIndex? = nil, records: Bool = true) {
        self.stream = stream
        self.from = from
        self.to = to
        self.records = records
    }

    func overlaps(_ h: BlockHeader) -> Bool {
        if let from, h.lastIndex < from { return false }
        if let to, h.firstIndex > to { return false }
        return true
    }

    func matches(_ r: Record) -> Bool {
        if let from, r.index < from { return false }
        if let to, r.index > to { return false }
        if let stream, r.stream != stream { return false }
        return true
    }
}

public struct DumpSummary: Sendable {
    public var files = 0
    public var blocks = 0
    public var badBlocks = 0
    public var records = 0
    public var storedBytes: UInt64 = 0
    public var rawBytes: UInt64 = 0
    public var problems = 0
    /// Zeros at the tail of active segments (space written ahead of the data), not counted as data.
    public var preallocatedBytes: UInt64 = 0
    public init() {}
    public var ratio: Double { storedBytes == 0 ? 1 : Double(rawBytes) / Double(storedBytes) }
}

/// The dumper and verifier behind `weft-dump`: walks a segment, reporting every block and record, every
/// checksum failure, and (given the index file) any disagreement between the index and the data.
/// Pure: the caller supplies the bytes.
public enum SegmentDumper {
    /// Dumps one segment; `index` is its `.idx` file when there is one. `progress` gets bytes done.
    /// Throws only when the file is not a readable segment at all (bad or truncated header).
    public static func dump(
        _ src: any ByteSource, index: (any ByteSource)?, filter: DumpFilter, summary: inout DumpSummary,
        progress: (UInt64) -> Void = { _ in }, emit: (DumpEvent) -> Void
    ) throws {
        var scanner = try SegmentScanner(src)
        summary.files += 1
        emit(.file(path: src.name, header: scanner.header, bytes: src.size))
        var builder = SegmentIndexBuilder()
        // Unknown right after damage: the damaged block's own header cannot be trusted.
        var expected: LogIndex? = scanner.header.baseIndex
        var damaged = false
        while true {
            let at = scanner.offset
            guard let item = try scanner.next() else { break }
            progress(scanner.offset)
            switch item {
            case .block(let b):
                summary.blocks += 1
                summary.storedBytes += UInt64(b.header.storedBytes)
                summary.rawBytes += UInt64(b.header.rawBytes)
                var records: [Record] = []
                do {
                    records = try b.records(file: src.name)
                } catch let e as FormatError {
                    summary.problems += 1
                    emit(.problem(e))
                    damaged = true
                    continue
                }
                if let expected, b.header.firstIndex != expected {
                    summary.problems += 1
                    emit(.problem(FormatError(.mismatch, file: src.name, offset: at, "block starts at index \(b.header.firstIndex), expected \(expected)")))
                }
                expected = b.header.lastIndex + 1
                builder.add(offset: at, header: b.header, records: records)
                let shown = records.filter(filter.matches)
                guard filter.overlaps(b.header), filter.stream == nil || !shown.isEmpty else { continue }
                emit(.block(BlockInfo(file: src.name, offset: at, header: b.header, crcOK: true)))
                if filter.records {
                    summary.records += shown.count
                    for r in shown { emit(.record(r)) }
                }
            case .damaged(let err, let resume):
                // An active segment (no index yet) ends in zeros written ahead of its data: free space.
                if resume == nil, index == nil, (try? scanner.isZero(from: at)) == true {
                    summary.preallocatedBytes += src.size - at
                    continue
                }
                damaged = true
                expected = nil
                summary.problems += 1
                if err.kind == .checksumMismatch,
                    let h = try? BlockHeader.decode(try src.read(at: at, count: Layout.blockHeaderBytes), offset: at)
                {
                    summary.blocks += 1
                    summary.badBlocks += 1
                    emit(.block(BlockInfo(file: src.name, offset: at, header: h, crcOK: false)))
                }
                emit(.problem(err))
            }
        }
        guard let index else { return }
        // An index must say exactly what the data says: rebuild it and compare bytes. With damaged data
        // there is nothing sound to compare against; the index's own checksums are still checked.
        do {
            let opened = try SegmentIndexFile.open(index)
            for chunkStart in stride(from: 0, to: Int(opened.runCount), by: Layout.indexRunsPerChunk) {
                _ = try opened.readChunk(containing: UInt32(chunkStart), from: index)
            }
            if damaged { return }
            let rebuilt = builder.encode(shard: scanner.header.shard, baseIndex: scanner.header.baseIndex, segmentBytes: src.size)
            guard let indexBytes = Int(exactly: index.size) else {
                throw FormatError(.limitExceeded, file: index.name, offset: 0, "index file of \(index.size) bytes")
            }
            let actual = try index.read(at: 0, count: indexBytes)
            if let d = zip(rebuilt, actual).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
                throw FormatError(.mismatch, file: index.name, offset: UInt64(d), "index disagrees with the data of \(src.name)")
            }
            if rebuilt.count != actual.count {
                throw FormatError(.mismatch, file: index.name, offset: UInt64(min(rebuilt.count, actual.count)), "index length \(actual.count), data implies \(rebuilt.count)")
            }
        } catch let e as FormatError {
            summary.problems += 1
            emit(.problem(e.file.isEmpty ? e.inFile(index.name) : e))
        }
    }
}
