import SegmentFormat
import WeftCore

/// One segment file of the store and its index: sealed (index on disk, read-only) or active (index in
/// memory, appended to).
final class Segment {
    let base: LogIndex
    let dataPath: String
    let indexPath: String
    let file: any DiskFile
    /// Bytes of valid data: the offset where the next block goes.
    var size: UInt64
    /// The file's length as this store last set it: zeros past `size` were written ahead
    /// (`StoreOptions.preallocateBytes`), so appends overwrite allocated blocks instead of growing the
    /// file. Only ever a hint: zeros are written past the end of the newest data only.
    var allocated: UInt64
    /// The file's length when an append last synced it itself (fdatasync), 0 when unknown (opened, or
    /// cut since): below it the file's size and block map are durable, so data written there needs
    /// only a write-back and a device flush to be durable (`SegmentStore.syncTogether`).
    var syncedLength: UInt64 = 0

    /// fdatasync of the file, which then holds data up to `end` (and zeros to `allocated`) durably.
    func syncFile(holding end: UInt64) throws {
        try file.sync()
        syncedLength = max(allocated, end)
    }
    /// Set once the segment is sealed; its runs are read from `indexFile`.
    var sealed: SegmentIndexFile?
    var indexSource: FileByteSource?
    /// The index of an active segment; empty once sealed.
    var builder = SegmentIndexBuilder()

    init(base: LogIndex, dataPath: String, indexPath: String, file: any DiskFile, size: UInt64) {
        self.base = base
        self.dataPath = dataPath
        self.indexPath = indexPath
        self.file = file
        self.size = size
        self.allocated = size
    }

    var blocks: [BlockEntry] { sealed?.blocks ?? builder.blocks }
    var lastIndex: LogIndex { blocks.last?.lastIndex ?? base - 1 }
    var isEmpty: Bool { blocks.isEmpty }

    /// The stream's first and last seq in this segment, and how many runs it has.
    func streamSummary(_ s: StreamID) -> (firstSeq: StreamSeq, lastSeq: StreamSeq, runCount: Int)? {
        if let sealed {
            guard let e = sealed.stream(s) else { return nil }
            return (e.firstSeq, e.lastSeq, Int(e.runCount))
        }
        guard let r = builder.streams[s] else { return nil }
        return (r.firstSeq, r.lastSeq, r.runs.count)
    }

    func runs(_ s: StreamID) -> RunReader? {
        if let sealed, let indexSource {
            guard let e = sealed.stream(s) else { return nil }
            return RunReader(source: .file(sealed, indexSource, e))
        }
        guard let r = builder.streams[s] else { return nil }
        return RunReader(source: .memory(r.runs))
    }

    func close() {
        file.close()
        indexSource?.file.close()
    }
}

/// The runs of one stream in one segment, read by position; a sealed segment's runs come from its index
/// file one verified chunk at a time.
struct RunReader {
    enum Source {
        case memory([StreamRun])
        case file(SegmentIndexFile, FileByteSource, StreamEntry)
    }
    let source: Source
    private var chunk: (first: UInt32, runs: [StreamRun])?

    init(source: Source) { self.source = source }

    var count: Int {
        switch source {
        case .memory(let r): r.count
        case .file(_, _, let e): Int(e.runCount)
        }
    }

    mutating func run(_ i: Int) throws -> StreamRun {
        switch source {
        case .memory(let r):
            return r[i]
        case .file(let idx, let src, let e):
            let absolute = e.firstRun + UInt32(i)
            if let c = chunk, absolute >= c.first, absolute < c.first + UInt32(c.runs.count) {
                return c.runs[Int(absolute - c.first)]
            }
            let c = try idx.readChunk(containing: absolute, from: src)
            chunk = c
            return c.runs[Int(absolute - c.first)]
        }
    }

    /// Seqs are dense, so run `r` covers `r.firstSeq ... r.firstSeq + r.count - 1`.
    static func lastSeq(_ r: StreamRun) -> StreamSeq { r.lastSeq }

    /// The first run whose last seq is >= `seq` (count if none).
    mutating func firstRun(endingAtOrAfter seq: StreamSeq) throws -> Int {
        var lo = 0
        var hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if RunReader.lastSeq(try run(mid)) < seq { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The last run whose first seq is <= `seq` (-1 if none).
    mutating func lastRun(startingAtOrBefore seq: StreamSeq) throws -> Int {
        var lo = 0
        var hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if try run(mid).firstSeq <= seq { lo = mid + 1 } else { hi = mid }
        }
        return lo - 1
    }
}

