import Foundation
import Logging
import Raft
import SegmentStore
import WeftCore

/// A shard's state, for `/api/v1/cluster/status`.
public struct ShardStatus: Sendable, Equatable {
    public var shard: ShardID
    public var node: NodeID
    public var role: String
    public var leader: NodeID?
    public var term: Term
    public var commitIndex: LogIndex
    public var appliedIndex: LogIndex
    public var lastIndex: LogIndex
    /// On the leader: every replica's match index.
    public var matchIndexes: [NodeID: LogIndex]
    /// The group as this replica has applied it.
    public var voters: [NodeID]
    public var learners: [NodeID]
    /// Not voting until its log, cut back after damage, has caught up.
    public var recovering: Bool = false
    /// Repairs since the replica opened, and the last events (what was found, what was done).
    public var repairs: Int = 0
    public var repairEvents: [String] = []
    /// Set when this node's replica is not running (it could not open, or stopped): why.
    public var failure: String?
    /// What the replica did since it opened.
    public var stats = ReplicaStats()

    /// The status of a replica that is not running.
    public static func unavailable(_ shard: ShardID, node: NodeID, _ why: String) -> ShardStatus {
        ShardStatus(
            shard: shard, node: node, role: "stopped", leader: nil, term: 0, commitIndex: 0, appliedIndex: 0, lastIndex: 0,
            matchIndexes: [:], voters: [], learners: [], failure: why)
    }
}

/// A read of a replica's committed records.
public enum ReadQuery: Sendable {
    /// Records in log order from `from`.
    case log(from: LogIndex, limit: Int)
    /// Records of one stream with seq >= `fromSeq`, in seq order.
    case stream(StreamID, fromSeq: StreamSeq, limit: Int)
}

public enum ReadError: Error, Equatable, Sendable {
    /// The range is below the log's first index (dropped by retention).
    case compacted(first: LogIndex)
    /// This replica's copy is damaged (it is being repaired): read another replica.
    case damaged(String)
    /// The replica is not running (shutting down, or stopped after a storage failure).
    case unavailable(String)
}

/// Runs one `ShardReplica` on a thread of its own: an inbox of inputs (peer messages, proposals, reads),
/// a tick timer, and group commit — every input that arrived while the previous batch was being
/// persisted is stepped together, then persisted with one write and one fdatasync, then the messages go.
///
/// `@unchecked Sendable`: the inbox and `stopped` are guarded by `condition`; the replica is touched only
/// by the runner's thread.
public final class ShardRunner: @unchecked Sendable {
    public enum Input {
        case message(Message)
        case propose([Proposal], @Sendable (Result<[Record], ReplicationError>) -> Void)
        case readIndex(@Sendable (Result<LogIndex, ReplicationError>) -> Void)
        case transferLeadership(NodeID)
        case configChange(ConfigChange, @Sendable (Result<LogIndex, ReplicationError>) -> Void)
        case status(@Sendable (ShardStatus) -> Void)
        case read(ReadQuery, @Sendable (Result<(records: [Record], commit: LogIndex), ReadError>) -> Void)
        case campaign
        /// Part of a file the leader ships for catch-up `transfer`; `ack` gets the bytes of the file
        /// now staged (nil: refused, as from an older transfer or term; false: it could not be written).
        case stageFile(transfer: UInt64, name: String, offset: UInt64, bytes: [UInt8], ack: @Sendable (_ received: UInt64?, _ ok: Bool) -> Void)
        /// The shipper's news about a catch-up this replica started as leader.
        case catchUpReport(to: NodeID, transfer: UInt64, failed: Bool)
    }

    let replica: ShardReplica
    let send: @Sendable ([Message]) -> Void
    let tick: Duration
    let logger: Logger
    let condition = NSCondition()
    var inbox: [Input] = []
    var stopped = false
    /// Why the runner stopped, when it was not asked to (a storage failure).
    var stopReason: String?
    var thread: Thread?
    let finished = NSCondition()
    var done = false

    public init(replica: ShardReplica, tick: Duration, logger: Logger, send: @escaping @Sendable ([Message]) -> Void) {
        self.replica = replica
        self.tick = tick
        self.logger = logger
        self.send = send
    }

    public func start() {
        let t = Thread { [self] in self.loop() }
        t.name = "weft-shard-\(replica.shard)"
        finished.lock()
        thread = t
        finished.unlock()
        t.start()
    }

    /// Thread-safe; never blocks on IO.
    public func submit(_ input: Input) {
        condition.lock()
        if stopped {
            let why = stopReason ?? "shard \(replica.shard) is stopping"
            condition.unlock()
            fail(input, why)
            return
        }
        inbox.append(input)
        condition.signal()
        condition.unlock()
    }

    /// Answers an input the replica never took: nothing of it reached Raft, so a write is safe to retry.
    func fail(_ input: Input, _ why: String) {
        switch input {
        case .propose(_, let cb): cb(.failure(.unavailable(why)))
        case .readIndex(let cb): cb(.failure(.unavailable(why)))
        case .configChange(_, let cb): cb(.failure(.unavailable(why)))
        case .read(_, let cb): cb(.failure(.unavailable(why)))
        case .status(let cb): cb(.unavailable(replica.shard, node: replica.id, why))
        default: break
        }
    }

    /// How long `stop` waits for the shard thread to finish its current turn (an fdatasync on a sick disk
    /// can take longer: then the process exits without it, and recovery at the next open covers it).
    public static let stopWaitMax: Duration = .seconds(5)

