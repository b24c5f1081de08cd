import Foundation
import Messaging
import Metrics
import NIOConcurrencyHelpers
import Raft
import Replication
import ShardState
import WeftCore

/// What a shard's relay derives: the raw log's fan-out copies (to other shards) and messaging's inbox
/// entries (to every user's home shard, this one included).
struct WeftRelayRule: RelayRule {
    let shards: Int
    let fanout = FanoutRule()

    func derive(_ record: Record, source: ShardID) -> [(destination: ShardID, proposal: Proposal)] {
        derive(record, source: source, only: nil)
    }

    func derive(_ record: Record, source: ShardID, for destination: ShardID) -> [(destination: ShardID, proposal: Proposal)] {
        derive(record, source: source, only: destination)
    }

    /// A 1:1 message: apply accepts what admission accepted unless a contact change or a block of the
    /// pair is in the log ahead of it (the pair's state is all a message's acceptance reads).
    func inlineDependencies(_ p: Proposal) -> [StreamID]? {
        guard p.type == .messaging, p.payload.first == MessagingOp.messageCode, let (lo, hi) = Ids.users(of: p.stream),
            p.stream == Ids.dm(lo, hi)
        else { return nil }
        return [Ids.pair(lo, hi)]
    }

    /// A conversation's records (its dm and pair streams) keep their order in each inbox.
    func inlineOrderKey(_ p: Proposal) -> StreamID? {
        guard p.type == .messaging, let (lo, hi) = Ids.users(of: p.stream) else { return nil }
        return Ids.pair(lo, hi)
    }

    /// Op 24 instead of 14: the same message, its inline inbox entries after it.
    func marked(_ p: Proposal, inline: Bool) -> Proposal {
        let (from, to) = inline ? (MessagingOp.messageCode, MessagingOp.messageInlineCode) : (MessagingOp.messageInlineCode, MessagingOp.messageCode)
        guard p.type == .messaging, p.payload.first == from else { return p }
        var m = p
        m.payload[0] = to
        return m
    }

    func hasInline(_ r: Record) -> Bool { r.type == .messaging && r.payload.first == MessagingOp.messageInlineCode }

    func derive(_ record: Record, source: ShardID, only: ShardID?) -> [(destination: ShardID, proposal: Proposal)] {
        if record.type == .messaging {
            return InboxRelay.derive(record, source: source, shards: shards, only: only).map {
                ($0.shard, Proposal(stream: $0.stream, type: .messaging, timestampMicros: record.timestampMicros, payload: $0.payload))
            }
        }
        let all = fanout.derive(record, source: source)
        return only.map { d in all.filter { $0.destination == d } } ?? all
    }
}

extension WeftNode {
    /// Writes messaging operations to `shard` through its leader (they must all belong there); with a
    /// request key (1...64 bytes, namespaced by the caller) the write happens once however often it is
    /// sent. The answer carries each record's apply outcome; a refusal by the leader's state is
    /// `WriteError.refused` (nothing written).
    public func writeMessaging(
        shard: ShardID, _ ops: [MessagingOp], key: [UInt8]? = nil, timeout: Duration = .seconds(5)
    ) async throws -> Written {
        let proposals = ops.map { Proposal(stream: $0.stream, type: .messaging, payload: $0.encode()) }
        let forwarded = Envelope.forwarded(proposals)
        let me = id
        let k = key ?? []
        guard k.count <= RequestWindow.keyBytesMax, !proposals.isEmpty, proposals.count <= RequestWindow.keyedRecordsMax else {
            throw WriteError.invalid("a messaging write has 1...\(RequestWindow.keyedRecordsMax) records and a key of at most \(RequestWindow.keyBytesMax) bytes")
        }
        return try await withCheckedThrowingContinuation { c in
            throughLeader(
                shard, deadline: ContinuousClock.now + timeout, retryUnknown: !k.isEmpty,
                envelope: { .forwardMessaging(request: Envelope.RequestID(incarnation: 0, sequence: 0), key: k, proposals: forwarded) },
                local: { runner, deadline, finish in
                    Self.untilDeadline(deadline, late: .outcomeUnknown("proposed on node \(me), not committed before the deadline"), finish) { finish in
                        if k.isEmpty {
                            runner.submit(.propose(proposals) { finish(Self.answer($0, me: me, Self.refs)) })
                        } else {
                            runner.submit(.proposeKeyed(k, proposals, deadline: deadline) { finish(Self.keyedAnswer($0, me: me)) })
                        }
                    }
                }, done: { c.resume(with: $0) })
        }
    }

