import WeftCore

/// §7 of Docs/segment-format.md: `streams.hwm`, the last seq of every stream that had records in segments
/// retention dropped. A stream's seqs are dense and the log numbers the next record of a stream from its
/// last seq, so this must outlive the segments: without it a stream whose records were all dropped would
/// start again at seq 1.
///
/// ```
/// "WEFTHWM\0" | u16 version | u16 flags | u32 stream count N | u64 shard | u64 first index
/// | N x (u64 stream, u64 last seq), by stream id | u32 crc32c of everything before
/// ```
public struct HighWaterFile: Equatable, Sendable {
    public var shard: ShardID
    /// The log's first index when the file was written: it holds the marks of every record below it.
    public var firstIndex: LogIndex
    /// Set when the marks of some records below `firstIndex` were lost (a damaged or missing file was
    /// found, and the file was written again since): a stream absent here may have had records.
    public var incomplete: Bool
    /// stream -> its last seq among the dropped records.
    public var marks: [StreamID: StreamSeq]

    /// Flag bit 0 of the header.
    public static let incompleteFlag: UInt16 = 1

    public init(shard: ShardID, firstIndex: LogIndex, incomplete: Bool, marks: [StreamID: StreamSeq]) {
        self.shard = shard
        self.firstIndex = firstIndex
        self.incomplete = incomplete
        self.marks = marks
    }

    public func encode() -> [UInt8] {
        let ids = marks.keys.sorted()
        var b = [UInt8]()
        b.reserveCapacity(Layout.highWaterHeaderBytes + ids.count * Layout.highWaterEntryBytes + 4)
        b.append(contentsOf: Layout.highWaterMagic)
        b.appendLE(Layout.highWaterVersion)
        b.appendLE(incomplete ? Self.incompleteFlag : 0)
        precondition(ids.count <= Int(UInt32.max), "more streams than a high-water file can count")
        b.appendLE(UInt32(ids.count))
        b.appendLE(shard.rawValue)
        b.appendLE(firstIndex)
        for id in ids {
            b.appendLE(id.rawValue)
            b.appendLE(marks[id] ?? 0)
        }
        b.appendLE(CRC32C.checksum(b))
        return b
    }

    /// Reads and checks a whole high-water file: its size against the header's count (and the size limit)
    /// before reading it, the CRC, then each entry.
    public static func read(_ src: any ByteSource) throws -> HighWaterFile {
        guard src.size <= UInt64(Layout.highWaterBytesMax) else {
            throw FormatError(.limitExceeded, file: src.name, offset: 0, "high-water file of \(src.size) bytes, limit \(Layout.highWaterBytesMax)")
        }
        let bytes = try src.read(at: 0, count: Int(src.size))
        guard UInt64(bytes.count) == src.size else {
            throw FormatError(.truncated, file: src.name, offset: UInt64(bytes.count), "high-water file cut short while reading")
        }
        return try decode(bytes, file: src.name)
    }

    public static func decode(_ b: [UInt8], file: String = "") throws -> HighWaterFile {
        guard b.count >= 8, Array(b[0..<8]) == Layout.highWaterMagic else {
            throw FormatError(.badMagic, file: file, offset: 0, "not a Weft high-water file (magic is not WEFTHWM)")
        }
        guard b.count >= Layout.highWaterHeaderBytes + 4 else {
            throw FormatError(.truncated, file: file, offset: UInt64(b.count), "high-water file needs \(Layout.highWaterHeaderBytes + 4) bytes, has \(b.count)")
        }
        let version: UInt16 = b.loadLE(at: 8)
        guard version == Layout.highWaterVersion else {
            throw FormatError(.unsupportedVersion, file: file, offset: 8, "high-water version \(version), this build reads \(Layout.highWaterVersion)")
        }
        let count: UInt32 = b.loadLE(at: 12)
        // In 64 bits: a u32 count times 16 cannot overflow.
        let expected = UInt64(Layout.highWaterHeaderBytes) + UInt64(count) * UInt64(Layout.highWaterEntryBytes) + 4
        guard UInt64(b.count) == expected else {
            throw FormatError(
                .truncated, file: file, offset: min(UInt64(b.count), expected), "high-water file is \(b.count) bytes, its header implies \(expected)")
        }
        let crcAt = b.count - 4
        let stored: UInt32 = b.loadLE(at: crcAt)
        let computed = CRC32C.checksum(b[0..<crcAt])
        guard stored == computed else {
            throw FormatError(.checksumMismatch, file: file, offset: UInt64(crcAt), "high-water crc stored \(hex(stored)) computed \(hex(computed))")
        }
        let flags: UInt16 = b.loadLE(at: 10)
        guard flags & ~incompleteFlag == 0 else {
            throw FormatError(.unsupportedVersion, file: file, offset: 10, "unknown high-water flags \(flags)")
        }
        let firstIndex: LogIndex = b.loadLE(at: 24)
        guard firstIndex >= 1 else {
            throw FormatError(.badRecord, file: file, offset: 24, "first index 0")
        }
        var marks: [StreamID: StreamSeq] = [:]
        marks.reserveCapacity(Int(count))
        var previous: UInt64 = 0
        var at = Layout.highWaterHeaderBytes
        for i in 0..<Int(count) {
            let id: UInt64 = b.loadLE(at: at)
            let seq: UInt64 = b.loadLE(at: at + 8)
            // Sorted, no stream 0 (no-stream records have no seq), a seq a stream can have.
            guard id > previous, seq >= 1 else {
                throw FormatError(.badRecord, file: file, offset: UInt64(at), "entry \(i) (stream \(id), seq \(seq)) is out of order or empty")
            }
            marks[StreamID(id)] = seq
            previous = id
            at += Layout.highWaterEntryBytes
        }
        return HighWaterFile(shard: ShardID(b.loadLE(UInt64.self, at: 16)), firstIndex: firstIndex, incomplete: flags & incompleteFlag != 0, marks: marks)
    }
}