    /// Stops the thread after the current turn and closes the store; returns within `stopWaitMax`
    /// whatever the thread is doing (false if it had not finished by then).
    @discardableResult
    public func stop() -> Bool {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
        let end = Date(timeIntervalSinceNow: Double(Self.stopWaitMax.components.seconds))
        finished.lock()
        defer { finished.unlock() }
        while !done && thread != nil {
            if !finished.wait(until: end) { break }
        }
        if !done && thread != nil {
            logger.error("shard \(replica.shard): the shard thread did not finish its turn within \(Self.stopWaitMax); not waiting longer")
        }
        return done || thread == nil
    }

    func loop() {
        let clock = ContinuousClock()
        var nextTick = clock.now + tick
        var more = false
        while true {
            condition.lock()
            while inbox.isEmpty && !stopped && !more && clock.now < nextTick {
                let left = nextTick - clock.now
                let secs = Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18
                _ = condition.wait(until: Date(timeIntervalSinceNow: max(secs, 0)))
            }
            let batch = inbox
            inbox = []
            let stop = stopped
            condition.unlock()
            if stop {
                for i in batch { fail(i, "shard \(replica.shard) is stopping") }
                break
            }
            if !batch.isEmpty {
                replica.stats.wakeups += 1
                replica.stats.inputs += UInt64(batch.count)
            }
            // Proposals that arrived together become one Raft proposal (one append per follower, one
            // entry run in the next fdatasync), each request still answered on its own.
            var group: [(proposals: [Proposal], done: (Result<[Record], ReplicationError>) -> Void)] = []
            for input in batch {
                if case .propose(let ps, let cb) = input {
                    group.append((ps, { cb($0) }))
                    continue
                }
                if !group.isEmpty {
                    replica.proposeGroup(group)
                    group = []
                }
                handle(input)
            }
            if !group.isEmpty { replica.proposeGroup(group) }
            if clock.now >= nextTick {
                replica.tick()
                replica.scrub()
                nextTick = clock.now + tick
            }
            do {
                try replica.process(send: send)
                more = replica.hasPendingWork
            } catch {
                // The store refuses writes after an IO failure, or committed entries stayed unreadable:
                // stop serving this shard (the node serves its others).
                logger.critical("shard \(replica.shard): storage failed, stopping the replica: \(error)")
                condition.lock()
                stopped = true
                stopReason = "shard \(replica.shard) stopped after a storage failure: \(error)"
                let rest = inbox
                inbox = []
                condition.unlock()
                for i in rest { fail(i, "shard \(replica.shard) stopped after a storage failure: \(error)") }
                break
            }
        }
        replica.close()
        finished.lock()
        done = true
        finished.broadcast()
        finished.unlock()
    }

    func handle(_ input: Input) {
        switch input {
        case .message(let m): replica.step(m)
        case .propose(let ps, let cb): replica.propose(ps) { cb($0) }
        case .readIndex(let cb): replica.readIndex { cb($0) }
        case .transferLeadership(let to): replica.raftTransfer(to)
        case .configChange(let c, let cb): replica.proposeConfig(c) { cb($0) }
        case .status(let cb): cb(replica.status())
        case .read(let q, let cb): cb(replica.read(q))
        case .campaign: replica.campaign()
        case .stageFile(let transfer, let name, let offset, let bytes, let ack):
            do {
                if try replica.stage(transfer: transfer, name: name, offset: offset, bytes: bytes) {
                    ack(offset + UInt64(bytes.count), true)
                } else {
                    ack(nil, true)
                }
            } catch {
                logger.error("shard \(replica.shard): cannot stage \(name) for catch-up: \(error)")
                ack(offset, false)
            }
        case .catchUpReport(let to, let transfer, let failed):
            replica.reportCatchUp(to: to, transfer: transfer, failed: failed)
        }
    }
}

extension ShardReplica {

    public func status() -> ShardStatus {
        ShardStatus(
            shard: shard, node: id, role: raft.membership.all.contains(id) ? raft.role.rawValue : "not a member", leader: raft.leader, term: raft.term, commitIndex: raft.commit,
            appliedIndex: raft.applied, lastIndex: raft.lastIndex, matchIndexes: raft.matchIndexes,
            voters: raft.membership.voters.sorted(), learners: raft.membership.learners.sorted(),
            recovering: raft.recovering, repairs: repairs, repairEvents: Array(repairEvents.suffix(10)), stats: stats)
    }

    /// Committed records only (up to the applied index), checked block by block as they are read; a
    /// damaged block is never served (the replica repairs itself on its next turn).
    public func read(_ q: ReadQuery) -> Result<(records: [Record], commit: LogIndex), ReadError> {
        let upTo = raft.applied
        do {
            switch q {
            case .log(let from, let limit):
                guard from >= store.firstIndex || from > upTo else { return .failure(.compacted(first: store.firstIndex)) }
                guard from <= upTo else { return .success(([], upTo)) }
                return .success((try store.read(from: from, to: upTo, limit: limit), upTo))
            case .stream(let s, let fromSeq, let limit):
                var out = try store.readStream(s, fromSeq: fromSeq, limit: limit)
                if let k = out.firstIndex(where: { $0.index > upTo }) { out.removeSubrange(k...) }
                return .success((out, upTo))
            }
        } catch StoreError.outOfRange(_, let first, _) {
            return .failure(.compacted(first: first))
        } catch {
            return .failure(.damaged("\(error)"))
        }
    }
}
