import ClusterConfig
import Foundation
import Messaging
import Testing
import WeftCore

@testable import WeftServer

/// Inbox records forwarded to a node without the user's home shard (Docs/delivery.md, "Sessions away
/// from the home shard"), and the bearer tokens a node has verified already.
@Suite struct ForwardedInboxTests {
    final class Got: @unchecked Sendable {
        let lock = NSLock()
        var seqs: [[StreamSeq]] = []
        func add(_ e: HubEvent) {
            if case .records(let rs) = e { lock.withLock { seqs.append(rs.map(\.seq)) } }
        }
        var all: [[StreamSeq]] { lock.withLock { seqs } }
    }

    static func inboxRecord(_ user: UInt64, _ seq: StreamSeq) -> Record {
        Record(
            index: seq, term: 1, stream: Ids.inbox(user), seq: seq, type: .messaging, timestampMicros: 1,
            payload: MessagingOp.inbox(user: user, .contactAccepted(peer: 99)).encode())
    }

    @Test func eachForwardedSeqReachesTheSessionsOnceAndOnlyTheirUsers() throws {
        let hub = InboxHub()
        defer { hub.stop() }
        let (alice, bob): (UInt64, UInt64) = (1_000_001, 1_000_002)
        let got = Got()
        let (id, _) = try #require(hub.register(user: alice) { got.add($0) })
        #expect(hub.remoteMark(alice) == nil, "no mark before the session is live or a record came")
        // The same records from three replicas, the second and third overlapping the first.
        hub.remote([Self.inboxRecord(alice, 1), Self.inboxRecord(alice, 2)])
        hub.remote([Self.inboxRecord(alice, 1), Self.inboxRecord(alice, 2), Self.inboxRecord(alice, 3)])
        hub.remote([Self.inboxRecord(alice, 2), Self.inboxRecord(alice, 3)])
        // Bob has no session here: nothing of his is handed on, and no mark kept for him.
        hub.remote([Self.inboxRecord(bob, 1)])
        #expect(got.all == [[1, 2], [3]])
        #expect(hub.remoteMark(alice) == 3)
        #expect(hub.remoteMark(bob) == nil)
        // The heads check: a head past the mark tells every session of the user and moves the mark; a
        // head at or below it tells no one. Alice had a mark (3): a loss, counted. Carol has sessions but
        // no mark yet (her sessions read their own catch-up): told, not counted.
        let carol: UInt64 = 1_000_003
        let carolGot = Got()
        _ = try #require(hub.register(user: carol) { e in if case .head(let h) = e { carolGot.lock.withLock { carolGot.seqs.append([h]) } } })
        let heads = Got()
        let (second, _) = try #require(hub.register(user: alice) { e in if case .head(let h) = e { heads.lock.withLock { heads.seqs.append([h]) } } })
        #expect(hub.headsReached([(alice, 7), (bob, 9), (carol, 2)]) == 1)
        #expect(heads.all == [[7]])
        #expect(carolGot.all == [[2]])
        #expect(hub.remoteMark(alice) == 7)
        #expect(hub.headsReached([(alice, 7), (alice, 5), (carol, 2)]) == 0)
        #expect(heads.all == [[7]])
        // Forwarded records at or below the mark are not handed on again; past it they are.
        hub.remote([Self.inboxRecord(alice, 6), Self.inboxRecord(alice, 8)])
        #expect(got.all.last == [8])
        // The last session gone, the mark goes too (a new session starts from its own read).
        #expect(!hub.unregister(user: alice, id: id))
        #expect(hub.unregister(user: alice, id: second))
        #expect(hub.remoteMark(alice) == nil)
    }

    /// Hub hand-offs a session's loop has not run yet are bounded: past the budget the first overdraft
    /// closes the session (resume) and the rest are dropped.
    @Test func handOffsPastTheBudgetCloseTheSessionOnce() {
        let b = HandoffBudget(max: 3)
        #expect([b.take(), b.take(), b.take()] == [.ok, .ok, .ok])
        b.give()
        #expect(b.take() == .ok)
        #expect(b.owed == 3)
        #expect(b.take() == .overdrawn)
        #expect(b.take() == .closed)
        b.give()
        #expect(b.take() == .closed, "once overdrawn, the session is closing")
    }

