import Foundation
import Raft
import ShardState
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Inline relay records (Docs/state.md): what a record derives for its own shard is written right after
/// it by the leader when nothing pending can change its acceptance, and the shard's own relay lane writes
/// only what it does not find there. Each derived record lands once either way.
@Suite struct InlineTests {
    /// Records of stream 1 derive, for their own shard, one record of stream 7 naming the source's index
    /// and seq (a wrong guess of either by the leader shows as a second copy), two for payloads starting
    /// with "2"; their acceptance depends on stream 9; a source with inline records is marked "!".
    struct Own: RelayRule {
        let shard: ShardID
        func derive(_ record: Record, source: ShardID) -> [(destination: ShardID, proposal: Proposal)] {
            guard record.type == .data, record.stream == StreamID(1) else { return [] }
            let name = InlineTests.name(record)
            let one = Proposal(stream: StreamID(7), timestampMicros: record.timestampMicros, payload: Array("\(name)@\(record.index).\(record.seq)".utf8))
            guard name.hasPrefix("2") else { return [(shard, one)] }
            return [(shard, one), (shard, Proposal(stream: StreamID(7), timestampMicros: record.timestampMicros, payload: Array("\(name)@\(record.index)+".utf8)))]
        }
        func inlineDependencies(_ p: Proposal) -> [StreamID]? { p.type == .data && p.stream == StreamID(1) ? [StreamID(9)] : nil }
        func marked(_ p: Proposal, inline: Bool) -> Proposal {
            var m = p
            let bare = p.payload.first == UInt8(ascii: "!") ? Array(p.payload.dropFirst()) : p.payload
            m.payload = inline ? Array("!".utf8) + bare : bare
            return m
        }
        func hasInline(_ r: Record) -> Bool { r.payload.first == UInt8(ascii: "!") }
    }

    /// A source's name, without the mark.
    static func name(_ r: Record) -> String {
        let t = String(decoding: r.payload, as: UTF8.self)
        return t.hasPrefix("!") ? String(t.dropFirst()) : t
    }

    final class Outbox: @unchecked Sendable {
        let lock = NSLock()
        var queue: [(RelayMarks.Header, [Proposal], @Sendable (Result<RelayResult, ReplicationError>) -> Void)] = []
        func take() -> [(RelayMarks.Header, [Proposal], @Sendable (Result<RelayResult, ReplicationError>) -> Void)] {
            lock.withLock {
                defer { queue = [] }
                return queue
            }
        }
    }

    func p(_ stream: UInt64, _ s: String) -> Proposal { Proposal(stream: StreamID(stream), payload: Array(s.utf8)) }
    func text(_ r: Record) -> String { String(decoding: r.payload, as: UTF8.self) }

