import ShardState
import Testing
import WeftCore

@Suite struct RequestWindowTests {
    func key(_ k: [UInt8], count: Int, index: UInt64, term: UInt64) -> Record {
        Record(index: index, term: term, stream: .none, seq: 0, type: .requestKey, timestampMicros: 0, payload: RequestWindow.keyPayload(k, count: count))
    }
    func data(_ index: UInt64, term: UInt64, seq: UInt64) -> Record {
        Record(index: index, term: term, stream: StreamID(1), seq: seq, type: .data, timestampMicros: 0, payload: [1])
    }
    func noop(_ index: UInt64, term: UInt64) -> Record {
        Record(index: index, term: term, stream: .none, seq: 0, type: .noop, timestampMicros: 0, payload: [])
    }

    @Test func aCompleteRequestIsKeptWithItsRecordsAndOutcomes() throws {
        var w = RequestWindow()
        w.apply(key([7], count: 2, index: 10, term: 3), outcome: .ok)
        #expect(w.openRequest?.keyIndex == 10)
        w.apply(data(11, term: 3, seq: 5), outcome: .accepted([1]))
        w.apply(data(12, term: 3, seq: 6), outcome: .rejected(code: "conflict", message: "no"))
        let e = try #require(w.lookup([7]))
        #expect(e.complete && e.keyIndex == 10)
        #expect(e.landed.map(\.index) == [11, 12] && e.landed.map(\.seq) == [5, 6])
        #expect(e.landed[1].outcome == .rejected(code: "conflict", message: "no"))
        #expect(w.openRequest == nil)
        // Round trip.
        #expect(try RequestWindow(encoded: w.encode()) == w)
    }

    @Test func aRequestCutShortByANewTermIsPartialOrForgotten() throws {
        var w = RequestWindow()
        // Two of three records committed, then a new leader's no-op.
        w.apply(key([1], count: 3, index: 1, term: 1), outcome: .ok)
        w.apply(data(2, term: 1, seq: 1), outcome: .ok)
        w.apply(data(3, term: 1, seq: 2), outcome: .ok)
        w.apply(noop(4, term: 2), outcome: .ok)
        let p = try #require(w.lookup([1]))
        #expect(!p.complete && p.landed.count == 2 && p.count == 3)
        // Only the key record committed: nothing was written, the key is forgotten.
        w.apply(key([2], count: 1, index: 5, term: 2), outcome: .ok)
        w.apply(noop(6, term: 3), outcome: .ok)
        #expect(w.lookup([2]) == nil)
        // A key record right after another one's records that are still missing cuts the first short.
        w.apply(key([3], count: 2, index: 7, term: 3), outcome: .ok)
        w.apply(data(8, term: 3, seq: 3), outcome: .ok)
        w.apply(key([4], count: 1, index: 9, term: 3), outcome: .ok)
        w.apply(data(10, term: 3, seq: 4), outcome: .ok)
        #expect(w.lookup([3])?.landed.count == 1 && w.lookup([3])?.complete == false)
        #expect(w.lookup([4])?.complete == true)
    }

    @Test func theOldestKeysGoFirstAndAnOpenRequestSurvivesASnapshot() throws {
        var w = RequestWindow()
        w.countMax = 3
        var i: UInt64 = 1
        for k in 0..<5 as Range<UInt8> {
            w.apply(key([k], count: 1, index: i, term: 1), outcome: .ok)
            w.apply(data(i + 1, term: 1, seq: UInt64(k) + 1), outcome: .ok)
            i += 2
        }
        #expect(w.count == 3)
        #expect(w.lookup([0]) == nil && w.lookup([1]) == nil && w.lookup([2]) != nil && w.lookup([4]) != nil)
        w.apply(key([9], count: 2, index: i, term: 1), outcome: .ok)
        w.apply(data(i + 1, term: 1, seq: 6), outcome: .ok)
        var back = try RequestWindow(encoded: w.encode())
        #expect(back == w)
        back.apply(data(i + 2, term: 1, seq: 7), outcome: .ok)
        #expect(back.lookup([9])?.complete == true)
        for cut in [0, 5, w.encode().count - 1] {
            #expect(throws: StateDecodeError.self) { try RequestWindow(encoded: Array(w.encode().prefix(cut))) }
        }
        #expect(RequestWindow.parseKey([0, 0, 0, 0, 0]) == nil)
        #expect(RequestWindow.parseKey(Array(repeating: 1, count: 70)) == nil)
    }

    @Test func theWindowIsBoundedByBytesToo() {
        var w = RequestWindow()
        w.bytesMax = 10_000
        for k in 0..<200 as Range<UInt64> {
            w.apply(key(Array("key-\(k)".utf8), count: 1, index: 2 * k + 1, term: 1), outcome: .ok)
            w.apply(data(2 * k + 2, term: 1, seq: k + 1), outcome: .accepted(Array(repeating: 7, count: 100)))
        }
        #expect(w.bytes <= 10_000)
        #expect(w.count < 200 && w.count > 10)
        #expect(w.lookup(Array("key-199".utf8)) != nil && w.lookup(Array("key-0".utf8)) == nil)
    }
}
