import ShardState
import Testing
import WeftCore

func rec(_ index: UInt64, _ payload: [UInt8], type: RecordType = .data, at micros: Int64 = 0) -> Record {
    Record(index: index, term: 1, stream: StreamID(1), seq: index, type: type, timestampMicros: micros, payload: payload)
}

@Suite struct KeyValueMachineTests {
    @Test func putDeleteAndCasGiveTheirOutcomes() {
        var m = KeyValueMachine()
        let k = Array("k".utf8)
        let out = m.apply(
            [
                rec(1, KeyValueMachine.put(k, [1])),
                rec(2, KeyValueMachine.cas(k, expected: 9, [2])),
                rec(3, KeyValueMachine.cas(k, expected: 1, [3])),
                rec(4, KeyValueMachine.delete(Array("absent".utf8))),
                rec(5, [0xFF, 0, 0]),
                rec(6, [1, 200, 0, 1]),
                rec(7, [], type: .noop),
            ][...])
        #expect(out.count == 7)
        #expect(out[0] == .accepted([1, 0, 0, 0, 0, 0, 0, 0]))
        guard case .rejected(let code, _) = out[1] else { Issue.record("cas on a wrong version applied"); return }
        #expect(code == "conflict")
        #expect(out[2] == .accepted([3, 0, 0, 0, 0, 0, 0, 0]))
        if case .rejected(let c, _) = out[3] { #expect(c == "not_found") } else { Issue.record("delete of an absent key accepted") }
        if case .rejected(let c, _) = out[4] { #expect(c == "malformed") } else { Issue.record("unknown op accepted") }
        if case .rejected(let c, _) = out[5] { #expect(c == "malformed") } else { Issue.record("key past the end accepted") }
        #expect(out[6] == .ok)
        #expect(m[k] == KeyValueMachine.Entry(value: [3], version: 3))
        #expect(m.entries.count == 1)
    }

    @Test func aSnapshotRestoresTheSameStateAndBytes() throws {
        var m = KeyValueMachine()
        var rng = SystemRandomNumberGenerator()
        var records: [Record] = []
        for i in 1...2000 {
            let key = Array("key-\(UInt64.random(in: 0..<500, using: &rng))".utf8)
            let op = UInt8.random(in: 0..<3, using: &rng)
            records.append(rec(UInt64(i), op == 0 ? KeyValueMachine.delete(key) : KeyValueMachine.put(key, Array(repeating: op, count: i % 40)), at: Int64(i)))
        }
        _ = m.apply(records[...])
        let bytes = m.snapshot()
        let back = try KeyValueMachine(snapshot: bytes)
        #expect(back.stateHash == m.stateHash)
        #expect(back.snapshot() == bytes)
        #expect(back.entries.count == m.entries.count)
        #expect(back.clockMicros == 2000)
        // Equal states built in another order hash (and serialise) the same.
        var a = KeyValueMachine()
        var b = KeyValueMachine()
        _ = a.apply([rec(1, KeyValueMachine.put([1], [1])), rec(2, KeyValueMachine.put([2], [2]))][...])
        _ = b.apply([rec(1, KeyValueMachine.put([2], [9])), rec(2, KeyValueMachine.put([1], [1])), rec(3, KeyValueMachine.put([2], [2]))][...])
        #expect(a.stateHash != b.stateHash)  // versions differ: key [2] was written at 2 in a, at 3 in b
        var c = KeyValueMachine()
        _ = c.apply([rec(1, KeyValueMachine.put([2], [7])), rec(2, KeyValueMachine.put([1], [1]))][...])
        _ = c.apply([rec(3, KeyValueMachine.delete([2]))][...])
        _ = c.apply([rec(4, KeyValueMachine.put([2], [2]))][...])
        var d = KeyValueMachine()
        _ = d.apply([rec(2, KeyValueMachine.put([1], [1])), rec(4, KeyValueMachine.put([2], [2]))][...])
        #expect(c.stateHash == d.stateHash)
    }

    @Test func damagedSnapshotBytesAreRefusedNotMisread() {
        var m = KeyValueMachine()
        _ = m.apply([rec(1, KeyValueMachine.put([1, 2], [3, 4, 5]))][...])
        let bytes = m.snapshot()
        for cut in [0, 4, 15, bytes.count - 1] {
            #expect(throws: StateDecodeError.self) { try KeyValueMachine(snapshot: Array(bytes.prefix(cut))) }
        }
        #expect(throws: StateDecodeError.self) { try KeyValueMachine(snapshot: bytes + [0]) }
        #expect(throws: StateDecodeError.self) { try NoState(snapshot: [1]) }
    }

    @Test func aCopyIsUnchangedByLaterWritesAndCopiesOnlyTheBucketsWritten() {
        var m = BucketedMap<UInt64, UInt64>()
        for k in 0..<10_000 as Range<UInt64> { m[k] = k }
        let copy = m
        for k in 0..<100 as Range<UInt64> { m[k] = k + 1 }
        m[20_000] = 1
        m[5] = nil
        #expect(copy.count == 10_000)
        #expect(m.count == 10_000)
        for k in 0..<100 as Range<UInt64> { #expect(copy[k] == k) }
        #expect(copy[20_000] == nil && m[20_000] == 1 && m[5] == nil && copy[5] == 5)
        var sum: UInt64 = 0
        copy.forEach { _, v in sum &+= v }
        #expect(sum == (0..<10_000).reduce(0, +))
    }
}
