import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

// Helpers for the store tests: seeded workloads, a brute-force model of the log, and checks of a store
// against that model.

extension SeededRNG {
    mutating func int(_ r: ClosedRange<Int>) -> Int { Int.random(in: r, using: &self) }
    mutating func int(_ r: Range<Int>) -> Int { Int.random(in: r, using: &self) }
    /// True one time in `n`.
    mutating func oneIn(_ n: Int) -> Bool { int(0..<n) == 0 }
    mutating func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8.random(in: 0...255, using: &self) } }
}

let simDirectory = "/sim/shard0"

/// Small segments and blocks, so a few hundred records roll many segments.
let smallOptions = StoreOptions(shard: ShardID(7), segmentBytesMax: 8_192, blockBytesTarget: 512)

let chatWords: [String] = [
    "hey", "are", "you", "coming", "to", "dinner", "tonight", "?", "lol", "see", "you", "at", "the", "station",
    "ok", "thanks", "!", "running", "late", "sorry", "meeting", "moved", "to", "3pm", "send", "photos", "🙂",
]

func payload(_ rng: inout SeededRNG) -> [UInt8] {
    switch rng.int(0..<10) {
    case 0: return []
    case 1: return rng.bytes(rng.int(1...300))  // incompressible
    case 2: return Array(String(repeating: "long message ", count: rng.int(40...100)).utf8)  // bigger than a block
    default:
        var out = [UInt8]()
        let n = rng.int(5...160)
        while out.count < n { out += Array((chatWords[rng.int(0..<chatWords.count)] + " ").utf8) }
        return out
    }
}

/// What the log should hold: the records in index order, and what the store derives from them.
struct LogModel {
    var records: [Record] = []
    var lastIndex: LogIndex = 0
    var lastTerm: Term = 0
    /// Last seq of every stream that has records, or had records that retention dropped (streams whose
    /// records were all removed by truncation are absent).
    var lastSeqs: [StreamID: StreamSeq] = [:]
    /// Last seq of every stream among the records retention dropped: the store keeps these (`streams.hwm`),
    /// so a stream continues after them even when none of its records is left.
    var droppedHighWater: [StreamID: StreamSeq] = [:]
    var streamCount = 50

    var firstIndex: LogIndex { records.first?.index ?? lastIndex + 1 }
    var streams: [StreamID] { lastSeqs.keys.sorted() }

    /// A valid next batch: dense indexes, terms that never go down, dense seqs per stream. A stream
    /// without records starts at a random seq (allowed: the log may begin mid-stream).
    func makeBatch(count: Int, rng: inout SeededRNG) -> [Record] {
        var seqs = lastSeqs
        var term = lastTerm == 0 ? 1 : lastTerm
        var batch = [Record]()
        for k in 0..<count {
            if rng.oneIn(25) { term += 1 }
            let index = lastIndex + 1 + UInt64(k)
            let stamp = 1_700_000_000_000_000 + Int64(index) * 1_000
            if rng.oneIn(12) {
                batch.append(Record(index: index, term: term, stream: .none, seq: 0, type: .noop, timestampMicros: stamp, payload: []))
                continue
            }
            let s = StreamID(UInt64(rng.int(1...streamCount)))
            let seq = (seqs[s] ?? (rng.oneIn(3) ? UInt64(rng.int(1...1_000)) : 0)) + 1
            seqs[s] = seq
            batch.append(Record(index: index, term: term, stream: s, seq: seq, timestampMicros: stamp, payload: payload(&rng)))
        }
        return batch
    }

    mutating func apply(_ batch: [Record]) {
        for r in batch {
            precondition(r.index == lastIndex + 1 || lastIndex == 0)
            records.append(r)
            lastIndex = r.index
            lastTerm = r.term
            if r.stream != .none { lastSeqs[r.stream] = r.seq }
        }
    }

    /// Removes records with index >= `index`, as `truncateSuffix` does.
    mutating func truncate(from index: LogIndex) {
        guard index <= lastIndex else { return }
        records.removeAll { $0.index >= index }
        lastIndex = index - 1
        lastTerm = records.last?.index == lastIndex ? records.last!.term : 0
        recomputeSeqs()
    }

    /// Forgets records below `first` (segments dropped by retention), keeping each stream's last seq
    /// among them: a stream whose records all went still continues from there.
    mutating func drop(below first: LogIndex) {
        for r in records where r.index < first && r.stream != .none {
            droppedHighWater[r.stream] = max(droppedHighWater[r.stream] ?? 0, r.seq)
        }
        records.removeAll { $0.index < first }
        recomputeSeqs()
    }

    /// Replaces the records with what a recovered store holds.
    mutating func reset(to records: [Record], lastIndex: LogIndex) {
        self.records = records
        self.lastIndex = lastIndex
        lastTerm = records.last?.term ?? 0
        recomputeSeqs()
    }

