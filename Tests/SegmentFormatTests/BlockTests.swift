import SegmentFormat
import Testing
import WeftCore
import WeftTesting

@Suite struct BlockTests {
    @Test(arguments: 0..<40)
    func roundTrip(seed: Int) throws {
        var rng = SeededRNG(seed: UInt64(seed))
        for _ in 0..<10 {
            let first = rng.oneIn(4) ? UInt64(rng.int(1...3)) : rng.next() >> 2
            let records = randomRecords(count: rng.int(1...40), firstIndex: first, rng: &rng)
            let compress = !rng.oneIn(4)
            let block = encodeBlock(records, compress: compress)
            let (h, decoded) = try BlockCodec.decode(block, offset: 0)
            #expect(decoded == records, "seed \(seed)")
            #expect(h.count == UInt32(records.count))
            #expect(h.firstIndex == first)
            #expect(h.lastIndex == first + UInt64(records.count) - 1)
            let rawBytes = records.map(RecordCodec.encodedBytes).reduce(0, +)
            #expect(Int(h.rawBytes) == rawBytes)
            #expect(h.totalBytes == block.count)
            if !compress { #expect(h.codec == Codec.raw) }
            if h.codec == .lz4 { #expect(h.storedBytes < h.rawBytes) } else { #expect(h.storedBytes == h.rawBytes) }

            // Encoding appends: a block after other bytes decodes the same from its offset.
            var out = rng.bytes(rng.int(1...100))
            let prefix = out.count
            BlockCodec.encode(records[...], compress: compress, into: &out)
            #expect(Array(out[prefix...]) == block)
            #expect(try BlockCodec.decode(Array(out[prefix...]), offset: UInt64(prefix)).1 == records)
        }
    }

    @Test func chatTextIsCompressed() throws {
        var rng = SeededRNG(seed: 21)
        var records = [Record]()
        for i in 0..<30 {
            let stream = StreamID(UInt64(i % 4 + 1))
            let payload = chatText(&rng, bytes: rng.int(60...200))
            let stamp: Int64 = 1_700_000_000_000_000 + Int64(i) * 1000
            records.append(
                Record(index: 100 + UInt64(i), term: 3, stream: stream, seq: UInt64(i / 4 + 1), timestampMicros: stamp, payload: payload))
        }
        let block = encodeBlock(records)
        let (h, decoded) = try BlockCodec.decode(block, offset: 0)
        #expect(h.codec == Codec.lz4)
        #expect(h.storedBytes < h.rawBytes)
        #expect(block.count < Layout.blockHeaderBytes + Int(h.rawBytes))
        #expect(decoded == records)

        // compress: false stores the same records raw.
        let raw = encodeBlock(records, compress: false)
        let (rh, rdecoded) = try BlockCodec.decode(raw, offset: 0)
        #expect(rh.codec == Codec.raw)
        #expect(rh.storedBytes == rh.rawBytes)
        #expect(rh.rawBytes == h.rawBytes)
        #expect(rdecoded == records)
    }

    @Test func incompressibleBytesStayRaw() throws {
        var rng = SeededRNG(seed: 22)
        for _ in 0..<20 {
            // Random header fields too: small numbers leave runs of zero bytes that LZ4 would shave off.
            let records = (0..<rng.int(1...5)).map { k in
                Record(
                    index: 1 + UInt64(k), term: rng.next(), stream: StreamID(rng.next()), seq: rng.next(),
                    type: RecordType(UInt16.random(in: 1...UInt16.max, using: &rng)),
                    timestampMicros: Int64.random(in: Int64.min...Int64.max, using: &rng), payload: rng.bytes(rng.int(300...800)))
            }
            let block = encodeBlock(records)
            let (h, decoded) = try BlockCodec.decode(block, offset: 0)
            #expect(h.codec == Codec.raw)
            #expect(h.storedBytes == h.rawBytes)
            #expect(decoded == records)
        }
    }

    /// Blocks of every shape the flip and truncation tests walk over.
    static func sampleBlocks() -> [(String, [UInt8])] {
        var rng = SeededRNG(seed: 23)
        let chat = (0..<8).map { i in
            Record(index: 50 + UInt64(i), term: 1, stream: StreamID(7), seq: UInt64(i + 1), timestampMicros: 9, payload: chatText(&rng, bytes: 60))
        }
        var noise = randomRecords(count: 3, firstIndex: 5, rng: &rng)
        for i in noise.indices { noise[i].payload = rng.bytes(40) }
        let empty = [Record(index: 1, term: 0, stream: .none, seq: 0, type: .noop, timestampMicros: 0, payload: [])]
        return [("lz4", encodeBlock(chat)), ("raw", encodeBlock(noise)), ("empty payload", encodeBlock(empty, compress: false))]
    }

    @Test func everySingleBitFlipIsDetected() throws {
        for (name, block) in Self.sampleBlocks() {
            _ = try BlockCodec.decode(block, offset: 0)  // the unflipped block is fine
            var undetected = [Int]()
            for bit in 0..<(block.count * 8) {
                if (try? BlockCodec.decode(flippingBit(block, bit), offset: 0)) != nil { undetected.append(bit) }
            }
            #expect(undetected.isEmpty, "\(name) block (\(block.count) bytes): flips of bits \(undetected.prefix(10)) decoded")
        }
        // Which check fires depends on the field; a few are pinned.
        let (_, block) = Self.sampleBlocks()[1]
        #expect(formatErrorKind { _ = try BlockCodec.decode(flippingBit(block, 0), offset: 0) } == .badMagic)
        #expect(formatErrorKind { _ = try BlockCodec.decode(flippingBit(block, 4 * 8 + 1), offset: 0) } == .badCodec)
        #expect(formatErrorKind { _ = try BlockCodec.decode(flippingBit(block, 28 * 8), offset: 0) } == .checksumMismatch)
        #expect(formatErrorKind { _ = try BlockCodec.decode(flippingBit(block, block.count * 8 - 1), offset: 0) } == .checksumMismatch)
    }

    @Test func everyTruncationIsDetected() throws {
        for (name, block) in Self.sampleBlocks() {
            var undetected = [Int]()
            for length in 0..<block.count where (try? BlockCodec.decode(Array(block.prefix(length)), offset: 0)) != nil {
                undetected.append(length)
            }
            #expect(undetected.isEmpty, "\(name) block cut to \(undetected.prefix(10)) bytes decoded")
            #expect(formatErrorKind { _ = try BlockCodec.decode(Array(block.prefix(block.count - 1)), offset: 0) } == .truncated)
            #expect(formatErrorKind { _ = try BlockCodec.decode(Array(block.prefix(31)), offset: 0) } == .truncated)
        }
    }

    @Test func errorsNameFileAndOffset() {
        let (_, block) = Self.sampleBlocks()[0]
        do {
            _ = try BlockCodec.decode(flippingBit(block, block.count * 8 - 3), file: "x.seg", offset: 4096)
            Issue.record("decoded a damaged block")
        } catch let e as FormatError {
            #expect(e.file == "x.seg")
            #expect(e.offset == 4096)
            #expect(e.kind == .checksumMismatch)
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    /// A block whose checksum is right but whose records do not fill the payload exactly is malformed.
    @Test func recordLayoutIsChecked() {
        func sealed(_ bytes: [UInt8]) -> [UInt8] {
            var b = bytes
            let crc = b.withUnsafeBytes {
                BlockCodec.computeCRC(header: $0, payload: UnsafeRawBufferPointer(rebasing: $0[Layout.blockHeaderBytes...]))
            }
            b.storeLE(crc, at: 28)
            return b
        }
        let records = [
            Record(index: 1, term: 1, stream: StreamID(1), seq: 1, timestampMicros: 0, payload: [1, 2, 3]),
            Record(index: 2, term: 1, stream: StreamID(1), seq: 2, timestampMicros: 0, payload: [4]),
        ]
        let good = encodeBlock(records, compress: false)
        // Claims three records.
        var b = good
        b.storeLE(UInt32(3), at: 8)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badRecord)
        // Claims one record: the second becomes trailing bytes.
        b = good
        b.storeLE(UInt32(1), at: 8)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badRecord)
        // First record's payload length runs past the end.
        b = good
        b.storeLE(UInt32(200), at: 32)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badRecord)
        // Zero records.
        b = good
        b.storeLE(UInt32(0), at: 8)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badRecord)
        // Raw codec with stored != raw.
        b = good
        b.storeLE(UInt32(b.loadLE(UInt32.self, at: 16) + 1), at: 16)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badRecord)
        // Unknown codec.
        b = good
        b[4] = 7
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badCodec)
        // Sizes beyond the limits.
        b = good
        b.storeLE(UInt32(Limits.blockRawBytesMax + 1), at: 16)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .limitExceeded)
        // First index 0, and a first index whose last index would overflow.
        b = good
        b.storeLE(UInt64(0), at: 20)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badRecord)
        b = good
        b.storeLE(UInt64.max, at: 20)
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .badRecord)
        // An lz4 block whose payload is not valid lz4.
        b = good
        b[4] = Codec.lz4.rawValue
        #expect(formatErrorKind { _ = try BlockCodec.decode(sealed(b), offset: 0) } == .decompressFailed)
        // Control: resealing the unmodified block changes nothing.
        #expect((try? BlockCodec.decode(sealed(good), offset: 0))?.1 == records)
    }
}