    /// Runs `body` against `shard`'s messaging state on this node's replica, as current as `consistency`
    /// asks (a linearizable query asks the leader for a read index first). `body` runs on the shard's
    /// thread: keep it to lookups.
    /// `.local` with `caughtUp`: nil (`.success(nil)`) when the replica is behind what it knows committed
    /// or repairing (the caller then asks for a read index instead).
    public func query<T: Sendable>(
        shard: ShardID, consistency: ReadConsistency = .linearizable, timeout: Duration = .seconds(5),
        _ body: @escaping @Sendable (MessagingMachine, LogIndex) -> T
    ) async -> Result<T, ReadFailure> {
        switch await query(shard: shard, consistency: consistency, timeout: timeout, caughtUp: false, body) {
        case .success(let v?): .success(v)
        case .success(nil): .failure(.unavailable("shard \(shard): no answer"))
        case .failure(let f): .failure(f)
        }
    }

    public func query<T: Sendable>(
        shard: ShardID, consistency: ReadConsistency, timeout: Duration = .seconds(5), caughtUp: Bool,
        _ body: @escaping @Sendable (MessagingMachine, LogIndex) -> T
    ) async -> Result<T?, ReadFailure> {
        guard let r = runner(shard) else { return .failure(.noReplica) }
        let need: LogIndex
        switch await waitApplied(shard: shard, runner: r, consistency: consistency, deadline: ContinuousClock.now + timeout) {
        case .failure(let f): return .failure(f)
        case .success(let n): need = n
        }
        let answer: QueryAnswer<T> = await withCheckedContinuation { c in
            r.submit(
                .query { state in
                    guard let (machine, applied, current) = state else { return c.resume(returning: .notRunning) }
                    guard let m = machine as? MessagingMachine else { return c.resume(returning: .notMessaging) }
                    // A repair between the wait and this query restarted the state from an earlier point.
                    guard applied >= need else { return c.resume(returning: .reset(applied, need)) }
                    if caughtUp && !current { return c.resume(returning: .behind) }
                    c.resume(returning: .value(body(m, applied)))
                })
        }
        switch answer {
        case .notRunning: return .failure(.unavailable("the replica of shard \(shard) on node \(id) is not running"))
        case .notMessaging: return .failure(.unavailable("shard \(shard) does not run the messaging state machine"))
        case .behind: return .success(nil)
        case .reset(let applied, let need):
            return .failure(.unavailable("the replica of shard \(shard) on node \(id) applied \(applied) of \(need): reset by a repair since the query waited"))
        case .value(let v): return .success(v)
        }
    }
}

/// What a state query on a shard's thread gave.
enum QueryAnswer<T: Sendable>: Sendable {
    case notRunning, notMessaging, behind
    case reset(LogIndex, LogIndex)
    case value(T)
}

/// How current a state query or read must be, and its encoding between nodes.
public enum ReadPoint: Sendable, Equatable {
    /// This replica as it is.
    case local
    /// This replica if it has applied all it knows committed and is not repairing; else "behind".
    case localCurrent
    case atLeast(LogIndex)
    case linearizable

    /// The read point a raw read's consistency names.
    init(_ c: WeftNode.ReadConsistency) {
        switch c {
        case .local: self = .local
        case .atLeast(let i): self = .atLeast(i)
        case .linearizable: self = .linearizable
        }
    }

    var consistency: WeftNode.ReadConsistency {
        switch self {
        case .local, .localCurrent: .local
        case .atLeast(let i): .atLeast(i)
        case .linearizable: .linearizable
        }
    }

    func encode() -> [UInt8] {
        var b: [UInt8]
        var index: LogIndex = 0
        switch self {
        case .local: b = [0]
        case .localCurrent: b = [1]
        case .atLeast(let i):
            b = [2]
            index = i
        case .linearizable: b = [3]
        }
        put(index, &b)
        return b
    }

    static func decode(_ b: [UInt8]) -> ReadPoint? {
        guard b.count == 9 else { return nil }
        let index = b[1...].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        switch b[0] {
        case 0: return .local
        case 1: return .localCurrent
        case 2: return .atLeast(index)
        case 3: return .linearizable
        default: return nil
        }
    }

