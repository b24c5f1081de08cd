import Foundation
import Raft
import Testing
import WeftCore

@testable import WeftServer

/// Issue 8, items 4 and 7: forward request ids restarted at 1 with each process, answers were matched
/// by id alone, and a forward that timed out after it was sent said `unavailable`.
@Suite struct ForwarderTests {
    final class Guarded<T: Sendable>: @unchecked Sendable {
        let lock = NSLock()
        var value: T
        init(_ v: T) { value = v }
        var get: T { lock.withLock { value } }
        func set(_ v: T) { lock.withLock { value = v } }
    }

    final class Sent: @unchecked Sendable {
        let lock = NSLock()
        var frames: [(NodeID, [UInt8])] = []
        func add(_ to: NodeID, _ f: [UInt8]) { lock.withLock { frames.append((to, f)) } }
        var last: (NodeID, Envelope)? {
            lock.withLock { frames.last.flatMap { f in (try? Envelope.decode(f.1)).map { (f.0, $0) } } }
        }
    }

    static let proposal = Envelope.forward(
        request: .init(incarnation: 0, sequence: 0),
        proposals: [.init(stream: StreamID(1), type: .data, timestampMicros: 0, payload: [1])])

    func waitForFrame(_ sent: Sent, count: Int) async throws {
        for _ in 0..<500 where sent.lock.withLock({ sent.frames.count }) < count { try await Task.sleep(for: .milliseconds(5)) }
    }

    @Test func anAnswerFromAnEarlierIncarnationOrAnotherPeerCompletesNothing() async throws {
        let sent = Sent()
        // Two incarnations of node 1 (a restart), each starting its sequence at 1.
        let before = Forwarder(selfID: NodeID(1), incarnation: 111, reachable: { _ in true }, send: { to, _, f in sent.add(to, f) })
        let after = Forwarder(selfID: NodeID(1), incarnation: 222, reachable: { _ in true }, send: { to, _, f in sent.add(to, f) })
        let waiting = Task { await after.send(to: NodeID(2), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(30)) }
        try await waitForFrame(sent, count: 1)
        guard case (NodeID(2), .forward(let id, _))? = sent.last else { Issue.record("no forward sent"); return }
        #expect(id == Envelope.RequestID(incarnation: 222, sequence: 1))
        // The answer to the earlier incarnation's request 1 (same sequence number) is not taken...
        #expect(!after.receive(.init(incarnation: 111, sequence: 1), .ok([]), from: NodeID(2)))
        // ...nor an answer with the right id from a node the request was not sent to...
        #expect(!after.receive(id, .ok([]), from: NodeID(3)))
        // ...and the real answer is.
        let ref = RecordRef(index: 9, term: 2, stream: StreamID(1), seq: 4)
        #expect(after.receive(id, .ok([ref]), from: NodeID(2)))
        #expect(await waiting.value == .ok([ref]))
        _ = before
    }

    @Test func aForwardWithoutAnAnswerByTheDeadlineIsInDoubtAndOneNeverSentIsNot() async throws {
        let sent = Sent()
        let f = Forwarder(selfID: NodeID(1), incarnation: 5, reachable: { $0 != NodeID(3) }, send: { to, _, fr in sent.add(to, fr) })
        let unknown = await f.send(to: NodeID(2), shard: ShardID(0), Self.proposal, deadline: .now + .milliseconds(50))
        guard case .outcomeUnknown = unknown else { Issue.record("sent, no answer: \(unknown)"); return }
        let unreachable = await f.send(to: NodeID(3), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(5))
        guard case .failed = unreachable else { Issue.record("never sent: \(unreachable)"); return }
        // A shutdown: what is still waiting was sent, so it is in doubt too.
        let waiting = Task { await f.send(to: NodeID(2), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(30)) }
        try await waitForFrame(sent, count: 2)
        f.close()
        guard case .outcomeUnknown = await waiting.value else { Issue.record("waiting at close"); return }
    }

