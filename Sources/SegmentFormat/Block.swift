import WeftCore

/// §2 of Docs/segment-format.md: the 32-byte header in front of every block.
public struct BlockHeader: Equatable, Sendable {
    public var codec: Codec
    public var count: UInt32
    public var storedBytes: UInt32
    public var rawBytes: UInt32
    public var firstIndex: LogIndex
    public var crc: UInt32

    public var lastIndex: LogIndex { firstIndex + UInt64(count) - 1 }
    /// Header plus stored payload: the block's length on disk.
    public var totalBytes: Int { Layout.blockHeaderBytes + Int(storedBytes) }

    /// Decodes the header fields and checks what can be checked without the payload: magic, codec and
    /// limits. The checksum needs the payload: see `BlockCodec.verify`.
    public static func decode(_ b: UnsafeRawBufferPointer, file: String = "", offset: UInt64) throws -> BlockHeader {
        guard b.count >= Layout.blockHeaderBytes else {
            throw FormatError(.truncated, file: file, offset: offset, "block header needs \(Layout.blockHeaderBytes) bytes, \(b.count) left")
        }
        let magic = b.loadLE(UInt32.self, at: 0)
        guard magic == Layout.blockMagic else {
            throw FormatError(.badMagic, file: file, offset: offset, "no block magic (found \(hex(magic)))")
        }
        guard let codec = Codec(rawValue: b[4]) else {
            throw FormatError(.badCodec, file: file, offset: offset + 4, "codec \(b[4])")
        }
        let h = BlockHeader(
            codec: codec, count: b.loadLE(at: 8), storedBytes: b.loadLE(at: 12), rawBytes: b.loadLE(at: 16),
            firstIndex: b.loadLE(at: 20), crc: b.loadLE(at: 28))
        guard h.count >= 1 else {
            throw FormatError(.badRecord, file: file, offset: offset + 8, "block holds no records")
        }
        guard Int(h.rawBytes) <= Limits.blockRawBytesMax, Int(h.storedBytes) <= Layout.blockStoredBytesMax else {
            throw FormatError(.limitExceeded, file: file, offset: offset + 12, "block claims \(h.storedBytes) stored / \(h.rawBytes) raw bytes")
        }
        guard Int(h.count) <= Int(h.rawBytes) / Layout.recordHeaderBytes else {
            throw FormatError(.badRecord, file: file, offset: offset + 8, "\(h.count) records cannot fit in \(h.rawBytes) raw bytes")
        }
        guard h.codec == .lz4 || h.storedBytes == h.rawBytes else {
            throw FormatError(.badRecord, file: file, offset: offset + 12, "raw block with stored \(h.storedBytes) != raw \(h.rawBytes)")
        }
        guard h.firstIndex >= 1, h.firstIndex <= UInt64.max - UInt64(h.count) else {
            throw FormatError(.badRecord, file: file, offset: offset + 20, "first index \(h.firstIndex)")
        }
        return h
    }

    public static func decode(_ bytes: [UInt8], file: String = "", offset: UInt64) throws -> BlockHeader {
        try bytes.withUnsafeBytes { try decode($0, file: file, offset: offset) }
    }
}

