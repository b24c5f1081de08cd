import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@Suite struct RoundTripTests {
    /// Every way of reading, on a store of many rolled segments, before and after reopening.
    func checkReads(_ store: SegmentStore, _ model: LogModel, _ context: String) throws {
        try checkFully(store, model, context)
        // By index range, in windows that straddle blocks and segments.
        var from = model.firstIndex
        while from <= model.lastIndex {
            let to = from + 17
            #expect(try store.read(from: from, to: to) == model.read(from: from, to: to), "\(context) read \(from)...\(to)")
            #expect(try store.read(from: from, to: to, limit: 5) == model.read(from: from, to: to, limit: 5), "\(context)")
            from += 13
        }
        // By stream, in pages forward and backward.
        for s in model.streams {
            var cursor: StreamSeq = 0
            var forward = [Record]()
            while true {
                let page = try store.readStream(s, fromSeq: cursor, limit: 3)
                forward += page
                guard let last = page.last else { break }
                guard last.seq >= cursor, forward.count <= model.records.count else {
                    Issue.record("\(context): stream \(s) paging forward from \(cursor) does not advance")
                    break
                }
                cursor = last.seq + 1
            }
            #expect(forward == model.stream(s, fromSeq: 0, limit: .max), "\(context) stream \(s) paged forward")
            var before: StreamSeq? = nil
            var backward = [Record]()
            while true {
                let page = try store.readStreamBackward(s, beforeSeq: before, limit: 4)
                backward += page
                guard let last = page.last else { break }
                guard before.map({ last.seq < $0 }) ?? true, backward.count <= model.records.count else {
                    Issue.record("\(context): stream \(s) paging backward before \(String(describing: before)) does not advance")
                    break
                }
                before = last.seq
            }
            #expect(backward == model.backward(s, beforeSeq: nil, limit: .max), "\(context) stream \(s) paged backward")
        }
        #expect(try store.readStream(StreamID(999), fromSeq: 0, limit: 10).isEmpty)
        #expect(try store.readStreamBackward(StreamID(999), limit: 10).isEmpty)
        #expect(try store.read(from: model.lastIndex + 1, to: .max).isEmpty)
        for r in model.records.prefix(50) { #expect(try store.term(at: r.index) == r.term) }
    }

    @Test func simulatedDiskAcrossSegmentsAndReopen() throws {
        let disk = SimulatedDisk()
        var (store, model) = try filledStore(disk: disk, seed: 100, batches: 120)
        #expect(store.segmentCount > 5)
        #expect(store.damage.isEmpty)
        try checkReads(store, model, "before reopen")
        // Each sealed segment has an index file; the active one has none.
        let names = try disk.list(simDirectory)
        #expect(names.filter { $0.hasSuffix(".seg") }.count == store.segmentCount)
        #expect(names.filter { $0.hasSuffix(".idx") }.count == store.segmentCount - 1)

        let count = store.segmentCount
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(store.segmentCount == count)
        #expect(store.lastTerm == model.lastTerm)
        try checkReads(store, model, "after reopen")

        // Appending after the reopen continues the same log.
        var rng = SeededRNG(seed: 101)
        for _ in 0..<30 {
            let batch = model.makeBatch(count: rng.int(1...12), rng: &rng)
            try store.append(batch)
            model.apply(batch)
        }
        try checkReads(store, model, "after more appends")
        #expect(store.damage.isEmpty)
    }

    @Test func posixDiskAcrossSegmentsAndReopen() throws {
        let dir = try TempDirectory(prefix: "weft-store-test")
        defer { dir.remove() }
        let path = dir.path + "/shard"
        var (store, model) = try filledStore(disk: PosixDisk(), directory: path, seed: 102, batches: 80)
        #expect(store.segmentCount > 3)
        try checkReads(store, model, "posix before reopen")
        store.close()
        store = try SegmentStore(directory: path, options: smallOptions)
        try checkReads(store, model, "posix after reopen")
        var rng = SeededRNG(seed: 103)
        let batch = model.makeBatch(count: 5, rng: &rng)
        try store.append(batch)
        model.apply(batch)
        store.close()
        store = try SegmentStore(directory: path, options: smallOptions)
        try checkReads(store, model, "posix after second reopen")
        store.close()
    }

    @Test func emptyStore() throws {
        let disk = SimulatedDisk()
        var store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(store.lastIndex == 0)
        #expect(store.lastTerm == 0)
        #expect(store.firstIndex == 1)
        #expect(try store.read(from: 1, to: 100).isEmpty)
        #expect(try store.readStream(StreamID(1), fromSeq: 0, limit: 10).isEmpty)
        #expect(store.lastSeq(of: StreamID(1)) == 0)
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(store.lastIndex == 0)
    }

    /// A log may begin at any index (after a snapshot) and a stream at any seq.
    @Test func logStartingMidway() throws {
        let disk = SimulatedDisk()
        var store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        var model = LogModel()
        model.lastIndex = 999
        model.lastTerm = 4
        model.lastSeqs = [StreamID(3): 41]
        let opening = [Record(index: 1000, term: 4, stream: StreamID(3), seq: 42, timestampMicros: 0, payload: [9])]
        try store.append(opening)
        model.apply(opening)
        var rng = SeededRNG(seed: 104)
        for _ in 0..<20 {
            let batch = model.makeBatch(count: rng.int(1...10), rng: &rng)
            try store.append(batch)
            model.apply(batch)
        }
        #expect(store.firstIndex == 1000)
        let first3 = try store.readStream(StreamID(3), fromSeq: 0, limit: 1)
        #expect(first3.map(\.seq) == [42], "\(model.stream(StreamID(3), fromSeq: 0, limit: 1))")
        #expect(storeError { _ = try store.read(from: 999, to: 1000) } == .outOfRange(requested: 999, first: 1000, last: model.lastIndex))
        try checkReads(store, model, "midway")
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(store.firstIndex == 1000)
        try checkReads(store, model, "midway after reopen")
    }

    /// `compress: false` and the durability policies store the same log.
    @Test(arguments: [Durability.everyBatch, .everyBatches(3), .never])
    func optionsDoNotChangeContents(durability: Durability) throws {
        let disk = SimulatedDisk()
        let options = StoreOptions(shard: ShardID(7), segmentBytesMax: 4_096, blockBytesTarget: 512, durability: durability, compress: false)
        var (store, model) = try filledStore(disk: disk, options: options, seed: 105, batches: 40)
        try store.sync()
        store.close()
        store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        try checkReads(store, model, "\(durability)")
        for file in try segmentFiles(disk) {
            for b in file.blocks { #expect(b.header.codec == .raw) }
        }
    }

    /// The shard id is checked against the files.
    @Test func wrongShardIsRejected() throws {
        let disk = SimulatedDisk()
        let (store, _) = try filledStore(disk: disk, seed: 106, batches: 10)
        store.close()
        var other = smallOptions
        other.shard = ShardID(8)
        let e = storeError { _ = try SegmentStore(directory: simDirectory, options: other, disk: disk) }
        #expect(e?.isCorrupt == true, "\(String(describing: e))")
    }
}
