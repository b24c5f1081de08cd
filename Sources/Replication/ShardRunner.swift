import Foundation
import Logging
import Raft
import SegmentStore
import ShardState
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
    /// The first index its log holds (above 1 once retention dropped segments), and the shard's applied
    /// retention mark (Docs/state.md, "Retention").
    public var firstIndex: LogIndex = 1
    public var retainThrough: LogIndex = 0

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

/// Runs one `ShardReplica`: an inbox of inputs (peer messages, proposals, reads), a tick timer, and group
/// commit — every input that arrived while the previous batch was being persisted is stepped together,
/// then persisted with one write and one fdatasync, then the messages go.
///
/// The turns run on a `DriverLane`: a thread that drives several replicas (those of one node share a
/// few lanes), so one wake-up serves every replica with new input, instead of a thread per replica.
///
/// `@unchecked Sendable`: the inbox and the stop flags are guarded by `condition`; the replica is touched
/// only by its lane's thread.
public final class ShardRunner: @unchecked Sendable {
    public enum Input {
        case message(Message)
        /// Records to propose; the callback gets each one's record and apply outcome once applied.
        case propose([Proposal], @Sendable (Result<[Applied], ReplicationError>) -> Void)
        case readIndex(@Sendable (Result<LogIndex, ReplicationError>) -> Void)
        case transferLeadership(NodeID)
        case configChange(ConfigChange, @Sendable (Result<LogIndex, ReplicationError>) -> Void)
        case status(@Sendable (ShardStatus) -> Void)
        /// A read of a replica that has applied at least `atLeast` (else `unavailable`: it was reset by a
        /// repair since the caller waited for that index).
        case read(ReadQuery, atLeast: LogIndex, @Sendable (Result<ReadResult, ReadError>) -> Void)
        /// Records under a client's request key: written once, whatever the retries (`proposeKeyed`).
        case proposeKeyed([UInt8], [Proposal], deadline: ContinuousClock.Instant?, @Sendable (Result<KeyedResult, ReplicationError>) -> Void)
        /// A relay batch from another shard, on this (destination) shard's leader.
        case proposeRelayBatch(RelayMarks.Header, [Proposal], deadline: ContinuousClock.Instant?, @Sendable (Result<RelayResult, ReplicationError>) -> Void)
        /// Answers once this replica has applied `index` (a read that must see a write, or a read index).
        /// `token` (0: none) names it for `cancelWaiter`.
        case whenApplied(LogIndex, token: UInt64, @Sendable (Result<LogIndex, ReplicationError>) -> Void)
        /// Drops a `whenApplied` waiter whose caller stopped waiting.
        case cancelWaiter(UInt64)
        case campaign
        /// Runs `body` on the shard's thread with the applied state, the applied index, and whether the
        /// replica has applied everything it knows committed and is not repairing (nil: the replica is not
        /// running). `body` must be quick: it holds up the shard.
        case query(@Sendable ((any ShardStateMachine, LogIndex, Bool)?) -> Void)
        /// Part of a file the leader ships for catch-up `transfer`; `ack` gets the bytes of the file
        /// now staged (nil: refused, as from an older transfer or term; false: it could not be written).
        case stageFile(transfer: UInt64, name: String, offset: UInt64, bytes: [UInt8], ack: @Sendable (_ received: UInt64?, _ ok: Bool) -> Void)
        /// The shipper's news about a catch-up this replica started as leader.
        case catchUpReport(to: NodeID, transfer: UInt64, failed: Bool)
    }

