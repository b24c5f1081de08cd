import SegmentFormat
import WeftCore

/// When appended data is made durable. Docs/storage.md says exactly when each one fsyncs.
public enum Durability: Sendable, Equatable {
    /// fdatasync after every append batch, before `append` returns (the default).
    case everyBatch
    /// fdatasync after every n-th batch; a crash may lose up to n-1 acknowledged batches.
    case everyBatches(Int)
    /// Never fdatasync on append (segments are still synced when sealed); the OS decides.
    case never
}

public struct StoreOptions: Sendable {
    public var shard: ShardID
    /// A segment is sealed and a new one started once it reaches this size (checked between batches,
    /// so a segment exceeds it by at most one batch).
    public var segmentBytesMax: UInt64
    /// Records are packed into blocks of about this many raw bytes (a larger record gets a block alone).
    public var blockBytesTarget: Int
    public var durability: Durability
    /// LZ4-compress blocks (a block is stored raw anyway when compression does not shrink it).
    public var compress: Bool
    /// Zeros written ahead of the active segment's data, this many bytes at a time (0: none). An append
    /// that grows the file makes its fdatasync also write the inode (the new size): a second device write
    /// and wait on every sync. Written ahead, the size changes once per this many bytes. The zeros past
    /// the data are cut at seal and, after a crash, at open (Docs/storage.md).
    public var preallocateBytes: UInt64 = 1 << 20
    /// A segment is also sealed once it holds this many records (issue 10): the active segment has no
    /// index file, so opening the store rebuilds its index by reading every block, and this bounds that
    /// work (and so a restart's time) for small records, which fill 64 MiB only after millions.
    public var segmentRecordsMax: UInt64 = 262_144

    public init(
        shard: ShardID = ShardID(0), segmentBytesMax: UInt64 = 64 << 20, blockBytesTarget: Int = 16 << 10,
        durability: Durability = .everyBatch, compress: Bool = true
    ) {
        self.shard = shard
        self.segmentBytesMax = segmentBytesMax
        self.blockBytesTarget = min(max(blockBytesTarget, 256), Limits.recordPayloadBytesMax)
        self.durability = durability
        self.compress = compress
    }
}

public enum StoreError: Error, Equatable, CustomStringConvertible {
    /// The file system failed. After a failed write or sync the store refuses further writes
    /// (`failed`): what reached the disk is unknown until recovery reopens the directory.
    case disk(DiskError)
    /// Stored data failed its checks; it is not served.
    case corrupt(FormatError)
    case nonContiguous(expected: LogIndex, got: LogIndex)
    case termRegressed(index: LogIndex, term: Term, previous: Term)
    case streamSequence(stream: StreamID, expected: StreamSeq, got: StreamSeq)
    case invalidBatch(String)
    case outOfRange(requested: LogIndex, first: LogIndex, last: LogIndex)
    case failed(String)

    public var description: String {
        switch self {
        case .disk(let e): "disk error: \(e)"
        case .corrupt(let e): "corrupt data: \(e)"
        case .nonContiguous(let expected, let got): "append at index \(got), the log continues at \(expected)"
        case .termRegressed(let index, let term, let previous): "record \(index) has term \(term) below the log's last term \(previous)"
        case .streamSequence(let s, let expected, let got): "stream \(s): seq \(got), expected \(expected)"
        case .invalidBatch(let why): "invalid batch: \(why)"
        case .outOfRange(let i, let first, let last): "index \(i) is outside the log [\(first), \(last)]"
        case .failed(let why): "store stopped after an earlier failure (\(why)); reopen it to recover"
        }
    }
}

/// Where a stream has records: one span per segment that holds any of them, in log order.
struct StreamSpan {
    var segmentBase: LogIndex
    var firstSeq: StreamSeq
    var lastSeq: StreamSeq
}

/// File names: the segment's base index as 20 decimal digits, so names sort in log order.
enum FileNames {
    static let intent = "truncate.intent"
    /// Names the directory a log is being moved into (`setAside`); finished at open after a crash.
    static let asideIntent = "set-aside.intent"
    static let fence = "tail.fence"
    /// Last seqs of streams whose records retention dropped (§7 of Docs/segment-format.md).
    static let highWater = "streams.hwm"
    /// Segments found past a hole at open are moved here (kept for inspection, never read again).
    static let quarantine = "quarantine"

    static func segment(_ base: LogIndex) -> String { digits(base) + ".seg" }
    static func index(_ base: LogIndex) -> String { digits(base) + ".idx" }

    static func digits(_ v: UInt64) -> String {
        let s = String(v)
        return String(repeating: "0", count: max(0, 20 - s.count)) + s
    }

    /// The base index named by a segment file name, or nil for other files (no log index is 0, so
    /// `00000000000000000000.seg` is not a segment of a log either).
    static func segmentBase(_ name: String) -> LogIndex? {
        guard name.hasSuffix(".seg"), name.count == 24, let base = LogIndex(name.prefix(20)), base >= 1 else { return nil }
        return base
    }
}