    @Test func theLeaderWritesThemAfterTheirSourceOnlyWhenNothingPendingCanRefuseIt() throws {
        let c = try ReplicaCluster()
        try c.elect(NodeID(1))
        for id in c.ids { c.replica(id).inlineRule = Own(shard: ShardID(0)) }
        let leader = c.replica(NodeID(1))
        var answers: [[Applied]] = []
        // Alone: inline.
        leader.proposeApplied([p(1, "m0")]) { if case .success(let a) = $0 { answers.append(a) } }
        try c.settle()
        // A record of the dependency stream not applied yet: none for the next.
        leader.propose([p(9, "dep")]) { _ in }
        leader.proposeApplied([p(1, "m1")]) { if case .success(let a) = $0 { answers.append(a) } }
        try c.settle()
        // In one group: after a pending dependency, none; two sources, each with its own, two for "2…".
        leader.proposeGroup([
            ([p(9, "dep2")], { _ in }), ([p(1, "m2")], { if case .success(let a) = $0 { answers.append(a) } }),
        ])
        try c.settle()
        leader.proposeGroup([
            ([p(1, "m3")], { if case .success(let a) = $0 { answers.append(a) } }),
            ([p(1, "2m4")], { if case .success(let a) = $0 { answers.append(a) } }),
            ([p(5, "other")], { _ in }),
        ])
        try c.settle()
        // Keyed: after the request's own record, outside its window.
        var keyed: [KeyedResult] = []
        leader.proposeKeyed(Array("k".utf8), [p(1, "m5")]) { if case .success(let k) = $0 { keyed.append(k) } }
        try c.settle()
        leader.proposeKeyed(Array("k".utf8), [p(1, "m5")]) { if case .success(let k) = $0 { keyed.append(k) } }
        try c.settle()
        // A mark that came with a request is not the leader's: dropped, and the relay writes it.
        leader.proposeApplied([p(9, "dep3")]) { _ in }
        leader.proposeApplied([p(1, "!m8")]) { if case .success(let a) = $0 { answers.append(a) } }
        try c.settle()
        // Two records in one request: none.
        leader.proposeApplied([p(1, "m6"), p(1, "m7")]) { if case .success(let a) = $0 { answers.append(a) } }
        try c.settle()
        try c.heartbeats()

        // Each proposer got its own records only.
        #expect(answers.map { $0.map { text($0.record) } } == [["!m0"], ["m1"], ["m2"], ["!m3"], ["!2m4"], ["m8"], ["m6", "m7"]])
        #expect(keyed.count == 2 && keyed.allSatisfy { $0.complete && $0.landed.count == 1 })
        #expect(keyed.map(\.replayed) == [false, true])
        let log = try c.log(NodeID(1)).filter { $0.type == .data || $0.type == .requestKey }
        func after(_ name: String) -> [String] {
            guard let k = log.firstIndex(where: { $0.stream == StreamID(1) && Self.name($0) == name }) else { return ["missing"] }
            return log[(k + 1)...].prefix { $0.stream == StreamID(7) }.map(text)
        }
        let src = { (name: String) in log.first { $0.stream == StreamID(1) && Self.name($0) == name } }
        let m0 = try #require(src("m0"))
        #expect(after("m0") == ["m0@\(m0.index).\(m0.seq)"])
        #expect(after("m1") == [] && after("m2") == [] && after("m6") == [] && after("m7") == [] && after("m8") == [])
        let m3 = try #require(src("m3"))
        let m4 = try #require(src("2m4"))
        let m5 = try #require(src("m5"))
        #expect(after("m3") == ["m3@\(m3.index).\(m3.seq)"])
        #expect(after("2m4") == ["2m4@\(m4.index).\(m4.seq)", "2m4@\(m4.index)+"])
        #expect(after("m5") == ["m5@\(m5.index).\(m5.seq)"])
        // The replicas agree (they apply what the leader wrote).
        for id in c.ids { #expect(try c.log(id) == c.log(NodeID(1))) }

        // The shard's own relay lane writes the rest, and nothing twice.
        let out = Outbox()
        let relay = RelayRunner(
            source: ShardID(0), tail: leader.tail, destinations: [ShardID(0)], rule: Own(shard: ShardID(0)), batchSourceRecordsMax: 3,
            emptyRangeMax: 5, retryPause: .milliseconds(5)
        ) { _, h, ps, done in out.lock.withLock { out.queue.append((h, ps, done)) } }
        relay.start()
        defer { relay.stop() }
        for _ in 0..<400 {
            for (h, ps, answer) in out.take() { leader.proposeRelayBatch(h, ps) { r in answer(r) } }
            try c.settle()
            try c.heartbeats(1)
            if relay.status().first?.lagRecords == 0 { break }
            Thread.sleep(forTimeInterval: 0.01)
        }
        #expect(relay.status().first?.lagRecords == 0)
        let final = try c.log(NodeID(1))
        let derived = final.filter { $0.stream == StreamID(7) }.map(text)
        let sources = final.filter { $0.stream == StreamID(1) && $0.type == .data }
        let want = sources.flatMap { Own(shard: ShardID(0)).derive($0, source: ShardID(0)).map { String(decoding: $0.proposal.payload, as: UTF8.self) } }
        #expect(derived.sorted() == want.sorted(), "each derived record once: \(derived)")
        #expect(Set(derived).count == derived.count)
    }

    /// The lane on its own, step by step over a tail fed by hand.
    @Test func theLaneWaitsForWhatFollowsASourceThenTakesOnlyWhatIsNotThere() throws {
        let tail = ShardTail(shard: ShardID(0), directory: "/nonexistent-weft-inline-test")
        let out = Outbox()
        let relay = RelayRunner(source: ShardID(0), tail: tail, destinations: [ShardID(0)], rule: Own(shard: ShardID(0)), emptyRangeMax: 1000) {
            _, h, ps, done in out.lock.withLock { out.queue.append((h, ps, done)) }
        }
        func rec(_ i: LogIndex, _ stream: UInt64, _ s: String, seq: StreamSeq = 1) -> Record {
            Record(index: i, term: 1, stream: StreamID(stream), seq: seq, type: .data, timestampMicros: 1, payload: Array(s.utf8))
        }
        func sent() -> [String] {
            out.take().flatMap { h, ps, done in
                done(.success(.written(mark: h.last)))
                return ps.map { String(decoding: $0.payload, as: UTF8.self) }
            }
        }
        let lane = ShardID(0)
        // A marked source whose inline record is not committed yet: wait.
        tail.append([rec(1, 1, "!a")])
        #expect(!relay.step(lane))
        #expect(sent() == [])
        // What follows is not it (a leader change cut the append short): the lane writes it.
        tail.append([rec(2, 5, "x")])
        #expect(relay.step(lane))
        #expect(sent() == ["a@1.1"])
        // Followed by its inline record: nothing to write.
        tail.append([rec(3, 1, "!b", seq: 2), rec(4, 7, "b@3.2")])
        #expect(!relay.step(lane))
        #expect(sent() == [])
        // Two derived, the first written inline, then another record: the second only.
        tail.append([rec(5, 1, "!2c", seq: 3), rec(6, 7, "2c@5.3"), rec(7, 5, "y", seq: 2)])
        #expect(relay.step(lane))
        #expect(sent() == ["2c@5+"])
        // Not marked, last in the log: the lane writes it at once.
        tail.append([rec(8, 1, "d", seq: 4)])
        #expect(relay.step(lane))
        #expect(sent() == ["d@8.4"])
        // Marked, the first of two here and nothing after: wait; then another record: the rest.
        tail.append([rec(9, 1, "!2e", seq: 5), rec(10, 7, "2e@9.5")])
        #expect(!relay.step(lane))
        #expect(sent() == [])
        tail.append([rec(11, 5, "z", seq: 3)])
        #expect(relay.step(lane))
        #expect(sent() == ["2e@9+"])
        #expect(relay.status().first?.lagRecords == 0)
    }
}