    let replica: ShardReplica
    let send: @Sendable ([Message]) -> Void
    let logger: Logger
    public let lane: DriverLane
    let condition = NSCondition()
    var inbox: [Input] = []
    var stopped = false
    /// Why the runner stopped, when it was not asked to (a storage failure).
    var stopReason: String?
    let finished = NSCondition()
    /// `closing`: a thread has begun closing the replica (only one ever does); `done`: it is closed.
    var closing = false
    var done = false
    /// Guarded by `condition`, with `stopped`.
    var started = false
    /// The replica had work left after its last turn (the lane runs it again before waiting).
    var more = false
    /// Told (once, on the lane's thread, after the replica is closed) why the replica stopped when a
    /// storage failure stopped it: its node then serves the shard as one without a replica.
    let onStorageFailure: (@Sendable (String) -> Void)?

    /// `lane`: the thread that drives it (nil: a lane of its own, ticking every `tick`).
    public init(
        replica: ShardReplica, tick: Duration, logger: Logger, lane: DriverLane? = nil,
        onStorageFailure: (@Sendable (String) -> Void)? = nil, send: @escaping @Sendable ([Message]) -> Void
    ) {
        self.onStorageFailure = onStorageFailure
        self.replica = replica
        self.lane = lane ?? DriverLane(name: "lane-shard-\(replica.shard)", tick: tick)
        self.logger = logger
        self.send = send
    }

    public func start() {
        condition.lock()
        // Stopped before it started (a shutdown racing a join): it never runs.
        if stopped || started {
            condition.unlock()
            return
        }
        started = true
        condition.unlock()
        lane.add(self)
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
        condition.unlock()
        lane.wake(self)
    }

    /// Answers an input the replica never took: nothing of it reached Raft, so a write is safe to retry.
    func fail(_ input: Input, _ why: String) {
        switch input {
        case .propose(_, let cb): cb(.failure(.unavailable(why)))
        case .readIndex(let cb): cb(.failure(.unavailable(why)))
        case .configChange(_, let cb): cb(.failure(.unavailable(why)))
        case .read(_, _, let cb): cb(.failure(.unavailable(why)))
        case .whenApplied(_, _, let cb): cb(.failure(.unavailable(why)))
        case .proposeKeyed(_, _, _, let cb): cb(.failure(.unavailable(why)))
        case .proposeRelayBatch(_, _, _, let cb): cb(.failure(.unavailable(why)))
        case .status(let cb): cb(.unavailable(replica.shard, node: replica.id, why))
        case .query(let cb): cb(nil)
        default: break
        }
    }

    /// How long `stop` waits for the lane to finish the replica's current turn (an fdatasync on a sick
    /// disk can take longer: then the process exits without it, and recovery at the next open covers it).
    public static let stopWaitMax: Duration = .seconds(5)

    /// Stops the replica after its current turn and closes the store; returns within `stopWaitMax`
    /// whatever the lane is doing (false if it had not finished by then).
    @discardableResult
    public func stop() -> Bool {
        requestStop()
        return waitStopped(until: Date(timeIntervalSinceNow: Double(Self.stopWaitMax.components.seconds)))
    }

    /// The first half of `stop`: the replica stops after its current turn (a node stops all its replicas
    /// this way, then waits for them together).
    public func requestStop() {
        condition.lock()
        stopped = true
        let wasStarted = started
        condition.unlock()
        if wasStarted {
            lane.wake(self)
        } else {
            // Never driven (and now never will be): close it here.
            finishStop("shard \(replica.shard) is stopping")
        }
    }

    /// Waits until the replica is closed or `end` passes; true if it is closed.
    @discardableResult
    public func waitStopped(until end: Date) -> Bool {
        finished.lock()
        defer { finished.unlock() }
        while !done {
            if !finished.wait(until: end) { break }
        }
        if !done {
            logger.error("shard \(replica.shard): the shard's lane did not finish its turn within \(Self.stopWaitMax); not waiting longer")
        }
        return done
    }

    /// Fails what is left, closes the replica, and tells `stop` (once).
    func finishStop(_ why: String) {
        finished.lock()
        if closing {
            finished.unlock()
            return
        }
        closing = true
        finished.unlock()
        condition.lock()
        let rest = inbox
        inbox = []
        condition.unlock()
        for i in rest { fail(i, why) }
        replica.close()
        finished.lock()
        done = true
        finished.broadcast()
        finished.unlock()
        lane.remove(self)
    }