    mutating func recomputeSeqs() {
        lastSeqs = droppedHighWater
        for r in records where r.stream != .none { lastSeqs[r.stream] = max(lastSeqs[r.stream] ?? 0, r.seq) }
    }

    func read(from: LogIndex, to: LogIndex, limit: Int = .max) -> [Record] {
        Array(records.lazy.filter { $0.index >= from && $0.index <= to }.prefix(limit))
    }

    /// `.none` is no stream: records without one are not indexed and no stream read returns them.
    func stream(_ s: StreamID, fromSeq: StreamSeq, limit: Int) -> [Record] {
        guard s != .none else { return [] }
        return Array(records.lazy.filter { $0.stream == s && $0.seq >= fromSeq }.prefix(limit))
    }

    func backward(_ s: StreamID, beforeSeq: StreamSeq?, limit: Int) -> [Record] {
        guard s != .none else { return [] }
        return Array(records.reversed().lazy.filter { $0.stream == s && (beforeSeq == nil || $0.seq < beforeSeq!) }.prefix(limit))
    }

    func lastSeq(_ s: StreamID) -> StreamSeq { lastSeqs[s] ?? 0 }
}

/// Compares the store with the model. Every query that disagrees is recorded as an issue naming
/// `context` (the seed and step); returns false if any did.
@discardableResult
func check(
    _ store: SegmentStore, _ model: LogModel, _ context: String, rng: inout SeededRNG, queries: Int = 6, readAll: Bool = true,
    sourceLocation: SourceLocation = #_sourceLocation
) -> Bool {
    var ok = true
    func expect(_ cond: Bool, _ what: @autoclosure () -> String) {
        if !cond {
            ok = false
            Issue.record("\(context): \(what())", sourceLocation: sourceLocation)
        }
    }
    func attempt<T>(_ what: String, _ body: () throws -> T) -> T? {
        do { return try body() } catch {
            ok = false
            Issue.record("\(context): \(what) threw \(error)", sourceLocation: sourceLocation)
            return nil
        }
    }
    expect(store.lastIndex == model.lastIndex, "lastIndex \(store.lastIndex), model \(model.lastIndex)")
    expect(store.lastTerm == model.lastTerm, "lastTerm \(store.lastTerm), model \(model.lastTerm)")
    if !model.records.isEmpty {
        expect(store.firstIndex == model.firstIndex, "firstIndex \(store.firstIndex), model \(model.firstIndex)")
    }
    if readAll, let all = attempt("read all", { try store.read(from: model.firstIndex, to: .max) }) {
        expect(all == model.records, "read(from: \(model.firstIndex)) returned \(all.count) records, model has \(model.records.count)")
    }
    for s in 0...model.streamCount {
        let id = StreamID(UInt64(s))
        expect(store.lastSeq(of: id) == model.lastSeq(id), "lastSeq(\(id)) \(store.lastSeq(of: id)), model \(model.lastSeq(id))")
    }
    guard ok, !model.records.isEmpty else { return ok }
    for _ in 0..<queries {
        let id = StreamID(UInt64(rng.int(0...model.streamCount)))
        let top = model.lastSeq(id)
        let limit = rng.oneIn(3) ? Int.max : rng.int(1...40)
        let fromSeq = UInt64(rng.int(0...Int(top) + 2))
        if let got = attempt("readStream(\(id), fromSeq: \(fromSeq), limit: \(limit))", { try store.readStream(id, fromSeq: fromSeq, limit: limit) }) {
            let want = model.stream(id, fromSeq: fromSeq, limit: limit)
            expect(got == want, "readStream(\(id), fromSeq: \(fromSeq), limit: \(limit)): \(got.map(\.seq)), model \(want.map(\.seq))")
        }
        let before: StreamSeq? = rng.oneIn(4) ? nil : UInt64(rng.int(0...Int(top) + 2))
        if let got = attempt("readStreamBackward(\(id), beforeSeq: \(String(describing: before)), limit: \(limit))", {
            try store.readStreamBackward(id, beforeSeq: before, limit: limit)
        }) {
            let want = model.backward(id, beforeSeq: before, limit: limit)
            expect(
                got == want,
                "readStreamBackward(\(id), beforeSeq: \(String(describing: before)), limit: \(limit)): \(got.map(\.seq)), model \(want.map(\.seq))")
        }
        let from = UInt64(rng.int(Int(model.firstIndex)...Int(model.lastIndex)))
        let to = rng.oneIn(5) ? UInt64.max : UInt64(rng.int(Int(from)...Int(model.lastIndex) + 3))
        if let got = attempt("read(from: \(from), to: \(to), limit: \(limit))", { try store.read(from: from, to: to, limit: limit) }) {
            let want = model.read(from: from, to: to, limit: limit)
            expect(got == want, "read(from: \(from), to: \(to), limit: \(limit)): \(got.map(\.index)), model \(want.map(\.index))")
        }
    }
    return ok
}