/// Encoding and decoding of whole blocks (§2, §3).
public enum BlockCodec {
    /// Appends one block holding `records` (which must have consecutive indexes) to `out`.
    /// Compresses with LZ4 and falls back to raw storage when compression does not shrink the payload.
    public static func encode(_ records: ArraySlice<Record>, compress: Bool = true, into out: inout [UInt8]) {
        precondition(!records.isEmpty)
        var raw = [UInt8]()
        raw.reserveCapacity(records.reduce(0) { $0 + Layout.recordHeaderBytes + $1.payload.count })
        var expected = records[records.startIndex].index
        for r in records {
            precondition(r.index == expected, "records of a block must have consecutive indexes")
            precondition(r.payload.count <= Limits.recordPayloadBytesMax)
            expected += 1
            RecordCodec.encode(r, into: &raw)
        }
        precondition(raw.count <= Limits.blockRawBytesMax)

        let start = out.count
        out.append(contentsOf: repeatElement(0, count: Layout.blockHeaderBytes))
        var codec = Codec.raw
        if compress {
            let bound = LZ4.compressBound(raw.count)
            // Only worth it when it saves something: cap the output at raw.count - 1.
            let capacity = min(bound, raw.count - 1)
            if capacity > 0 {
                out.reserveCapacity(out.count + bound)
                let payloadStart = out.count
                out.append(contentsOf: repeatElement(0, count: capacity))
                let n = raw.withUnsafeBytes { src in
                    out.withUnsafeMutableBytes { dst in
                        LZ4.compress(src, into: dst.baseAddress! + payloadStart, capacity: capacity)
                    }
                }
                if let n {
                    out.removeLast(capacity - n)
                    codec = .lz4
                } else {
                    out.removeLast(capacity)
                }
            }
        }
        if codec == .raw { out.append(contentsOf: raw) }
        let stored = out.count - start - Layout.blockHeaderBytes
        out.storeLE(Layout.blockMagic, at: start)
        out[start + 4] = codec.rawValue
        out.storeLE(UInt32(records.count), at: start + 8)
        out.storeLE(UInt32(stored), at: start + 12)
        out.storeLE(UInt32(raw.count), at: start + 16)
        out.storeLE(records[records.startIndex].index, at: start + 20)
        let crc = out.withUnsafeBytes { b in
            let head = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: b[start..<(start + 28)]))
            return CRC32C.checksum(
                UnsafeRawBufferPointer(rebasing: b[(start + Layout.blockHeaderBytes)...]), continuing: head)
        }
        out.storeLE(crc, at: start + 28)
    }

    /// The checksum a block with this header and stored payload should carry.
    public static func computeCRC(header: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer) -> UInt32 {
        let head = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[0..<28]))
        return CRC32C.checksum(payload, continuing: head)
    }

    /// Checks the block at the start of `block` (header + stored payload) and returns its header.
    public static func verify(_ block: UnsafeRawBufferPointer, file: String = "", offset: UInt64) throws -> BlockHeader {
        let h = try BlockHeader.decode(block, file: file, offset: offset)
        guard block.count >= h.totalBytes else {
            throw FormatError(
                .truncated, file: file, offset: offset,
                "block payload needs \(h.storedBytes) bytes, \(block.count - Layout.blockHeaderBytes) left")
        }
        let payload = UnsafeRawBufferPointer(rebasing: block[Layout.blockHeaderBytes..<h.totalBytes])
        let computed = computeCRC(header: block, payload: payload)
        guard computed == h.crc else {
            throw FormatError(.checksumMismatch, file: file, offset: offset, "block crc stored \(hex(h.crc)) computed \(hex(computed))")
        }
        return h
    }

    /// Verifies and decodes a block: its checksum, then its payload and every record in it.
    public static func decode(_ block: [UInt8], file: String = "", offset: UInt64) throws -> (BlockHeader, [Record]) {
        try block.withUnsafeBytes { b in
            let h = try verify(b, file: file, offset: offset)
            let raw = try rawPayload(
                h, stored: UnsafeRawBufferPointer(rebasing: b[Layout.blockHeaderBytes..<h.totalBytes]),
                file: file, offset: offset)
            let records = try raw.withUnsafeBytes {
                try RecordCodec.decodeAll($0, header: h, file: file, blockOffset: offset)
            }
            return (h, records)
        }
    }

    /// The uncompressed payload of a verified block.
    public static func rawPayload(
        _ h: BlockHeader, stored: UnsafeRawBufferPointer, file: String = "", offset: UInt64
    ) throws -> [UInt8] {
        switch h.codec {
        case .raw:
            return Array(stored)
        case .lz4:
            guard let raw = LZ4.decompress(stored, rawCount: Int(h.rawBytes)) else {
                throw FormatError(.decompressFailed, file: file, offset: offset + UInt64(Layout.blockHeaderBytes), "lz4 payload does not expand to \(h.rawBytes) bytes")
            }
            return raw
        }
    }
}

/// §3 of Docs/segment-format.md: records inside a block's raw payload.
public enum RecordCodec {
    public static func encode(_ r: Record, into raw: inout [UInt8]) {
        raw.appendLE(UInt32(r.payload.count))
        raw.appendLE(r.type.rawValue)
        raw.appendLE(UInt16(0))
        raw.appendLE(r.term)
        raw.appendLE(r.stream.rawValue)
        raw.appendLE(r.seq)
        raw.appendLE(r.timestampMicros)
        raw.append(contentsOf: r.payload)
    }

    /// Decodes exactly `header.count` records filling `raw` exactly; anything else is malformed.
    public static func decodeAll(
        _ raw: UnsafeRawBufferPointer, header: BlockHeader, file: String = "", blockOffset: UInt64
    ) throws -> [Record] {
        var records = [Record]()
        records.reserveCapacity(Int(header.count))
        var pos = 0
        var index = header.firstIndex
        // Offsets reported for record problems are offsets into the raw payload, named as such.
        func bad(_ why: String) -> FormatError {
            FormatError(.badRecord, file: file, offset: blockOffset, "record \(records.count) at raw offset \(pos): \(why)")
        }
        for _ in 0..<header.count {
            guard raw.count - pos >= Layout.recordHeaderBytes else { throw bad("header runs past payload end") }
            let len = Int(raw.loadLE(UInt32.self, at: pos))
            guard len <= Limits.recordPayloadBytesMax else { throw bad("payload length \(len) over limit") }
            guard raw.count - pos - Layout.recordHeaderBytes >= len else { throw bad("payload runs past block end") }
            let start = pos + Layout.recordHeaderBytes
            records.append(
                Record(
                    index: index, term: raw.loadLE(at: pos + 8), stream: StreamID(raw.loadLE(UInt64.self, at: pos + 16)),
                    seq: raw.loadLE(at: pos + 24), type: RecordType(raw.loadLE(UInt16.self, at: pos + 4)),
                    timestampMicros: raw.loadLE(at: pos + 32),
                    payload: Array(UnsafeRawBufferPointer(rebasing: raw[start..<(start + len)]))))
            pos = start + len
            index += 1
        }
        guard pos == raw.count else { throw bad("\(raw.count - pos) trailing bytes after last record") }
        return records
    }

    /// Size of a record once encoded.
    public static func encodedBytes(_ r: Record) -> Int { Layout.recordHeaderBytes + r.payload.count }
}