    /// A partition between this node and the target only: the request goes to a third node as `via`
    /// (the inner request whole), and only that node's answer completes it. A request that must not be
    /// passed on again (`direct`, what the third node sends) fails at once when its target is
    /// unreachable, and nothing is sent.
    @Test func aTargetCutOffFromThisNodeIsAskedThroughAThird() async throws {
        let sent = Sent()
        let f = Forwarder(
            selfID: NodeID(1), incarnation: 7, reachable: { $0 == NodeID(3) }, relay: { $0 == NodeID(2) ? NodeID(3) : nil },
            send: { to, _, fr in sent.add(to, fr) })
        let waiting = Task { await f.send(to: NodeID(2), shard: ShardID(4), Self.proposal, deadline: .now + .seconds(30)) }
        try await waitForFrame(sent, count: 1)
        guard case (NodeID(3), .via(let id, let target, let within, let inner))? = sent.last else { Issue.record("no via sent: \(String(describing: sent.last))"); return }
        #expect(target == NodeID(2))
        #expect(within > 25_000 && within <= 30_000, "the sender's own deadline: \(within) ms")
        #expect(id == Envelope.RequestID(incarnation: 7, sequence: 1))
        guard case .forward(let innerID, let ps) = try Envelope.decode(inner) else { Issue.record("the inner request is not the forward"); return }
        #expect(innerID == id && ps.map(\.payload) == [[1]])
        // The target cannot answer it (it never got it from this node); the third node does.
        #expect(!f.receive(id, .ok([]), from: NodeID(2)))
        let ref = RecordRef(index: 3, term: 1, stream: StreamID(1), seq: 1)
        #expect(f.receive(id, .ok([ref]), from: NodeID(3)))
        #expect(await waiting.value == .ok([ref]))

        // No third node reachable, or passing on again: failed, nothing sent.
        let none = Forwarder(selfID: NodeID(1), reachable: { _ in false }, relay: { _ in NodeID(3) }, send: { to, _, fr in sent.add(to, fr) })
        guard case .failed = await none.send(to: NodeID(2), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(5)) else {
            Issue.record("a relay that is not reachable was used"); return
        }
        guard case .failed = await f.send(to: NodeID(2), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(5), direct: true) else {
            Issue.record("a direct request was passed on"); return
        }
        #expect(sent.lock.withLock { sent.frames.count } == 1)
        // The envelope round-trips; a via without a request does not decode.
        let via = Envelope.via(request: id, target: NodeID(2), withinMillis: within, inner: inner)
        #expect(try Envelope.decode(via.encode()) == via)
        #expect(throws: Envelope.DecodeError.self) { try Envelope.decode([19] + Array(repeating: 0, count: 28)) }
        // What a passing node takes: requests only, never a via (no second hop) or a Raft message.
        #expect(Self.proposal.isRequest && Envelope.readIndex(request: id).isRequest)
        #expect(!via.isRequest && !Envelope.leader(term: 1).isRequest && !Envelope.answer(request: id, .ok([])).isRequest)
    }

    /// Link probes (Docs/transport.md): a target whose link is up but whose probes go unanswered is asked
    /// through a third node that answers its own, and straight when none does. When a node turns
    /// suspect, the requests sent to it that their senders retry safely (`failFast`) are answered at
    /// once, their outcome unknown; the others, and those to other nodes, keep waiting.
    @Test func aSuspectTargetIsAskedThroughAThirdAndItsRetriableRequestsStopWaiting() async throws {
        let sent = Sent()
        let quiet = Guarded<Set<NodeID>>([NodeID(2)])
        let f = Forwarder(
            selfID: NodeID(1), incarnation: 9, reachable: { _ in true }, suspect: { quiet.get.contains($0) },
            relay: { $0 == NodeID(2) ? NodeID(3) : NodeID(2) }, send: { to, _, fr in sent.add(to, fr) })
        // Node 2 is suspect: through node 3.
        let viaThird = Task { await f.send(to: NodeID(2), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(30)) }
        try await waitForFrame(sent, count: 1)
        guard case (NodeID(3), .via(let viaID, NodeID(2), _, _))? = sent.last else { Issue.record("not through node 3: \(String(describing: sent.last))"); return }
        #expect(f.receive(viaID, .ok([]), from: NodeID(3)))
        #expect(await viaThird.value == .ok([]))
        // Both quiet: straight to the target (the link is still up).
        quiet.set([NodeID(2), NodeID(3)])
        let straight = Task { await f.send(to: NodeID(2), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(30)) }
        try await waitForFrame(sent, count: 2)
        guard case (NodeID(2), .forward(let straightID, _))? = sent.last else { Issue.record("not straight to node 2"); return }

        // Node 4 goes quiet with three requests waiting on it and one on node 5.
        quiet.set([])
        let retriable = Task { await f.send(to: NodeID(4), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(30), failFast: true) }
        try await waitForFrame(sent, count: 3)
        let plain = Task { await f.send(to: NodeID(4), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(30)) }
        try await waitForFrame(sent, count: 4)
        guard case (NodeID(4), .forward(let plainID, _))? = sent.last else { Issue.record("no plain forward to node 4"); return }
        let elsewhere = Task { await f.send(to: NodeID(5), shard: ShardID(0), Self.proposal, deadline: .now + .seconds(30), failFast: true) }
        try await waitForFrame(sent, count: 5)
        guard case (NodeID(5), .forward(let elsewhereID, _))? = sent.last else { Issue.record("no forward to node 5"); return }
        f.peerSuspect(NodeID(4))
        guard case .outcomeUnknown(let why) = await retriable.value else { Issue.record("the retriable request kept waiting"); return }
        #expect(why.contains("node 4"))
        // The others are still waiting, and their answers are taken.
        #expect(f.receive(plainID, .ok([]), from: NodeID(4)))
        #expect(await plain.value == .ok([]))
        #expect(f.receive(elsewhereID, .ok([]), from: NodeID(5)))
        #expect(await elsewhere.value == .ok([]))
        #expect(f.receive(straightID, .ok([]), from: NodeID(2)))
        #expect(await straight.value == .ok([]))
    }