    static func encodeQuery(_ q: ReadQuery) -> [UInt8] {
        var b: [UInt8] = []
        switch q {
        case .log(let from, let limit):
            b.append(0)
            put(from, &b)
            put(UInt32(clamping: limit), &b)
        case .stream(let s, let from, let limit):
            b.append(1)
            put(s.rawValue, &b)
            put(from, &b)
            put(UInt32(clamping: limit), &b)
        }
        return b
    }

    static func decodeQuery(_ b: [UInt8]) -> ReadQuery? {
        var r = Envelope.Cursor(bytes: b, pos: 0)
        do {
            let q: ReadQuery
            switch try r.take(1)[0] {
            case 0: q = .log(from: try r.u64(), limit: Int(min(try r.u32(), 10_000)))
            case 1: q = .stream(StreamID(try r.u64()), fromSeq: try r.u64(), limit: Int(min(try r.u32(), 10_000)))
            default: return nil
            }
            try r.end()
            return q
        } catch {
            return nil
        }
    }

    /// `0 | applied | commit | n | n × record`; `2 | applied | commit | floor | u8 has head | head | n |
    /// n × record` for a stream read whose floor is past 1 (retention dropped its start) or that asked
    /// past the stream's end (stop 24: a tag of its own, so the answers older nodes read keep their
    /// layout); or `1 | first` (compacted); records as
    /// `index | term | stream | seq | u16 type | i64 time | u32 length | payload`.
    ///
    /// The records are cut to `answerRecordBytesMax` (at least one is kept): a peer frame holds 16 MiB
    /// at most, and one too long would be dropped, leaving the asker to wait out its deadline (a raw read
    /// of 10 000 records through a cut-off node). The asker gets fewer records and reads on from the last.
    static func encodeResult(_ r: Result<ReadResult, WeftNode.ReadFailure>) -> Envelope.ForwardAnswer {
        switch r {
        case .success(var rr):
            var bytes = 0
            if let over = rr.records.firstIndex(where: { x in
                bytes += Self.recordHeaderBytes + x.payload.count
                return bytes > Self.answerRecordBytesMax
            }) {
                rr.records.removeSubrange(max(1, over)...)
            }
            let extended = rr.floor > 1 || rr.head != nil
            var b: [UInt8] = [extended ? 2 : 0]
            put(rr.applied, &b)
            put(rr.commit, &b)
            if extended {
                put(rr.floor, &b)
                b.append(rr.head == nil ? 0 : 1)
                put(rr.head ?? 0, &b)
            }
            Envelope.putRecords(rr.records, &b)
            return .bytes(b)
        case .failure(.read(.compacted(let first))):
            var b: [UInt8] = [1]
            put(first, &b)
            return .bytes(b)
        case .failure(.invalid(let why)): return .invalid(why)
        case .failure(let f): return .failed("\(f)")
        }
    }

    /// Bytes of records one read answer carries at most (`encodeResult`), and a record's encoded size
    /// besides its payload.
    static let answerRecordBytesMax = 8 << 20
    static let recordHeaderBytes = 46

    static func decodeResult(_ b: [UInt8]) -> Result<ReadResult, WeftNode.ReadFailure>? {
        var r = Envelope.Cursor(bytes: b, pos: 0)
        do {
            switch try r.take(1)[0] {
            case let tag where tag == 0 || tag == 2:
                let applied = try r.u64()
                let commit = try r.u64()
                var floor: UInt64 = 1
                var head: UInt64?
                if tag == 2 {
                    floor = try r.u64()
                    let hasHead = try r.take(1)[0]
                    let h = try r.u64()
                    guard floor >= 1, hasHead <= 1 else { return nil }
                    head = hasHead == 1 ? h : nil
                }
                let records = try Envelope.takeRecords(&r)
                try r.end()
                return .success(ReadResult(records: records, applied: applied, commit: commit, floor: floor, head: head))
            case 1:
                let first = try r.u64()
                try r.end()
                return .failure(.read(.compacted(first: first)))
            default:
                return nil
            }
        } catch {
            return nil
        }
    }
}

extension WeftNode {
    /// Asks `shard`'s messaging state: on this node's replica, or — when this node holds none — on a
    /// node that does (the leader it knows, else the first reachable replica), over the peer connection.
    /// `.success(nil)`: `.localCurrent` and the replica is behind.
    public func ask(_ shard: ShardID, _ q: MessagingQuery, at point: ReadPoint, timeout: Duration = .seconds(5)) async -> Result<MessagingQuery.Answer?, ReadFailure> {
        await routed(
            shard, point, timeout: timeout, local: { await self.askLocal(shard, q, at: point, timeout: $0) },
            remote: { await self.askRemote(shard, q, at: point, timeout: $0) })
    }