    /// 4 nodes, 4 shards, replication 3: each shard is on 3 of the 4 nodes (the test asks the
    /// configuration which).
    static func fourNodes() throws -> ClusterConfiguration {
        let nodes = (1...4).map { "[[nodes]]\nid = \($0)\npeer_addr = \"127.0.0.1:\(7000 + $0)\"\napi_addr = \"127.0.0.1:\(9000 + $0)\"\n" }
        let text = """
            [cluster]
            name = "t"
            secret = "0123456789abcdef"
            shards = 4
            replication = 3

            [api]
            operator_token = "operator-token-0123456789"

            \(nodes.joined(separator: "\n"))
            """
        return try ClusterConfiguration.parse(text, configPath: "c.toml")
    }

    /// A forwarded frame is taken only from a node placed on its shard, by a node holding no replica of
    /// it, for a shard that exists, and only its inbox records of users homed on that shard; a frame
    /// naming a shard past the configuration's is refused, not trapped on.
    @Test func onlyWhatAForwardedFrameMayCarryIsTaken() throws {
        let config = try Self.fourNodes()
        let shard = ShardID(1)
        let placed = config.replicas(of: shard)
        let away = try #require((1...4).map { NodeID(UInt64($0)) }.first { !placed.contains($0) })
        let tier = DeliveryTier(config: config, selfID: away, send: { _, _, _ in }, reachable: { _ in true })
        defer { tier.hub.stop() }
        let homed: UInt64 = 1_000_001  // 1_000_001 % 4 == 1
        let elsewhere: UInt64 = 1_000_002
        let good = Self.inboxRecord(homed, 3)
        var notInbox = good
        notInbox.stream = StreamID(homed)
        let frame = [good, Self.inboxRecord(elsewhere, 1), notInbox]
        #expect(tier.acceptForwarded(frame, from: placed[0], shard: shard, holdsReplica: false) == [good])
        #expect(tier.acceptForwarded(frame, from: away, shard: shard, holdsReplica: false).isEmpty, "from a node not placed on the shard")
        #expect(tier.acceptForwarded(frame, from: placed[0], shard: shard, holdsReplica: true).isEmpty, "this node's own hub has them")
        #expect(tier.acceptForwarded(frame, from: placed[0], shard: ShardID(99), holdsReplica: false).isEmpty, "no such shard")
    }

    /// A node placed on a shard that says its replica stopped (or is cut off from its leader) is
    /// forwarded to until it says its replica serves again, or its announcement is not repeated; a node
    /// not placed on the shard cannot put itself on the list.
    @Test func aStoppedReplicaIsForwardedToUntilItSaysItServesAgain() throws {
        let config = try Self.fourNodes()
        let shard = ShardID(1)
        let placed = config.replicas(of: shard)
        let away = try #require((1...4).map { NodeID(UInt64($0)) }.first { !placed.contains($0) })
        let tier = DeliveryTier(config: config, selfID: placed[0], send: { _, _, _ in }, reachable: { _ in true })
        defer { tier.hub.stop() }
        tier.noteStopped(shard, node: placed[1])
        tier.noteStopped(shard, node: away)
        #expect(tier.stoppedNodes(of: shard) == [placed[1]])
        tier.noteServing(shard, node: placed[1])
        #expect(tier.stoppedNodes(of: shard).isEmpty)
        tier.noteServing(shard, node: placed[1])
        #expect(tier.stoppedNodes(of: ShardID(2)).isEmpty)
    }