/// Every stream read in full, both directions, and the whole log: for tests that damage files.
func checkFully(_ store: SegmentStore, _ model: LogModel, _ context: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    #expect(store.lastIndex == model.lastIndex, "\(context)", sourceLocation: sourceLocation)
    #expect(try store.read(from: model.firstIndex, to: .max) == model.records, "\(context)", sourceLocation: sourceLocation)
    for s in model.streams {
        #expect(try store.readStream(s, fromSeq: 0, limit: .max) == model.stream(s, fromSeq: 0, limit: .max), "\(context)", sourceLocation: sourceLocation)
        #expect(
            try store.readStreamBackward(s, limit: .max) == model.backward(s, beforeSeq: nil, limit: .max), "\(context)",
            sourceLocation: sourceLocation)
    }
}

/// Appends `batches` random batches of 1...`batchMax` records to a fresh store.
func filledStore(
    disk: any Disk, directory: String = simDirectory, options: StoreOptions = smallOptions, seed: UInt64, batches: Int,
    batchMax: Int = 12
) throws -> (SegmentStore, LogModel) {
    var rng = SeededRNG(seed: seed)
    let store = try SegmentStore(directory: directory, options: options, disk: disk)
    var model = LogModel()
    for _ in 0..<batches {
        let batch = model.makeBatch(count: rng.int(1...batchMax), rng: &rng)
        try store.append(batch)
        model.apply(batch)
    }
    return (store, model)
}

/// A segment file as found on disk, with its blocks.
struct SegmentFile {
    var base: LogIndex
    var name: String
    var bytes: [UInt8]
    var blocks: [ScannedBlock]
    var indexName: String { String(name.dropLast(4)) + ".idx" }
}

func readFile(_ disk: any Disk, _ path: String) throws -> [UInt8] {
    let f = try disk.open(path, create: false)
    defer { f.close() }
    return try f.read(at: 0, count: Int(try f.size()))
}

func writeFile(_ disk: any Disk, _ path: String, _ bytes: [UInt8]) throws {
    if let sim = disk as? SimulatedDisk {
        sim.setContents(path, bytes)
        return
    }
    let f = try disk.open(path, create: true)
    defer { f.close() }
    try f.truncate(to: 0)
    try f.write(bytes, at: 0)
}

/// The segment files in `directory`, in log order, each scanned into its blocks.
func segmentFiles(_ disk: any Disk, _ directory: String = simDirectory) throws -> [SegmentFile] {
    try disk.list(directory).filter { $0.hasSuffix(".seg") }.sorted().map { name in
        let bytes = try readFile(disk, directory + "/" + name)
        var scanner = try SegmentScanner(MemoryByteSource(name: name, bytes: bytes))
        var blocks = [ScannedBlock]()
        while true {
            let at = scanner.offset
            guard let item = try scanner.next() else { break }
            // An active segment may end in zeros written ahead of its data (`preallocateBytes`).
            if case .damaged(_, nil) = item, try scanner.isZero(from: at) { break }
            guard case .block(let b) = item else { throw StoreError.invalidBatch("unexpected damage in \(name): \(item)") }
            blocks.append(b)
            guard blocks.count <= bytes.count / Layout.blockHeaderBytes else { throw StoreError.invalidBatch("scanner stuck in \(name)") }
        }
        return SegmentFile(base: scanner.header.baseIndex, name: name, bytes: bytes, blocks: blocks)
    }
}

/// Every file in the directory and its bytes.
func snapshot(_ disk: any Disk, _ directory: String = simDirectory) throws -> [String: [UInt8]] {
    var out: [String: [UInt8]] = [:]
    for name in try disk.list(directory) { out[name] = try readFile(disk, directory + "/" + name) }
    return out
}

/// A fresh simulated disk holding exactly `files` in `directory`.
func simulatedDisk(with files: [String: [UInt8]], directory: String = simDirectory) throws -> SimulatedDisk {
    let disk = SimulatedDisk()
    try disk.makeDirectory(directory)
    for (name, bytes) in files { disk.setContents(directory + "/" + name, bytes) }
    try disk.syncDirectory(directory)
    return disk
}


/// The error a throwing call threw, as a `StoreError` (nil if it returned or threw something else).
func storeError(_ body: () throws -> Void) -> StoreError? {
    do {
        try body()
        return nil
    } catch let e as StoreError {
        return e
    } catch {
        return nil
    }
}

extension StoreError {
    var isCorrupt: Bool { if case .corrupt = self { true } else { false } }
    var isDisk: Bool { if case .disk = self { true } else { false } }
    var isFailed: Bool { if case .failed = self { true } else { false } }
    var isInvalidBatch: Bool { if case .invalidBatch = self { true } else { false } }
}

func flippingBit(_ bytes: [UInt8], _ bit: Int) -> [UInt8] {
    var b = bytes
    b[bit / 8] ^= UInt8(1) << UInt8(bit % 8)
    return b
}
