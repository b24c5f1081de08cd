import Metrics
import NIOConcurrencyHelpers
import WeftCore

/// The requests this node sent to other nodes' replicas (forwarded writes, membership changes), waiting
/// for their answers.
///
/// A request id is (incarnation, sequence). The incarnation is random per process start, so an answer to
/// a request sent before a restart (still in a peer's queue, or replayed) can never complete a request
/// sent after it; and an answer is taken only from the node the request was sent to.
///
/// Outcomes: a request that could not be sent (the peer is unreachable) failed and nothing was written;
/// once it was sent, no answer before the deadline means the outcome is unknown (the leader may have
/// committed it), and so does a shutdown while it waits.
final class Forwarder: Sendable {
    struct Waiting {
        var target: NodeID
        var answer: @Sendable (Envelope.ForwardAnswer) -> Void
        /// The deadline's entry in `deadlines`, cancelled when the answer comes first.
        var timer: UInt64?
        /// Answered at once with an unknown outcome when `target` turns suspect (`peerSuspect`): the
        /// sender retries such requests safely, through another node.
        var failFast = false
    }

    let incarnation: UInt64
    let selfID: NodeID
    /// Whether a peer is connected now (a request to one that is not fails without being sent, or goes
    /// through `relay`).
    let reachable: @Sendable (NodeID) -> Bool
    /// Whether a reachable peer has stopped answering link probes (`PeerTransport.suspect`): a request
    /// to it goes through another node when one is reachable and not suspect itself, else straight to it.
    let suspect: @Sendable (NodeID) -> Bool
    /// A reachable peer to pass a request on to a target this node cannot reach (a partition between the
    /// two only), or nil (Docs/replication.md, "Forwarding through another node").
    let relay: @Sendable (NodeID) -> NodeID?
    /// Sends a frame to a peer (the peer transport; a capture in tests).
    let sendFrame: @Sendable (NodeID, ShardID, [UInt8]) -> Void
    let state = NIOLockedValueBox<(next: UInt64, waiting: [UInt64: Waiting], closed: Bool)>((1, [:], false))
    let deadlines: Deadlines
    /// Requests waiting for an answer at most; past it a new request fails at once (nothing is sent).
    static let waitingCountMax = 65_536
    /// Requests sent through another node (this node could not reach their target).
    let viaSent = Counter(label: "weft_forward_via_total", dimensions: [("role", "sent")])

    init(
        selfID: NodeID, incarnation: UInt64 = UInt64.random(in: 1...UInt64.max), reachable: @escaping @Sendable (NodeID) -> Bool,
        suspect: @escaping @Sendable (NodeID) -> Bool = { _ in false },
        relay: @escaping @Sendable (NodeID) -> NodeID? = { _ in nil },
        deadlines: Deadlines = .shared, send: @escaping @Sendable (NodeID, ShardID, [UInt8]) -> Void
    ) {
        self.deadlines = deadlines
        self.selfID = selfID
        self.reachable = reachable
        self.suspect = suspect
        self.relay = relay
        self.sendFrame = send
        self.incarnation = incarnation
    }

    /// Sends `envelope` (a forward or a config change; its request id is set here) to `target` and waits
    /// for the answer until `deadline`.
    func send(
        to target: NodeID, shard: ShardID, _ envelope: Envelope, deadline: ContinuousClock.Instant, direct: Bool = false, failFast: Bool = false
    ) async -> Envelope.ForwardAnswer {
        await withCheckedContinuation { c in
            send(to: target, shard: shard, envelope, deadline: deadline, direct: direct, failFast: failFast) { c.resume(returning: $0) }
        }
    }