    /// Where a read at `point` goes: this node's replica when it serves it (`localServes`; a read that
    /// waits on the leader is asked of the others too when the replica may be cut off from it, `hedged`);
    /// else, when this node has a replica that has known no leader for long, the others first with half
    /// the time, then this replica for the rest (the shard may just be in a long election, which can end
    /// meanwhile: as before, it is waited for); else the others.
    func routed<T: Sendable>(
        _ shard: ShardID, _ point: ReadPoint, timeout: Duration,
        local: @escaping @Sendable (Duration) async -> Result<T, ReadFailure>,
        remote: @escaping @Sendable (Duration) async -> Result<T, ReadFailure>
    ) async -> Result<T, ReadFailure> {
        if localServes(shard, point) {
            // What waits on the leader (a read index, or an index still to apply) can wait in vain on a
            // replica just cut off from it, before it counts as leaderless (`hedged`).
            switch point {
            case .local, .localCurrent: return await local(timeout)
            case .atLeast, .linearizable:
                return await hedged(shard, timeout: timeout, local: local, remote: remote)
            }
        }
        guard runner(shard) != nil else { return await remote(timeout) }
        let until = ContinuousClock.now + timeout
        let there = await remote(timeout / 2)
        switch there {
        case .success, .failure(.invalid), .failure(.read): return there
        case .failure: return await local(max(.milliseconds(1), until - ContinuousClock.now))
        }
    }

    /// A read this node's replica serves, asked of the other replicas too when it may be cut off from
    /// its leader. A replica cut off from its leader alone goes on counting as serving until it has
    /// known no leader for two election timeouts (`leaderlessLong`), and a read there that needs the
    /// leader's read index, or records the leader cannot send it, would wait out its whole deadline; a
    /// session's gap catch-up holds its pushes meanwhile (Docs/delivery.md).
    ///
    /// So once `after` (the longest election timeout: by then a follower that has not heard its leader
    /// has acted on it) has passed without an answer, and then every `after` until the deadline, the
    /// read is asked of the other replicas too if `inDoubt` says the replica has no leader or its
    /// leader's link is suspect. A local failure that is this replica's own (damaged, stopped, no
    /// replica) asks them at once; one that may be load (`.unavailable`: a full waiter table, no read
    /// index in time) only when `inDoubt`, so a healthy replica shedding load does not pass it on. The
    /// first success wins; a failure every replica would give (`settles`: a local `.invalid` or
    /// `.read(.compacted)`) ends the race; otherwise this replica's failure when both failed. At most
    /// one extra read per read. Reads are safe to ask twice; the slower answer is dropped (its replica
    /// keeps the waiter until its own deadline).
    static func hedged<T: Sendable>(
        timeout: Duration, after: Duration, inDoubt: @escaping @Sendable () -> Bool,
        local: @escaping @Sendable (Duration) async -> Result<T, ReadFailure>,
        remote: @escaping @Sendable (Duration) async -> Result<T, ReadFailure>
    ) async -> Result<T, ReadFailure> {
        let until = ContinuousClock.now + timeout
        let race = ReadRace<T>()
        return await withCheckedContinuation { c in
            race.start(c)
            let askRemote: @Sendable () -> Void = {
                guard race.claimSecond() else { return }
                HedgedReads.asked.increment()
                Task {
                    let r = await remote(max(.milliseconds(1), until - ContinuousClock.now))
                    if race.offer(r, local: false), case .success = r { HedgedReads.answered.increment() }
                }
            }
            Self.hedgeCheck(at: ContinuousClock.now + after, every: after, until: until, race: race, inDoubt: inDoubt, ask: askRemote)
            Task {
                let r = await local(timeout)
                if case .failure(let f) = r {
                    switch ReadRace<T>.kind(f) {
                    case .settles: break
                    case .replica: askRemote()
                    case .maybeLoad: if inDoubt() { askRemote() }
                    }
                }
                race.offer(r, local: true)
            }
        }
    }

