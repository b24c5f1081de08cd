import WeftCore

/// Sizes and magic numbers of the on-disk format. Each constant cites its table in Docs/segment-format.md;
/// the tests pin them so a change here is a deliberate format change.
public enum Layout {
    /// §1 Segment file header.
    public static let segmentMagic: [UInt8] = Array("WEFTSEG\0".utf8)
    public static let segmentHeaderBytes = 64
    public static let segmentVersion: UInt16 = 1

    /// §2 Block header. "WBLK" as bytes on disk.
    public static let blockMagic: UInt32 = 0x4B4C_4257
    public static let blockHeaderBytes = 32

    /// §3 Record header inside a block's raw payload.
    public static let recordHeaderBytes = 40

    /// §5 Index file.
    public static let indexMagic: [UInt8] = Array("WEFTIDX\0".utf8)
    public static let indexHeaderBytes = 64
    public static let indexVersion: UInt16 = 1
    public static let indexBlockEntryBytes = 24
    public static let indexStreamEntryBytes = 32
    public static let indexRunEntryBytes = 16
    /// Runs are checksummed in chunks so a lookup verifies only the chunk it reads.
    public static let indexRunsPerChunk = 256

    /// §7 High-water file (`streams.hwm`): a header, 16-byte entries, a trailing CRC.
    public static let highWaterMagic: [UInt8] = Array("WEFTHWM\0".utf8)
    public static let highWaterHeaderBytes = 32
    public static let highWaterVersion: UInt16 = 1
    public static let highWaterEntryBytes = 16
    /// Largest high-water file a reader accepts (67 million streams): read whole at open.
    public static let highWaterBytesMax = 1 << 30

    /// The largest stored (on-disk) payload a block may claim: LZ4's bound for the largest raw block.
    public static let blockStoredBytesMax = Limits.blockRawBytesMax + Limits.blockRawBytesMax / 255 + 16
}

/// How a block's payload is stored (§2).
public enum Codec: UInt8, Sendable, CustomStringConvertible {
    case raw = 0
    /// liblz4's block format (LZ4_compress_default / LZ4_decompress_safe), not the frame format:
    /// the block header already carries both sizes and a checksum, so the frame's would be redundant.
    case lz4 = 1

    public var description: String { self == .raw ? "raw" : "lz4" }
}

/// A decoding failure: what is wrong and where. Offsets are byte offsets in the named file.
public struct FormatError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case badMagic = "bad magic"
        case unsupportedVersion = "unsupported version"
        case truncated = "truncated"
        case checksumMismatch = "checksum mismatch"
        case badCodec = "unknown codec"
        case decompressFailed = "decompression failed"
        case badRecord = "malformed record"
        case limitExceeded = "limit exceeded"
        case mismatch = "does not match data"
    }
    public var kind: Kind
    public var file: String
    public var offset: UInt64
    public var detail: String

    public init(_ kind: Kind, file: String = "", offset: UInt64, _ detail: String) {
        self.kind = kind
        self.file = file
        self.offset = offset
        self.detail = detail
    }

    /// `file:offset: reason`, the form weft-dump --verify prints.
    public var description: String { "\(file):\(offset): \(kind.rawValue): \(detail)" }

    public func inFile(_ name: String) -> FormatError {
        var e = self
        e.file = name
        return e
    }
}
