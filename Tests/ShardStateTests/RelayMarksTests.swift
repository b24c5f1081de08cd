import ShardState
import Testing
import WeftCore

@Suite struct RelayMarksTests {
    func header(_ source: UInt64, _ first: UInt64, _ last: UInt64, _ idx: [UInt64], at index: UInt64, term: UInt64) -> Record {
        Record(
            index: index, term: term, stream: .none, seq: 0, type: .relayBatch, timestampMicros: 0,
            payload: RelayMarks.Header(source: ShardID(source), first: first, last: last, sourceIndexes: idx).encode())
    }
    func derived(_ index: UInt64, term: UInt64) -> Record {
        Record(index: index, term: term, stream: StreamID(3), seq: index, type: .data, timestampMicros: 0, payload: [1])
    }

    @Test func aCompleteBatchMovesTheMarkToItsLastSourceIndex() throws {
        var m = RelayMarks()
        m.apply(header(7, 10, 20, [12, 15], at: 1, term: 1))
        #expect(m.openBatch?.last == 20)
        m.apply(derived(2, term: 1))
        #expect(m.mark(of: ShardID(7)) == 12)
        m.apply(derived(3, term: 1))
        #expect(m.mark(of: ShardID(7)) == 20, "source records 16...20 derived nothing here: done")
        #expect(m.openBatch == nil)
        // A batch with no records (a range that derived nothing) moves the mark at once.
        m.apply(header(7, 21, 30, [], at: 4, term: 1))
        #expect(m.mark(of: ShardID(7)) == 30)
        #expect(try RelayMarks(encoded: m.encode()) == m)
    }

    @Test func aBatchCutShortMovesTheMarkOnlyPastWholeSourceRecords() throws {
        var m = RelayMarks()
        // Source record 11 derived two records here; only the first landed before a new term's entry.
        m.apply(header(2, 10, 12, [10, 11, 11, 12], at: 1, term: 1))
        m.apply(derived(2, term: 1))
        #expect(m.mark(of: ShardID(2)) == 10)
        m.apply(derived(3, term: 1))
        #expect(m.mark(of: ShardID(2)) == 10, "one of 11's two records: 11 is not done")
        let snapshotMid = try RelayMarks(encoded: m.encode())
        #expect(snapshotMid == m)
        m.apply(Record(index: 4, term: 2, stream: .none, seq: 0, type: .noop, timestampMicros: 0, payload: []))
        #expect(m.mark(of: ShardID(2)) == 10 && m.openBatch == nil)
        // Malformed headers are ignored: indexes outside the range, decreasing, or a bad length.
        #expect(RelayMarks.Header.decode(RelayMarks.Header(source: ShardID(1), first: 5, last: 6, sourceIndexes: [7]).encode()) == nil)
        #expect(RelayMarks.Header.decode(RelayMarks.Header(source: ShardID(1), first: 5, last: 9, sourceIndexes: [8, 6]).encode()) == nil)
        #expect(RelayMarks.Header.decode(Array(RelayMarks.Header(source: ShardID(1), first: 5, last: 9, sourceIndexes: [8]).encode().dropLast())) == nil)
        #expect(throws: StateDecodeError.self) { try RelayMarks(encoded: Array(m.encode().dropLast())) }
    }
}