    /// `hedged` for a read this node's replica of `shard` serves, with the config's longest election
    /// timeout and `leaderInDoubt`.
    func hedged<T: Sendable>(
        _ shard: ShardID, timeout: Duration = .seconds(5),
        local: @escaping @Sendable (Duration) async -> Result<T, ReadFailure>,
        remote: @escaping @Sendable (Duration) async -> Result<T, ReadFailure>
    ) async -> Result<T, ReadFailure> {
        await Self.hedged(
            timeout: timeout, after: .milliseconds(config.raft.electionTimeoutMaxMs), inDoubt: { [weak self] in self?.leaderInDoubt(shard) ?? false },
            local: local, remote: remote)
    }

    /// A messaging query at the leader's read point, with the index this replica answered it at: on this
    /// node's replica, hedged to the others (their answer comes with index 0: not this replica's).
    func linearizableHere<T: Sendable>(
        _ shard: ShardID, _ q: MessagingQuery, _ body: @escaping @Sendable (MessagingMachine, LogIndex) -> T,
        elsewhere: @escaping @Sendable (MessagingQuery.Answer) -> T
    ) async -> Result<T, ReadFailure> {
        await hedged(
            shard, local: { t in await self.query(shard: shard, consistency: .linearizable, timeout: t, body) },
            remote: { t in
                switch await self.askRemote(shard, q, at: .linearizable, timeout: t) {
                case .success(let a?): .success(elsewhere(a))
                case .success(nil): .failure(.unavailable("shard \(shard): no answer"))
                case .failure(let f): .failure(f)
                }
            })
    }

    /// Asks the other replicas at `at` if `inDoubt`, else checks again `every` later, until `until`
    /// (a replica can lose its leader after the read began); each pending check is the race's to cancel.
    static func hedgeCheck<T: Sendable>(
        at: ContinuousClock.Instant, every: Duration, until: ContinuousClock.Instant, race: ReadRace<T>,
        inDoubt: @escaping @Sendable () -> Bool, ask: @escaping @Sendable () -> Void
    ) {
        guard at < until else { return }
        race.arm(
            Deadlines.shared.schedule(at) {
                if inDoubt() {
                    ask()
                } else {
                    hedgeCheck(at: ContinuousClock.now + every, every: every, until: until, race: race, inDoubt: inDoubt, ask: ask)
                }
            })
    }

    /// Whether this node's replica of `shard` may be cut off from its leader: it knows none, or the link
    /// to the one it knows is suspect (`hedged`). A replica that leads says no: it steps down when it
    /// loses its quorum, and then knows none.
    func leaderInDoubt(_ shard: ShardID) -> Bool {
        guard let e = localLeader.withLockedValue({ $0[shard] }) else { return false }
        if e.since != nil { return true }
        guard let l = e.last, l != id else { return false }
        return transport.suspect(l)
    }

    /// `ask` on the other nodes holding `shard`.
    func askRemote(_ shard: ShardID, _ q: MessagingQuery, at point: ReadPoint, timeout: Duration) async -> Result<MessagingQuery.Answer?, ReadFailure> {
        // Another node's replica could be cut off from its shard's quorum without knowing it: what is
        // asked elsewhere "as current" is asked at the leader's read point (the replica here can also
        // have left the node's table since the caller looked: a storage failure).
        let asked: ReadPoint = point == .localCurrent ? .linearizable : point
        let answer = await remote(shard, timeout: timeout) { .stateQuery(request: Envelope.RequestID(incarnation: 0, sequence: 0), consistency: asked.encode(), query: q.encode()) }
        switch answer {
        case .success(let b):
            if b == [1] { return .success(nil) }
            guard b.first == 0, let a = MessagingQuery.Answer.decode(Array(b.dropFirst())) else { return .failure(.unavailable("a malformed state answer")) }
            return .success(a)
        case .failure(let f): return .failure(f)
        }
    }

    /// `ask` on this node's replica, never sent on.
    func askLocal(_ shard: ShardID, _ q: MessagingQuery, at point: ReadPoint, timeout: Duration) async -> Result<MessagingQuery.Answer?, ReadFailure> {
        await query(shard: shard, consistency: point.consistency, timeout: timeout, caughtUp: point == .localCurrent) { m, _ in q.answer(m) }
    }

