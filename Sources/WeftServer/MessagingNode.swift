import Foundation
import Messaging
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
        if record.type == .messaging {
            return InboxRelay.derive(record, source: source, shards: shards).map {
                ($0.shard, Proposal(stream: $0.stream, type: .messaging, timestampMicros: record.timestampMicros, payload: $0.payload))
            }
        }
        return fanout.derive(record, source: source)
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
        if case .failure(let f) = await waitApplied(shard: shard, runner: r, consistency: consistency, deadline: ContinuousClock.now + timeout) {
            return .failure(f)
        }
        let answer: QueryAnswer<T> = await withCheckedContinuation { c in
            r.submit(
                .query { state in
                    guard let (machine, applied, current) = state else { return c.resume(returning: .notRunning) }
                    guard let m = machine as? MessagingMachine else { return c.resume(returning: .notMessaging) }
                    if caughtUp && !current { return c.resume(returning: .behind) }
                    c.resume(returning: .value(body(m, applied)))
                })
        }
        switch answer {
        case .notRunning: return .failure(.unavailable("the replica of shard \(shard) on node \(id) is not running"))
        case .notMessaging: return .failure(.unavailable("shard \(shard) does not run the messaging state machine"))
        case .behind: return .success(nil)
        case .value(let v): return .success(v)
        }
    }
}

/// What a state query on a shard's thread gave.
enum QueryAnswer<T: Sendable>: Sendable {
    case notRunning, notMessaging, behind
    case value(T)
}