    /// Callback form of `send`: `done` runs exactly once, with the answer, or with the failure when
    /// nothing could be sent (at once, on this thread) or no answer came before `deadline`.
    ///
    /// A target this node cannot reach is asked through another peer that can (`relay`): the request
    /// goes to it as `via`, it passes it on once (`direct`: never through a third), and its answer is the
    /// target's (or its own failure to reach the target: nothing written). So is a suspect target (its
    /// link up, its probes unanswered), when a relay that is not suspect itself is at hand; else the
    /// request goes to it straight.
    ///
    /// `failFast`: the caller retries an unknown outcome safely (a relay batch, a keyed write), so the
    /// request is answered `outcomeUnknown` as soon as the node it went to turns suspect, instead of at
    /// `deadline` (`peerSuspect`).
    func send(
        to target: NodeID, shard: ShardID, _ envelope: Envelope, deadline: ContinuousClock.Instant, direct: Bool = false,
        failFast: Bool = false, done: @escaping @Sendable (Envelope.ForwardAnswer) -> Void
    ) {
        var hop = target
        if !reachable(target) {
            guard !direct, let r = relay(target), r != target, r != selfID, reachable(r) else {
                return done(.failed("node \(target) unreachable"))
            }
            hop = r
        } else if !direct, suspect(target), let r = relay(target), r != target, r != selfID, reachable(r), !suspect(r) {
            hop = r
        }
        // Registered before the deadline's timer exists, so the timer always finds it (or finds it
        // already answered). An answer is taken only from the node the frame went to.
        let sequence = state.withLockedValue { s -> UInt64? in
            guard !s.closed, s.waiting.count < Self.waitingCountMax else { return nil }
            let sequence = s.next
            s.next += 1
            s.waiting[sequence] = Waiting(target: hop, answer: done, failFast: failFast)
            return sequence
        }
        guard let sequence else { return done(.failed("node \(selfID) has too many forwarded requests waiting, or is stopping")) }
        let id = Envelope.RequestID(incarnation: incarnation, sequence: sequence)
        let numbered: Envelope =
            switch envelope {
            case .forward(_, let ps): .forward(request: id, proposals: ps)
            case .configChange(_, let change): .configChange(request: id, change: change)
            case .readIndex: .readIndex(request: id)
            case .forwardKeyed(_, let key, let ps): .forwardKeyed(request: id, key: key, proposals: ps)
            case .relayBatch(_, let h, let ps): .relayBatch(request: id, header: h, proposals: ps)
            case .forwardMessaging(_, let key, let ps): .forwardMessaging(request: id, key: key, proposals: ps)
            case .rateTake(_, let user, let kind, let perMinute): .rateTake(request: id, user: user, kind: kind, perMinute: perMinute)
            case .stateQuery(_, let c, let q): .stateQuery(request: id, consistency: c, query: q)
            case .readForward(_, let c, let q): .readForward(request: id, consistency: c, query: q)
            // Not requests (nothing answers them): sent as they are.
            case .raft, .answer, .file, .fileAck, .presence, .typing, .inbox, .leader, .replicaStopped, .replicaServing, .via: envelope
            }
        let route = hop == target ? "node \(target)" : "node \(target) through node \(hop)"
        let timer = deadlines.schedule(deadline) { [state] in
            state.withLockedValue { $0.waiting.removeValue(forKey: sequence) }?.answer(
                .outcomeUnknown("sent to \(route), no answer before the deadline"))
        }
        let stillWaiting = state.withLockedValue { s -> Bool in
            guard s.waiting[sequence] != nil else { return false }
            s.waiting[sequence]?.timer = timer
            return true
        }
        if !stillWaiting { deadlines.cancel(timer) }
        if hop == target {
            sendFrame(target, shard, numbered.encode())
        } else {
            viaSent.increment()
            let ms = UInt32(clamping: Int64(max(0, (deadline - ContinuousClock.now) / .milliseconds(1))))
            sendFrame(hop, shard, Envelope.via(request: id, target: target, withinMillis: ms, inner: numbered.encode()).encode())
        }
    }

    /// An answer arrived from `from`. Ignored unless it answers a request of this incarnation that was
    /// sent to `from` and is still waiting. Returns whether it was taken.
    @discardableResult
    func receive(_ request: Envelope.RequestID, _ answer: Envelope.ForwardAnswer, from: NodeID) -> Bool {
        guard request.incarnation == incarnation else { return false }
        let w = state.withLockedValue { s -> Waiting? in
            guard let w = s.waiting[request.sequence], w.target == from else { return nil }
            return s.waiting.removeValue(forKey: request.sequence)
        }
        guard let w else { return false }
        if let t = w.timer { deadlines.cancel(t) }
        w.answer(answer)
        return true
    }

    /// `peer`'s link turned suspect or lost its connection (`PeerTransport`'s `onSuspect`): the requests
    /// sent to it that their senders retry safely (`failFast`) are answered now, their outcome unknown,
    /// so the retry goes through another node without waiting out the deadline. The others keep waiting
    /// for theirs.
    func peerSuspect(_ peer: NodeID) {
        let failing = state.withLockedValue { s -> [Waiting] in
            let keys = s.waiting.compactMap { $0.value.target == peer && $0.value.failFast ? $0.key : nil }
            return keys.compactMap { s.waiting.removeValue(forKey: $0) }
        }
        for w in failing {
            if let t = w.timer { deadlines.cancel(t) }
            w.answer(.outcomeUnknown("node \(peer) went quiet (link probes unanswered, or its connection lost)"))
        }
    }

    /// Shutdown: every request still waiting was sent, so its outcome is unknown; new ones fail.
    func close() {
        let all = state.withLockedValue { s -> [Waiting] in
            s.closed = true
            defer { s.waiting = [:] }
            return Array(s.waiting.values)
        }
        for w in all {
            if let t = w.timer { deadlines.cancel(t) }
            w.answer(.outcomeUnknown("node stopping while waiting for node \(w.target)"))
        }
    }
}