    /// Whether this node's replica answers a read at `point` itself. Not when it has none, nor — for
    /// anything but `.local` — when it has known no leader for longer than an election: it is cut off
    /// from its leader (a partition between those two only, Docs/replication.md, "Forwarding through
    /// another node"), so it would wait in vain for the leader's read point, or answer "current" from a
    /// state it can no longer know is. Such reads go to the other replicas first (through a third node
    /// when the leader cannot be reached), and to this one for the time left (`routed`).
    func localServes(_ shard: ShardID, _ point: ReadPoint) -> Bool {
        point == .local ? runner(shard) != nil : servesSessions(shard)
    }

    /// `read`, on this node's replica or on a node that holds one.
    public func readAnywhere(shard: ShardID, _ q: ReadQuery, consistency point: ReadPoint, timeout: Duration = .seconds(5)) async -> Result<ReadResult, ReadFailure> {
        await routed(
            shard, point, timeout: timeout, local: { await self.read(shard: shard, q, consistency: point.consistency, timeout: $0) },
            remote: { await self.readRemote(shard: shard, q, consistency: point, timeout: $0) })
    }

    /// `read` on the other nodes holding `shard`.
    func readRemote(shard: ShardID, _ q: ReadQuery, consistency point: ReadPoint, timeout: Duration) async -> Result<ReadResult, ReadFailure> {
        let answer = await remote(shard, timeout: timeout) {
            .readForward(request: Envelope.RequestID(incarnation: 0, sequence: 0), consistency: point.encode(), query: ReadPoint.encodeQuery(q))
        }
        switch answer {
        case .success(let b): return ReadPoint.decodeResult(b) ?? .failure(.unavailable("a malformed read answer"))
        case .failure(let f): return .failure(f)
        }
    }

    /// Sends a query to nodes holding `shard` (the known leader first, then the others by node id, one
    /// that last left a forward unanswered at the end) until one answers. The first gets half of
    /// `timeout` when others follow, and each later one but the last an equal share of what is left, so
    /// a paused or cut-off node cannot use all of it, while a slow but healthy leader still has most of
    /// the time (a query is safe to ask again elsewhere).
    func remote(_ shard: ShardID, timeout: Duration, _ envelope: () -> Envelope) async -> Result<[UInt8], ReadFailure> {
        let deadline = ContinuousClock.now + timeout
        var targets = config.replicas(of: shard).sorted().filter { $0 != id }
        if let l = leaderHints.withLockedValue({ $0.leader(of: shard) }), l != id, let k = targets.firstIndex(of: l) {
            targets.remove(at: k)
            targets.insert(l, at: 0)
        }
        if let suspect = unanswering.withLockedValue({ $0[shard] }), let k = targets.firstIndex(of: suspect) {
            targets.remove(at: k)
            targets.append(suspect)
        }
        var last = "no node holds shard \(shard)"
        // A second pass while time is left: a node that went quiet answers at once (`failFast`), and asked
        // again the query goes through a third node.
        for (k, t) in (targets + targets).enumerated() where ContinuousClock.now < deadline {
            let k = k % max(1, targets.count)
            let left = targets.count - k
            let share = k == 0 ? (deadline - ContinuousClock.now) / 2 : (deadline - ContinuousClock.now) / left
            let until = left == 1 ? deadline : ContinuousClock.now + share
            // A query is safe to ask again: one sent to a node that goes quiet moves on at once.
            switch await forwarder.send(to: t, shard: shard, envelope(), deadline: until, failFast: true) {
            case .bytes(let b):
                unanswering.withLockedValue { if $0[shard] == t { $0[shard] = nil } }
                return .success(b)
            case .invalid(let why): return .failure(.invalid(why))
            case .outcomeUnknown(let why):
                // No answer in its share: paused or cut off, perhaps the leader the hint names.
                unanswering.withLockedValue { $0[shard] = t }
                leaderHints.withLockedValue { $0.forget(shard, t) }
                last = "node \(t): \(why)"
            case let other: last = "node \(t): \(other)"
            }
        }
        return .failure(.unavailable(last))
    }

