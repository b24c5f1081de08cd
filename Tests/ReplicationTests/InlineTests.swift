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
    /// Records of streams 1 and 2 (two conversations: each its own order key) derive, for their own shard,
    /// one record of stream 7 naming the source's index and seq (a wrong guess of either by the leader
    /// shows as a second copy), two for payloads starting with "2"; their acceptance depends on stream 9
    /// (stream 1) or 10 (stream 2); a source with inline records is marked "!".
    struct Own: RelayRule {
        let shard: ShardID
        func derive(_ record: Record, source: ShardID) -> [(destination: ShardID, proposal: Proposal)] {
            guard record.type == .data, record.stream == StreamID(1) || record.stream == StreamID(2) else { return [] }
            let name = InlineTests.name(record)
            let one = Proposal(stream: StreamID(7), timestampMicros: record.timestampMicros, payload: Array("\(name)@\(record.index).\(record.seq)".utf8))
            guard name.hasPrefix("2") else { return [(shard, one)] }
            return [(shard, one), (shard, Proposal(stream: StreamID(7), timestampMicros: record.timestampMicros, payload: Array("\(name)@\(record.index)+".utf8)))]
        }
        func inlineDependencies(_ p: Proposal) -> [StreamID]? {
            guard p.type == .data else { return nil }
            return p.stream == StreamID(1) ? [StreamID(9)] : p.stream == StreamID(2) ? [StreamID(10)] : nil
        }
        func inlineOrderKey(_ p: Proposal) -> StreamID? { p.stream == StreamID(1) || p.stream == StreamID(2) ? p.stream : nil }
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

    /// The relay tests' outbox: batches wait there until the test hands them to a leader.
    typealias Outbox = RelayTests.Outbox

    func p(_ stream: UInt64, _ s: String) -> Proposal { Proposal(stream: StreamID(stream), payload: Array(s.utf8)) }
    func text(_ r: Record) -> String { String(decoding: r.payload, as: UTF8.self) }

    @Test func theLeaderWritesThemAfterTheirSourceOnlyWhenNothingPendingCanRefuseItOrPrecedesIt() throws {
        let c = try ReplicaCluster()
        try c.elect(NodeID(1))
        for id in c.ids { c.replica(id).inlineRule = Own(shard: ShardID(0)) }
        let leader = c.replica(NodeID(1))
        let out = Outbox()
        let relay = RelayRunner(
            source: ShardID(0), tail: leader.tail, destinations: [ShardID(0)], rule: Own(shard: ShardID(0)), batchSourceRecordsMax: 3,
            emptyRangeMax: 5, retryPause: .milliseconds(5)
        ) { _, h, ps, done in out.lock.withLock { out.queue.append((h, ps, done)) } }
        relay.start()
        defer { relay.stop() }
        func relayAll() throws {
            for _ in 0..<400 {
                for (h, ps, answer) in out.take() { leader.proposeRelayBatch(h, ps) { r in answer(r) } }
                try c.settle()
                try c.heartbeats(1)
                if relay.status().first?.lagRecords == 0 && out.lock.withLock({ out.queue.isEmpty }) { return }
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
        var answers: [String] = []
        func note(_ r: Result<[Applied], ReplicationError>) { if case .success(let a) = r { answers += a.map { text($0.record) } } }
        // This term's first: the lane has not passed the log's end as the term found it: to the relay.
        leader.proposeApplied([p(1, "m0")], done: note)
        try c.settle()
        try relayAll()
        // Now inline.
        leader.proposeApplied([p(1, "m1")], done: note)
        try c.settle()
        // A record of the dependency stream not applied yet: none for the next; and from then on none of
        // that conversation until the lane has written it; the other conversation goes on inline.
        leader.propose([p(9, "dep")]) { _ in }
        leader.proposeApplied([p(1, "m2")], done: note)
        leader.proposeApplied([p(2, "n1")], done: note)
        try c.settle()
        leader.proposeApplied([p(1, "m3")], done: note)
        try c.settle()
        leader.proposeGroup([([p(1, "2m4")], note), ([p(2, "2n2")], note), ([p(5, "other")], { _ in })])
        try c.settle()
        // Keyed: after the request's own record, outside its window.
        var keyed: [KeyedResult] = []
        leader.proposeKeyed(Array("k".utf8), [p(2, "n3")]) { if case .success(let k) = $0 { keyed.append(k) } }
        try c.settle()
        leader.proposeKeyed(Array("k".utf8), [p(2, "n3")]) { if case .success(let k) = $0 { keyed.append(k) } }
        try c.settle()
        // Two records in one request: none, and the conversation waits for the lane again.
        leader.proposeApplied([p(2, "n4"), p(2, "n5")], done: note)
        leader.proposeApplied([p(2, "n6")], done: note)
        try c.settle()
        try relayAll()
        // The lane wrote what it owed: inline again. A mark that came with a request is the leader's
        // to set: the pending dependency keeps this one to the relay, unmarked.
        leader.proposeApplied([p(1, "m5")], done: note)
        leader.proposeApplied([p(2, "n7")], done: note)
        try c.settle()
        leader.propose([p(10, "dep")]) { _ in }
        leader.proposeApplied([p(2, "!n8")], done: note)
        try c.settle()
        try relayAll()
        try c.heartbeats()

        // Each proposer got its own records only; marked are those written with their inline records.
        #expect(answers == ["m0", "!m1", "m2", "!n1", "m3", "2m4", "!2n2", "n4", "n5", "n6", "!m5", "!n7", "n8"])
        #expect(keyed.count == 2 && keyed.allSatisfy { $0.complete && $0.landed.count == 1 })
        #expect(keyed.map(\.replayed) == [false, true])
        let log = try c.log(NodeID(1))
        let sources = log.filter { ($0.stream == StreamID(1) || $0.stream == StreamID(2)) && $0.type == .data }
        #expect(sources.filter { Own(shard: ShardID(0)).hasInline($0) }.map(Self.name) == ["m1", "n1", "2n2", "n3", "m5", "n7"])
        // Marked sources are followed by exactly what the relay would derive.
        for (k, r) in log.enumerated() where Own(shard: ShardID(0)).hasInline(r) {
            let want = Own(shard: ShardID(0)).derive(r, source: ShardID(0)).map { String(decoding: $0.proposal.payload, as: UTF8.self) }
            #expect(log[(k + 1)...].prefix(want.count).map(text) == want, "after \(text(r))")
        }
        // The replicas agree.
        for id in c.ids { #expect(try c.log(id) == log) }
        // Each derived record once, and each conversation's in its sources' order.
        let derived = log.filter { $0.stream == StreamID(7) }.map(text)
        let want = sources.flatMap { Own(shard: ShardID(0)).derive($0, source: ShardID(0)).map { String(decoding: $0.proposal.payload, as: UTF8.self) } }
        #expect(derived.sorted() == want.sorted(), "each derived record once: \(derived)")
        for conversation in ["m", "n"] {
            let order = derived.filter { $0.hasPrefix(conversation) || $0.hasPrefix("2" + conversation) }.compactMap { d in
                d.split(separator: "@").last.flatMap { UInt64($0.prefix { $0.isNumber }) }
            }
            #expect(order == order.sorted(), "conversation \(conversation) in order: \(derived)")
        }
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
