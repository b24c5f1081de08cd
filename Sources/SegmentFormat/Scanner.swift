import WeftCore

/// A block found in a segment file, checksum verified.
public struct ScannedBlock: Sendable {
    public var offset: UInt64
    public var header: BlockHeader
    /// Header and stored payload, as on disk.
    public var bytes: [UInt8]

    /// Decodes the records (the checksum was verified by the scanner).
    public func records(file: String = "") throws -> [Record] {
        try BlockCodec.decode(bytes, file: file, offset: offset).1
    }
}

/// What the scanner found next.
public enum ScanItem: Sendable {
    case block(ScannedBlock)
    /// Bytes from `error.offset` are not a valid block. `resumeAt` is where the next valid block starts,
    /// or nil when nothing valid follows (a torn tail, or damage that reaches the end of the file).
    case damaged(FormatError, resumeAt: UInt64?)
}

/// Walks a segment file block by block (§4 of Docs/segment-format.md, "Finding blocks").
///
/// Blocks are laid end to end after the file header, so a reader finds each boundary from the previous
/// block's stored size. When a block fails its checks the scanner looks for the next offset holding the
/// block magic followed by a block whose checksum verifies, so one damaged block does not hide the rest.
public struct SegmentScanner {
    public let source: any ByteSource
    public let header: SegmentHeader
    public private(set) var offset: UInt64
    private var done = false

    public init(_ source: any ByteSource) throws {
        self.source = source
        let head = try source.read(at: 0, count: Layout.segmentHeaderBytes)
        header = try SegmentHeader.decode(head, file: source.name)
        offset = UInt64(Layout.segmentHeaderBytes)
    }

    public mutating func next() throws -> ScanItem? {
        guard !done, offset < source.size else { return nil }
        do {
            let block = try readBlock(at: offset)
            offset += UInt64(block.bytes.count)
            return .block(block)
        } catch let error as FormatError {
            let resume = try resync(after: offset)
            if let resume { offset = resume } else { done = true }
            return .damaged(error, resumeAt: resume)
        }
    }

    /// Reads and verifies the block at `offset`.
    public func readBlock(at offset: UInt64) throws -> ScannedBlock {
        let file = source.name
        guard offset <= source.size else {
            throw FormatError(.truncated, file: file, offset: offset, "no block past the end of the file (\(source.size) bytes)")
        }
        let head = try source.read(at: offset, count: Layout.blockHeaderBytes)
        let h = try BlockHeader.decode(head, file: file, offset: offset)
        let available = source.size - offset
        guard UInt64(h.totalBytes) <= available else {
            throw FormatError(.truncated, file: file, offset: offset, "block needs \(h.totalBytes) bytes, file has \(available) left")
        }
        var bytes = head
        bytes += try source.read(at: offset + UInt64(Layout.blockHeaderBytes), count: Int(h.storedBytes))
        guard bytes.count == h.totalBytes else {
            throw FormatError(.truncated, file: file, offset: offset, "block cut short while reading")
        }
        _ = try bytes.withUnsafeBytes { try BlockCodec.verify($0, file: file, offset: offset) }
        return ScannedBlock(offset: offset, header: h, bytes: bytes)
    }

    /// Whether every byte from `offset` to the end of the file is zero (space written ahead of the data,
    /// or data that never reached the disk), as opposed to a torn or damaged block.
    public func isZero(from offset: UInt64) throws -> Bool {
        var pos = offset
        let window = 1 << 20
        while pos < source.size {
            let bytes = try source.read(at: pos, count: Int(min(UInt64(window), source.size - pos)))
            if bytes.isEmpty { break }
            if bytes.contains(where: { $0 != 0 }) { return false }
            pos += UInt64(bytes.count)
        }
        return true
    }

    /// The first offset after `offset` where a valid block starts, or nil.
    func resync(after offset: UInt64) throws -> UInt64? {
        let window = 1 << 20
        var pos = offset + 1
        let magic = withUnsafeBytes(of: Layout.blockMagic.littleEndian) { Array($0) }
        while pos + UInt64(Layout.blockHeaderBytes) <= source.size {
            let bytes = try source.read(at: pos, count: window + 3)
            if bytes.count < 4 { break }
            for i in 0..<(bytes.count - 3)
            where bytes[i] == magic[0] && bytes[i + 1] == magic[1] && bytes[i + 2] == magic[2] && bytes[i + 3] == magic[3] {
                let candidate = pos + UInt64(i)
                if (try? readBlock(at: candidate)) != nil { return candidate }
            }
            pos += UInt64(window)
        }
        return nil
    }
}