    /// A peer's state query, answered from this node's replica.
    func answerStateQuery(_ request: Envelope.RequestID, from: NodeID, shard: ShardID, consistency c: [UInt8], query: [UInt8]) {
        let reply = replier(to: from, shard: shard, request: request)
        guard let point = ReadPoint.decode(c), let q = MessagingQuery.decode(query) else { return reply(.invalid("malformed state query")) }
        guard runner(shard) != nil else { return reply(.failed("shard \(shard) is not on node \(id)")) }
        // Answered here or not at all (never sent on: two replicas without a leader would pass it back
        // and forth); a replica without a leader for long says so at once, and the asker tries another.
        guard localServes(shard, point) else { return reply(.failed("node \(id)'s replica of shard \(shard) has known no leader for a while")) }
        Task {
            switch await askLocal(shard, q, at: point, timeout: .seconds(4)) {
            case .success(let a?): reply(.bytes([0] + a.encode()))
            case .success(nil): reply(.bytes([1]))
            case .failure(.invalid(let why)): reply(.invalid(why))
            case .failure(let f): reply(.failed("\(f)"))
            }
        }
    }

    /// A peer's read, answered from this node's replica.
    func answerRead(_ request: Envelope.RequestID, from: NodeID, shard: ShardID, consistency c: [UInt8], query: [UInt8]) {
        let reply = replier(to: from, shard: shard, request: request)
        guard let point = ReadPoint.decode(c), let q = ReadPoint.decodeQuery(query) else { return reply(.invalid("malformed read")) }
        guard runner(shard) != nil else { return reply(.failed("shard \(shard) is not on node \(id)")) }
        guard localServes(shard, point) else { return reply(.failed("node \(id)'s replica of shard \(shard) has known no leader for a while")) }
        Task { reply(ReadPoint.encodeResult(await read(shard: shard, q, consistency: point.consistency, timeout: .seconds(4)))) }
    }
}

/// Two reads of the same thing, the first answer kept (`WeftNode.hedged`).
final class ReadRace<T: Sendable>: Sendable {
    typealias Answer = Result<T, WeftNode.ReadFailure>
    struct State {
        var continuation: CheckedContinuation<Answer, Never>?
        /// Reads asked whose answer has not come.
        var outstanding = 1
        var secondAsked = false
        var localFailure: Answer?
        /// The hedge's pending check, cancelled when the race ends.
        var timer: UInt64?
    }
    let state = NIOLockedValueBox(State())

    enum Kind { case settles, replica, maybeLoad }

    /// What a local failure says: one every replica would give (ends the race), one of this replica's
    /// own (ask the others), or one that may be load (ask them only if the replica may be cut off).
    static func kind(_ f: WeftNode.ReadFailure) -> Kind {
        switch f {
        case .invalid, .read(.compacted): .settles
        case .noReplica, .read(.damaged), .read(.unavailable): .replica
        case .unavailable: .maybeLoad
        }
    }

    func start(_ c: CheckedContinuation<Answer, Never>) {
        state.withLockedValue { $0.continuation = c }
    }

    /// Keeps `timer` to cancel when the race ends (at once if it has).
    func arm(_ timer: UInt64) {
        let ended = state.withLockedValue { s -> Bool in
            if s.continuation == nil { return true }
            s.timer = timer
            return false
        }
        if ended { Deadlines.shared.cancel(timer) }
    }

    /// Whether the second read is to be asked now: not yet asked, and no answer kept yet.
    func claimSecond() -> Bool {
        state.withLockedValue { s in
            guard s.continuation != nil, !s.secondAsked else { return false }
            s.secondAsked = true
            s.outstanding += 1
            return true
        }
    }

    /// Whether `r` (from this replica when `local`) ended the race.
    @discardableResult
    func offer(_ r: Answer, local: Bool) -> Bool {
        let done = state.withLockedValue { s -> (CheckedContinuation<Answer, Never>, Answer, UInt64?)? in
            guard let c = s.continuation else { return nil }
            s.outstanding -= 1
            var answer = r
            if case .failure(let f) = r {
                if local, Self.kind(f) == .settles {
                    // Every replica would say so.
                } else {
                    if local { s.localFailure = r }
                    // The other read may still answer.
                    if s.outstanding > 0 { return nil }
                    answer = s.localFailure ?? r
                }
            }
            s.continuation = nil
            defer { s.timer = nil }
            return (c, answer, s.timer)
        }
        guard let (c, answer, timer) = done else { return false }
        if let timer { Deadlines.shared.cancel(timer) }
        c.resume(returning: answer)
        return true
    }
}

/// Reads asked of the other replicas too (`WeftNode.hedged`), and those the other replicas answered first.
enum HedgedReads {
    static let asked = Counter(label: "weft_reads_hedged_total", dimensions: [("result", "asked")])
    static let answered = Counter(label: "weft_reads_hedged_total", dimensions: [("result", "answered_elsewhere")])
}