    @Test func answersAndCatchUpFramesRoundTrip() throws {
        let id = Envelope.RequestID(incarnation: 0xDEAD_BEEF_0000_0001, sequence: 42)
        let envelopes: [Envelope] = [
            .answer(request: id, .ok([RecordRef(index: 1, term: 2, stream: StreamID(3), seq: 4)])),
            .answer(request: id, .notLeader(NodeID(3))), .answer(request: id, .failed("no quorum")),
            .answer(request: id, .invalid("reserved")), .answer(request: id, .changePending("pending")),
            .answer(request: id, .outcomeUnknown("deadline")),
            .file(transfer: 7 << 32 | 1, name: "00000000000000000001.seg", offset: 4096, total: 9000, bytes: [1, 2, 3]),
            .fileAck(transfer: 7 << 32 | 1, name: "00000000000000000001.seg", received: 4099, ok: true),
            .configChange(request: id, change: .addLearner(NodeID(4))),
            // Messaging: outcomes travel with the refs; refusals, rate-limit takes and messaging writes.
            .answer(
                request: id,
                .ok([
                    RecordRef(index: 9, term: 2, stream: StreamID(5), seq: 1, outcome: .accepted([1, 2, 3])),
                    RecordRef(index: 10, term: 2, stream: StreamID(5), seq: 2, outcome: .rejected(code: "not_allowed", message: "no")),
                ])),
            .answer(request: id, .refused(code: "username_taken", message: "the username is taken")),
            .rateTake(request: id, user: 77, kind: 1, perMinute: 100),
            .forwardMessaging(
                request: id, key: [1, 2, 3],
                proposals: [Envelope.ForwardedProposal(stream: StreamID(1 << 62 | 5), type: RecordType(16), timestampMicros: 0, payload: [20, 1])]),
            .forwardMessaging(request: id, key: [], proposals: []),
            .presence(on: true, users: [5, 1 << 40, 77]),
            .presence(on: false, users: []),
            .typing(from: 9, to: 17, route: true),
            .typing(from: 17, to: 9, route: false),
            .leader(term: 0),
            .leader(term: 1 << 40 | 7),
            .replicaStopped,
            .replicaServing,
        ]
        for e in envelopes { #expect(try Envelope.decode(e.encode()) == e) }
        // Frames 18 and 20 are their type byte alone.
        #expect(Envelope.replicaStopped.encode() == [18] && Envelope.replicaServing.encode() == [20])
        #expect(throws: Envelope.DecodeError.self) { try Envelope.decode([20, 0]) }
        // A leader announcement is exactly its term: trailing bytes are refused.
        #expect(throws: Envelope.DecodeError.self) { try Envelope.decode(Envelope.leader(term: 3).encode() + [0]) }
        // Truncated frames are errors, never crashes.
        for e in envelopes {
            let b = e.encode()
            for cut in 1..<min(b.count, 40) { _ = try? Envelope.decode(Array(b.prefix(cut))) }
        }
    }
}
