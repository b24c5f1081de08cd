import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@Suite struct ValidationTests {
    func record(_ index: LogIndex, term: Term, stream: UInt64, seq: StreamSeq, payload: [UInt8] = [1, 2, 3]) -> Record {
        Record(index: index, term: term, stream: StreamID(stream), seq: seq, timestampMicros: 0, payload: payload)
    }

    /// Each bad batch gets its own error, and changes nothing: not the files, not the positions, not reads;
    /// the store keeps accepting good batches.
    @Test func badBatchesAreRejectedAndChangeNothing() throws {
        let disk = SimulatedDisk()
        let (store, model) = try filledStore(disk: disk, seed: 200, batches: 30)
        #expect(store.segmentCount > 1)
        let l = model.lastIndex
        let t = model.lastTerm
        let s = try #require(model.streams.first)
        let q = model.lastSeq(s)
        let before = try snapshot(disk)

        let cases: [(String, [Record], StoreError)] = [
            ("gap", [record(l + 2, term: t, stream: s.rawValue, seq: q + 1)], .nonContiguous(expected: l + 1, got: l + 2)),
            ("overlap", [record(l, term: t, stream: s.rawValue, seq: q + 1)], .nonContiguous(expected: l + 1, got: l)),
            ("index 0", [record(0, term: t, stream: s.rawValue, seq: q + 1)], .nonContiguous(expected: l + 1, got: 0)),
            (
                "gap inside batch",
                [record(l + 1, term: t, stream: 900, seq: 1), record(l + 3, term: t, stream: 900, seq: 2)],
                .nonContiguous(expected: l + 2, got: l + 3)
            ),
            ("term below last", [record(l + 1, term: t - 1, stream: s.rawValue, seq: q + 1)], .termRegressed(index: l + 1, term: t - 1, previous: t)),
            (
                "term drops inside batch",
                [record(l + 1, term: t + 2, stream: 900, seq: 1), record(l + 2, term: t + 1, stream: 900, seq: 2)],
                .termRegressed(index: l + 2, term: t + 1, previous: t + 2)
            ),
            ("seq gap", [record(l + 1, term: t, stream: s.rawValue, seq: q + 2)], .streamSequence(stream: s, expected: q + 1, got: q + 2)),
            ("seq repeat", [record(l + 1, term: t, stream: s.rawValue, seq: q)], .streamSequence(stream: s, expected: q + 1, got: q)),
            (
                "seq repeat inside batch",
                [record(l + 1, term: t, stream: 900, seq: 5), record(l + 2, term: t, stream: 900, seq: 5)],
                .streamSequence(stream: StreamID(900), expected: 6, got: 5)
            ),
            ("new stream at seq 0", [record(l + 1, term: t, stream: 901, seq: 0)], .streamSequence(stream: StreamID(901), expected: 1, got: 0)),
            ("no stream with a seq", [record(l + 1, term: t, stream: 0, seq: 3)], .streamSequence(stream: .none, expected: 0, got: 3)),
        ]
        for (name, batch, want) in cases {
            #expect(storeError { try store.append(batch) } == want, "\(name)")
        }
        // Errors whose message is free text.
        let oversized = [record(l + 1, term: t, stream: s.rawValue, seq: q + 1, payload: [UInt8](repeating: 7, count: Limits.recordPayloadBytesMax + 1))]
        #expect(storeError { try store.append(oversized) }?.isInvalidBatch == true, "oversized payload")
        #expect(storeError { try store.append([]) }?.isInvalidBatch == true, "empty batch")
        let tooMany = (0...Limits.appendBatchCountMax).map { k in record(l + 1 + UInt64(k), term: t, stream: 0, seq: 0, payload: []) }
        #expect(storeError { try store.append(tooMany) }?.isInvalidBatch == true, "too many records")
        // A good record followed by a bad one: nothing of the batch is kept.
        let mixed = [record(l + 1, term: t, stream: s.rawValue, seq: q + 1), record(l + 2, term: t, stream: s.rawValue, seq: q + 3)]
        #expect(storeError { try store.append(mixed) } == .streamSequence(stream: s, expected: q + 2, got: q + 3))

        #expect(store.lastIndex == l)
        #expect(store.lastTerm == t)
        #expect(store.lastSeq(of: s) == q)
        #expect(store.lastSeq(of: StreamID(900)) == 0)
        #expect(try snapshot(disk) == before)
        try checkFully(store, model, "after rejected batches")

        // Not a failure of the store: a good batch is still accepted.
        var rng = SeededRNG(seed: 201)
        var m = model
        let good = m.makeBatch(count: 4, rng: &rng)
        try store.append(good)
        m.apply(good)
        try checkFully(store, m, "after a good batch")
    }

    @Test func firstBatchOfAnEmptyStore() throws {
        let store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: SimulatedDisk())
        #expect(storeError { try store.append([record(0, term: 1, stream: 1, seq: 1)]) } == .nonContiguous(expected: 1, got: 0))
        #expect(store.lastIndex == 0)
        try store.append([record(1, term: 1, stream: 1, seq: 1)])
        #expect(store.lastIndex == 1)
    }
}
