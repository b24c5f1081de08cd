import WeftCore

/// §1 of Docs/segment-format.md: the 64-byte header at the start of every segment file.
public struct SegmentHeader: Equatable, Sendable {
    public var shard: ShardID
    /// Log index of the first record this segment holds (also its file name).
    public var baseIndex: LogIndex

    public init(shard: ShardID, baseIndex: LogIndex) {
        self.shard = shard
        self.baseIndex = baseIndex
    }

    public func encode() -> [UInt8] {
        var b = [UInt8]()
        b.reserveCapacity(Layout.segmentHeaderBytes)
        b.append(contentsOf: Layout.segmentMagic)
        b.appendLE(Layout.segmentVersion)
        b.appendLE(UInt16(Layout.segmentHeaderBytes))
        b.appendLE(UInt32(0))  // flags
        b.appendLE(shard.rawValue)
        b.appendLE(baseIndex)
        b.append(contentsOf: [UInt8](repeating: 0, count: 28))
        b.appendLE(CRC32C.checksum(b))
        precondition(b.count == Layout.segmentHeaderBytes)
        return b
    }

    /// Decodes and validates a header; `bytes` are the first bytes of the file (any length).
    public static func decode(_ bytes: [UInt8], file: String = "") throws -> SegmentHeader {
        guard bytes.count >= 8, Array(bytes[0..<8]) == Layout.segmentMagic else {
            throw FormatError(.badMagic, file: file, offset: 0, "not a Weft segment file (magic is not WEFTSEG)")
        }
        guard bytes.count >= Layout.segmentHeaderBytes else {
            throw FormatError(
                .truncated, file: file, offset: UInt64(bytes.count),
                "segment header needs \(Layout.segmentHeaderBytes) bytes, file has \(bytes.count)")
        }
        let version: UInt16 = bytes.loadLE(at: 8)
        guard version == Layout.segmentVersion else {
            throw FormatError(.unsupportedVersion, file: file, offset: 8, "segment version \(version), this build reads \(Layout.segmentVersion)")
        }
        let stored: UInt32 = bytes.loadLE(at: 60)
        let computed = CRC32C.checksum(bytes[0..<60])
        guard stored == computed else {
            throw FormatError(.checksumMismatch, file: file, offset: 60, "segment header crc stored \(hex(stored)) computed \(hex(computed))")
        }
        let headerBytes: UInt16 = bytes.loadLE(at: 10)
        guard Int(headerBytes) == Layout.segmentHeaderBytes else {
            throw FormatError(.badRecord, file: file, offset: 10, "header size \(headerBytes)")
        }
        let base: LogIndex = bytes.loadLE(at: 24)
        guard base >= 1 else {
            throw FormatError(.badRecord, file: file, offset: 24, "base index 0 (log indexes start at 1)")
        }
        return SegmentHeader(shard: ShardID(bytes.loadLE(UInt64.self, at: 16)), baseIndex: base)
    }
}

func hex(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, 8 - s.count)) + s
}