    /// One turn on the lane's thread: the inputs that arrived, a tick when due, then the driver.
    func turn(tickDue: Bool, scrub: Bool = false) {
        condition.lock()
        let batch = inbox
        inbox = []
        let stop = stopped
        condition.unlock()
        finished.lock()
        let isDone = done
        finished.unlock()
        if isDone { return }
        if stop {
            for i in batch { fail(i, "shard \(replica.shard) is stopping") }
            finishStop(stopReason ?? "shard \(replica.shard) is stopping")
            return
        }
        if !batch.isEmpty {
            replica.stats.wakeups += 1
            replica.stats.inputs += UInt64(batch.count)
        }
        // Proposals that arrived together become one Raft proposal (one append per follower, one
        // entry run in the next fdatasync), each request still answered on its own.
        var group: [(proposals: [Proposal], done: (Result<[Applied], ReplicationError>) -> Void)] = []
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
        if tickDue { replica.tick() }
        if scrub { replica.scrub() }
        do {
            try replica.process(send: send, deferSync: lane.sharedFlush)
            more = replica.hasPendingWork
        } catch {
            storageFailed(error)
        }
    }

    /// The replica is closed (stopped, or failed).
    var isDone: Bool {
        finished.lock()
        defer { finished.unlock() }
        return done
    }

    /// After the lane's shared flush (`DriverLane.loop`): the rest of a turn that left entries to sync.
    func finishDeferredSync() {
        guard !isDone else { return }
        do {
            try replica.finishDeferredSync(send: send)
            more = replica.hasPendingWork
        } catch {
            storageFailed(error)
        }
    }

    /// The store refuses writes after an IO failure, or committed entries stayed unreadable: stop
    /// serving this shard (the node serves its others).
    func storageFailed(_ error: any Error) {
        logger.critical("shard \(replica.shard): storage failed, stopping the replica: \(error)")
        let why = "shard \(replica.shard) stopped after a storage failure: \(error)"
        condition.lock()
        let first = stopReason == nil
        stopped = true
        stopReason = why
        condition.unlock()
        more = false
        finishStop(why)
        if first { onStorageFailure?(why) }
    }

