import SegmentFormat
import Testing
import WeftCore
import WeftTesting

// Helpers shared by the SegmentFormat tests: seeded random data, records, and ready-made blocks,
// segments and index files.

extension SeededRNG {
    mutating func int(_ r: ClosedRange<Int>) -> Int { Int.random(in: r, using: &self) }
    mutating func int(_ r: Range<Int>) -> Int { Int.random(in: r, using: &self) }
    /// True one time in `n`.
    mutating func oneIn(_ n: Int) -> Bool { int(0..<n) == 0 }
    mutating func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8.random(in: 0...255, using: &self) } }
}

let chatWords: [String] = [
    "hey", "are", "you", "coming", "to", "dinner", "tonight", "?", "lol", "see", "you", "at", "the", "station",
    "ok", "thanks", "!", "running", "late", "sorry", "🙂", "meeting", "moved", "to", "3pm", "can", "you", "send",
    "the", "photos", "from", "yesterday", "happy", "birthday", "🎉", "where", "are", "we", "going",
]

/// Chat-like text of about `count` bytes: compresses well.
func chatText(_ rng: inout SeededRNG, bytes count: Int) -> [UInt8] {
    var out = [UInt8]()
    while out.count < count {
        if !out.isEmpty { out.append(0x20) }
        out += Array(chatWords[rng.int(0..<chatWords.count)].utf8)
    }
    return Array(out.prefix(count))
}

/// Records with consecutive indexes from `firstIndex`: random payload sizes (including empty), types,
/// streams (including `.none`), terms and timestamps.
func randomRecords(count: Int, firstIndex: LogIndex, rng: inout SeededRNG, maxPayload: Int = 300) -> [Record] {
    (0..<count).map { k in
        let size = rng.oneIn(5) ? 0 : rng.int(0...maxPayload)
        let payload = rng.oneIn(2) ? chatText(&rng, bytes: size) : rng.bytes(size)
        let stream = rng.oneIn(8) ? StreamID.none : StreamID(UInt64(rng.int(1...1_000_000)))
        return Record(
            index: firstIndex + UInt64(k), term: UInt64(rng.int(0...1_000)), stream: stream,
            seq: stream == .none ? 0 : UInt64(rng.int(1...Int(Int32.max))),
            type: RecordType(UInt16(rng.int(0...Int(UInt16.max)))),
            timestampMicros: Int64.random(in: Int64.min...Int64.max, using: &rng), payload: payload)
    }
}

func encodeBlock(_ records: [Record], compress: Bool = true) -> [UInt8] {
    var out = [UInt8]()
    BlockCodec.encode(records[...], compress: compress, into: &out)
    return out
}

func flippingBit(_ bytes: [UInt8], _ bit: Int) -> [UInt8] {
    var b = bytes
    b[bit / 8] ^= UInt8(1) << UInt8(bit % 8)
    return b
}

/// The kind of `FormatError` the body throws; nil if it returns or throws something else.
func formatErrorKind(_ body: () throws -> Void) -> FormatError.Kind? {
    do {
        try body()
        return nil
    } catch let e as FormatError {
        return e.kind
    } catch {
        return nil
    }
}

/// A segment built in memory: header then blocks, with the index builder fed as the store feeds it.
struct BuiltSegment {
    var bytes: [UInt8]
    var offsets: [UInt64] = []
    var blockRecords: [[Record]] = []
    var builder = SegmentIndexBuilder()
    var shard: ShardID
    var baseIndex: LogIndex

    /// `blocks` blocks of 1...`perBlock` records over `streams` streams with dense seqs per stream.
    init(rng: inout SeededRNG, blocks: Int, perBlock: Int, streams: Int, shard: ShardID = ShardID(3), baseIndex: LogIndex = 1) throws {
        self.shard = shard
        self.baseIndex = baseIndex
        bytes = SegmentHeader(shard: shard, baseIndex: baseIndex).encode()
        var index = baseIndex
        var seqs: [StreamID: StreamSeq] = [:]
        for _ in 0..<blocks {
            let n = rng.int(1...perBlock)
            var records = [Record]()
            for _ in 0..<n {
                let stream = rng.oneIn(10) ? StreamID.none : StreamID(UInt64(rng.int(1...streams)))
                var seq: StreamSeq = 0
                if stream != .none {
                    seq = (seqs[stream] ?? UInt64(rng.int(0...50))) + 1
                    seqs[stream] = seq
                }
                records.append(
                    Record(
                        index: index, term: 2, stream: stream, seq: seq, type: stream == .none ? .noop : .data,
                        timestampMicros: 1_700_000_000_000_000 + Int64(index), payload: chatText(&rng, bytes: rng.int(0...120))))
                index += 1
            }
            let offset = UInt64(bytes.count)
            BlockCodec.encode(records[...], into: &bytes)
            let header = try BlockHeader.decode(Array(bytes[Int(offset)...]), offset: offset)
            builder.add(offset: offset, header: header, records: records)
            offsets.append(offset)
            blockRecords.append(records)
        }
    }

    var records: [Record] { blockRecords.flatMap { $0 } }
    var indexBytes: [UInt8] { builder.encode(shard: shard, baseIndex: baseIndex, segmentBytes: UInt64(bytes.count)) }

    /// Byte range of block `k` in `bytes`.
    func range(ofBlock k: Int) -> Range<Int> {
        Int(offsets[k])..<(k + 1 < offsets.count ? Int(offsets[k + 1]) : bytes.count)
    }
}

/// The runs each stream should have, computed the slow way: one run per (stream, block) pair.
func expectedRuns(_ seg: BuiltSegment) -> [StreamID: [StreamRun]] {
    var out: [StreamID: [StreamRun]] = [:]
    for (ordinal, records) in seg.blockRecords.enumerated() {
        for r in records where r.stream != .none {
            if var runs = out[r.stream], runs[runs.count - 1].block == UInt32(ordinal) {
                runs[runs.count - 1].count += 1
                out[r.stream] = runs
            } else {
                out[r.stream, default: []].append(StreamRun(firstSeq: r.seq, count: 1, block: UInt32(ordinal)))
            }
        }
    }
    return out
}

/// Everything a scanner reports, as values that compare easily.
enum Scanned: Equatable {
    case block(offset: UInt64, firstIndex: LogIndex, count: UInt32)
    case damaged(offset: UInt64, kind: FormatError.Kind, resumeAt: UInt64?)
}

func scanAll(_ bytes: [UInt8], stepsMax: Int = 100_000) throws -> [Scanned] {
    var scanner = try SegmentScanner(MemoryByteSource(bytes: bytes))
    var out = [Scanned]()
    while let item = try scanner.next() {
        switch item {
        case .block(let b): out.append(.block(offset: b.offset, firstIndex: b.header.firstIndex, count: b.header.count))
        case .damaged(let e, let resume): out.append(.damaged(offset: e.offset, kind: e.kind, resumeAt: resume))
        }
        if out.count > stepsMax {
            Issue.record("scanner does not make progress")
            break
        }
    }
    return out
}