    /// A node placed on a shard that newly says its replica stopped or is cut off is sent the inbox records
    /// this node applied lately of the users it holds sessions of (those it missed between the cut and
    /// saying so); a repeat of the announcement sends nothing again, nor does a new cut right after it
    /// served again (one backlog per `recentInboxFor`: a flapping replica draws no bursts).
    @Test func aReplicaThatNewlySaysItIsCutOffIsSentTheBacklogOfItsUsers() throws {
        let config = try Self.fourNodes()
        let shard = ShardID(1)
        let placed = config.replicas(of: shard)
        final class Frames: @unchecked Sendable {
            let lock = NSLock()
            var sent: [(NodeID, ShardID, [StreamSeq])] = []
        }
        let frames = Frames()
        let tier = DeliveryTier(
            config: config, selfID: placed[0],
            send: { n, s, e in if case .inbox(let rs) = e { frames.lock.withLock { frames.sent.append((n, s, rs.map(\.seq))) } } },
            reachable: { _ in true })
        defer { tier.hub.stop() }
        let (listed, other): (UInt64, UInt64) = (1_000_001, 1_000_005)  // both homed on shard 1 of 4
        tier.directory.note([listed], node: placed[1], on: true)
        tier.directory.note([other], node: placed[2], on: true)
        tier.forwardInbox([listed: [Self.inboxRecord(listed, 1), Self.inboxRecord(listed, 2)], other: [Self.inboxRecord(other, 1)]], shard: shard)
        #expect(frames.lock.withLock { frames.sent.isEmpty }, "both nodes hold a running replica: nothing forwarded")

        tier.noteStopped(shard, node: placed[1])
        #expect(frames.lock.withLock { frames.sent.map { "\($0.0) \($0.1) \($0.2)" } } == ["\(placed[1]) \(shard) [1, 2]"])
        // Now forwarded as applied; the repeated announcement sends no backlog again.
        tier.forwardInbox([listed: [Self.inboxRecord(listed, 3)]], shard: shard)
        tier.noteStopped(shard, node: placed[1])
        #expect(frames.lock.withLock { frames.sent.map(\.2) } == [[1, 2], [3]])
        // Served again, then cut again at once: forwarded to again, no second backlog.
        tier.noteServing(shard, node: placed[1])
        tier.noteStopped(shard, node: placed[1])
        #expect(tier.stoppedNodes(of: shard) == [placed[1]])
        #expect(frames.lock.withLock { frames.sent.map(\.2) } == [[1, 2], [3]])
        // Another shard's announcement: nothing of this one.
        tier.noteStopped(ShardID(2), node: config.replicas(of: ShardID(2)).first { $0 != placed[0] } ?? placed[0])
        #expect(frames.lock.withLock { frames.sent.count } == 2)
    }

    @Test func forwardedInboxFramesRoundTripAndRefuseShortOnes() throws {
        let records = [Self.inboxRecord(1_000_001, 4), Self.inboxRecord(1_000_003, 1)]
        let bytes = Envelope.inbox(records: records).encode()
        #expect(try Envelope.decode(bytes) == .inbox(records: records))
        #expect(try Envelope.decode(Envelope.inbox(records: []).encode()) == .inbox(records: []))
        for cut in [bytes.count - 1, 5, 3] {
            #expect(throws: (any Error).self) { try Envelope.decode(Array(bytes.prefix(cut))) }
        }
        // A count of records the bytes cannot hold.
        var lying = bytes
        lying[1] = 0xFF
        #expect(throws: (any Error).self) { try Envelope.decode(lying) }
    }

    @Test func inboxHeadsQueryAnswersEachUsersLastSeqInOrder() throws {
        var m = MessagingMachine()
        let (a, b, c): (UInt64, UInt64, UInt64) = (1_000_001, 1_000_002, 1_000_003)
        for (u, seq) in [(a, 1), (a, 2), (c, 1)] as [(UInt64, StreamSeq)] {
            _ = m.apply([Self.inboxRecord(u, seq)][...])
        }
        let q = MessagingQuery.inboxHeads([c, b, a])
        #expect(MessagingQuery.decode(q.encode()) == q)
        let answer = q.answer(m)
        #expect(answer == .heads([1, 0, 2]))
        #expect(MessagingQuery.Answer.decode(answer.encode()) == answer)
        // More users than one query may name is refused when decoded.
        let tooMany = MessagingQuery.inboxHeads(Array(repeating: a, count: MessagingQuery.headsUsersMax + 1))
        #expect(MessagingQuery.decode(tooMany.encode()) == nil)
    }

    @Test func aVerifiedTokenIsRememberedUntilItExpiresAndTheTableStaysBounded() {
        let t = VerifiedTokens(capacity: 3)
        let now = Date(timeIntervalSince1970: 1_000_000)
        t.put("a", user: 1, version: 2, expires: now.addingTimeInterval(60), now: now)
        #expect(t.get("a", now: now) ?? (0, 0) == (1, 2))
        #expect(t.get("a", now: now.addingTimeInterval(60)) == nil, "expired at its exp")
        #expect(t.get("b", now: now) == nil)
        // An expired token is not stored.
        t.put("old", user: 1, version: 2, expires: now, now: now)
        #expect(t.get("old", now: now.addingTimeInterval(-1)) == nil)
        for k in 0..<10 { t.put("t\(k)", user: UInt64(k), version: 0, expires: now.addingTimeInterval(60), now: now) }
        #expect(t.count <= 3)
        #expect(t.get("t9", now: now) ?? (0, 0) == (9, 0))
    }
}