    func handle(_ input: Input) {
        switch input {
        case .message(let m): replica.step(m)
        case .propose(let ps, let cb): replica.proposeApplied(ps) { cb($0) }
        case .readIndex(let cb): replica.readIndex { cb($0) }
        case .transferLeadership(let to): replica.raftTransfer(to)
        case .configChange(let c, let cb): replica.proposeConfig(c) { cb($0) }
        case .status(let cb): cb(replica.status())
        case .read(let q, let atLeast, let cb):
            guard replica.lastApplied >= atLeast else {
                return cb(.failure(.unavailable("the replica applied \(replica.lastApplied) of \(atLeast) (reset by a repair since the read waited)")))
            }
            cb(replica.read(q))
        case .whenApplied(let index, let token, let cb): replica.whenApplied(index, token: token) { cb($0) }
        case .cancelWaiter(let token): replica.cancelWaiter(token)
        case .proposeKeyed(let key, let ps, let deadline, let cb): replica.proposeKeyed(key, ps, deadline: deadline) { cb($0) }
        case .proposeRelayBatch(let h, let ps, let deadline, let cb): replica.proposeRelayBatch(h, ps, deadline: deadline) { cb($0) }
        case .campaign: replica.campaign()
        case .query(let cb): cb((replica.machine, replica.lastApplied, replica.isCaughtUp))
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

/// A thread that drives several `ShardRunner`s: it sleeps until one has input (or work left, or the
/// tick is due), then gives each of those a turn, in the order they asked. A node runs its replicas on
/// a few lanes (`[raft] driver_threads`), so new input for many shards costs one wake-up, and one
/// replica's turn delays the others on its lane by that much: the batching of one shard's turn extends
/// to the lane's. The turns' appends are made durable together at the end of the round, with one device
/// flush (`SegmentStore.syncTogether`), before any of those turns' answers go.
///
/// `@unchecked Sendable`: everything is guarded by `condition`.
public final class DriverLane: @unchecked Sendable {
    let name: String
    let tick: Duration
    /// The lane's replicas defer their appends' fdatasync to one shared flush per round of turns
    /// (`SegmentStore.syncTogether`, Docs/storage.md "Shared flushes"); false: each syncs its own.
    public let sharedFlush: Bool
    let condition = NSCondition()
    var runners: [ObjectIdentifier: ShardRunner] = [:]
    var ready: [ShardRunner] = []
    var queued: Set<ObjectIdentifier> = []
    var thread: Thread?

    public init(name: String, tick: Duration, sharedFlush: Bool = true) {
        self.name = name
        self.tick = tick
        self.sharedFlush = sharedFlush
    }

    func add(_ r: ShardRunner) {
        condition.lock()
        runners[ObjectIdentifier(r)] = r
        if thread == nil {
            thread = NamedThread.start(name) { [self] in loop() }
        }
        enqueue(r)
        condition.unlock()
    }

    func remove(_ r: ShardRunner) {
        condition.lock()
        runners[ObjectIdentifier(r)] = nil
        condition.unlock()
    }

    /// Under `condition`.
    private func enqueue(_ r: ShardRunner) {
        if queued.insert(ObjectIdentifier(r)).inserted {
            ready.append(r)
            condition.signal()
        }
    }

    func wake(_ r: ShardRunner) {
        condition.lock()
        if runners[ObjectIdentifier(r)] != nil { enqueue(r) }
        condition.unlock()
    }

    func loop() {
        let clock = ContinuousClock()
        var nextTick = clock.now + tick
        // The background scrub reads `scrubBytesPerTick` per tick for one replica of the lane at a time,
        // in turn (a lane with many replicas must not read a MiB for each of them on every tick).
        var scrubTurn = 0
        while true {
            condition.lock()
            while ready.isEmpty && clock.now < nextTick {
                let left = nextTick - clock.now
                let secs = Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18
                _ = condition.wait(until: Date(timeIntervalSinceNow: max(secs, 0)))
            }
            let now = clock.now
            let tickDue = now >= nextTick
            var batch = ready
            ready = []
            queued = []
            var scrubbing: ObjectIdentifier?
            if tickDue {
                // Every replica of the lane ticks, whether it had input or not. The next tick is due
                // one interval after this one was (not after this round's turns and fdatasyncs), so
                // heartbeats keep their pace while the lane is busy.
                nextTick = max(nextTick + tick, now)
                let inBatch = Set(batch.map(ObjectIdentifier.init))
                for (id, r) in runners where !inBatch.contains(id) { batch.append(r) }
                let order = runners.values.sorted { $0.replica.shard < $1.replica.shard }
                if !order.isEmpty {
                    scrubbing = ObjectIdentifier(order[scrubTurn % order.count])
                    scrubTurn &+= 1
                }
            }
            condition.unlock()
            for r in batch { r.turn(tickDue: tickDue, scrub: ObjectIdentifier(r) == scrubbing) }
            // The turns' appends, made durable together, then the rest of those turns.
            let waiting = batch.filter { $0.replica.awaitingSync && !$0.isDone }
            if !waiting.isEmpty {
                ShardReplica.syncTogether(waiting.map(\.replica))
                for r in waiting { r.finishDeferredSync() }
            }
            condition.lock()
            for r in batch where r.more && runners[ObjectIdentifier(r)] != nil { enqueue(r) }
            if runners.isEmpty && ready.isEmpty {
                // Every replica stopped: the thread ends (a runner added later starts another).
                thread = nil
                condition.unlock()
                return
            }
            condition.unlock()
        }
    }
}
