import Foundation
import Raft
import ShardState
import WeftCore

/// What a relay derives from a committed record of its source shard: the records it causes in other
/// shards (an inbox pointer per recipient, a fan-out batch). Deterministic, from the record alone.
public protocol RelayRule: Sendable {
    func derive(_ record: Record, source: ShardID) -> [(destination: ShardID, proposal: Proposal)]
    /// What goes to `destination` only: what a lane needs. The default filters `derive`; a rule whose
    /// records fan out wide (a group message to every member) builds just that part.
    func derive(_ record: Record, source: ShardID, for destination: ShardID) -> [(destination: ShardID, proposal: Proposal)]
    /// Whether what `proposal` derives for its own shard may be written inline: proposed by the leader
    /// right after it, in the same Raft round, instead of by the relay after it commits (Docs/state.md,
    /// "Inline relay records"). Nil (the default): never. Otherwise the streams whose records, proposed
    /// and not applied yet, could change whether apply accepts it: the leader writes inline only when
    /// none of them has any, so apply accepts what it admitted.
    func inlineDependencies(_ proposal: Proposal) -> [StreamID]?
    /// The order `proposal`'s own-shard records keep (for messaging, the conversation's): once a record of
    /// one key goes to the relay, later ones of that key are written inline only after the relay has
    /// written it, so no inbox gets a conversation's entries out of order. Nil (the default): none.
    func inlineOrderKey(_ proposal: Proposal) -> StreamID?
    /// `proposal` as the leader writes it: marked when its inline records follow it (`inline`), so that
    /// the relay knows from the committed record alone to look for them (`hasInline`), deriving the same
    /// records either way; unmarked otherwise (a mark that came with a request is dropped).
    func marked(_ proposal: Proposal, inline: Bool) -> Proposal
    /// Whether a committed record was written with inline records after it.
    func hasInline(_ record: Record) -> Bool
}

extension RelayRule {
    public func inlineDependencies(_ proposal: Proposal) -> [StreamID]? { nil }
    public func inlineOrderKey(_ proposal: Proposal) -> StreamID? { nil }
    public func marked(_ proposal: Proposal, inline: Bool) -> Proposal { proposal }
    public func hasInline(_ record: Record) -> Bool { false }

    public func derive(_ record: Record, source: ShardID, for destination: ShardID) -> [(destination: ShardID, proposal: Proposal)] {
        derive(record, source: source).filter { $0.destination == destination }
    }
}

/// Runs a source shard's relays on its leader (Docs/state.md, "Relays"): one lane per destination shard,
/// each following the source's tail from where the destination says it is, deriving records, and sending
/// them in batches, at most one in flight per destination.
///
/// ```
///  source tail ──poll──▶ lane(B): derive ─▶ batch [first...last] ─send─▶ B's leader: proposeRelayBatch
///                                   ▲                                          │ written / alreadyApplied / stale(mark)
///                                   └──────────── cursor = mark + 1 ◀──────────┘
/// ```
///
/// Exactly-once comes from the destination (`RelayMarks`): a lane may resend anything (after a failure,
/// a restart, a new leader of the source, two leaders' relays at once); the destination writes each range
/// once and answers with its mark, from which the lane continues. A lane starts at `startAt` (the
/// source's applied retention mark + 1: every destination's mark had reached it when it was decided,
/// and marks never go back) and jumps to the mark with the first answer. A slow or unavailable destination holds back only its own
/// lane: the source's writes never wait for a relay.
///
/// `@unchecked Sendable`: the lanes are guarded by `condition`; subscriptions are used only by the
/// runner's thread.
public final class RelayRunner: @unchecked Sendable {
    public typealias Send = @Sendable (
        _ destination: ShardID, _ header: RelayMarks.Header, _ records: [Proposal],
        _ done: @escaping @Sendable (Result<RelayResult, ReplicationError>) -> Void
    ) -> Void

    public let source: ShardID
    let tail: ShardTail
    let rule: any RelayRule
    let send: Send
    let condition = NSCondition()
    var lanes: [ShardID: Lane] = [:]
    var running = false
    var thread: Thread?
    /// Records arrived since the last round (set by the tail's wake-up).
    var dirty = true
    /// Wake-ups within this interval are served by one round (the tail wakes the relay on every applied
    /// batch; the relay polls at most once per interval instead).
    public let coalesce: Duration
    /// Source records read per batch at most.
    public let batchSourceRecordsMax: Int
    /// A range of this many source records that derived nothing for a destination is still sent (an
    /// empty batch), so the destination's mark, where a new relay starts, keeps up.
    public let emptyRangeMax: LogIndex
    /// Pause after a failed send.
    public let retryPause: Duration
    /// A batch carries at most this many derived records and payload bytes (whole source records only;
    /// one source record alone may exceed them).
    public static let batchRecordsMax = 4096
    /// Inline records a source may have at most (`ShardReplica.withInline` writes no more).
    public static let inlineRecordsMax = 4
    public static let batchBytesMax = 8 << 20
    /// A batch unanswered this long is given up and sent again: every send has a deadline (5 s in the
    /// node), so an answer this late was lost; the destination's mark makes the resend safe, and the
    /// lost batch's answer, should it come, is dropped (`Lane.sent`).
    public let inFlightMax: Duration
    /// A lane with source records to relay that has not moved for this long is reported (`log`), and
    /// again at this pace while it stays so.
    public let stallReportAfter: Duration
    /// Where a stalled lane is reported (the node logs it as a warning).
    public var log: @Sendable (String) -> Void {
        get { condition.withLock { logSink } }
        set { condition.withLock { logSink = newValue } }
    }
    var logSink: @Sendable (String) -> Void = { _ in }

    struct Lane {
        /// The next source index to relay.
        var cursor: LogIndex = 1
        var sub: TailSubscription?
        var inFlight = false
        var retryAt: ContinuousClock.Instant?
        /// The destination's mark as last answered.
        var mark: LogIndex = 0
        /// Timestamp of the first record not known relayed (for lag in seconds).
        var oldestPendingMicros: Int64?
        var batches: UInt64 = 0
        var failures: UInt64 = 0
        /// The batch in flight: its first index, when it was sent, and its number (an answer to an
        /// earlier one, given up by `inFlightMax`, is dropped).
        var sentFirst: LogIndex = 0
        var sentAt: ContinuousClock.Instant?
        var sent: UInt64 = 0
        var lastFailure: String?
        /// `relayed` when last seen to move, and when; when the lane was last reported stalled.
        var seenRelayed: LogIndex = 0
        var movedAt = ContinuousClock.now
        var reportedAt: ContinuousClock.Instant?
    }

    /// One destination's relay as seen now.
    public struct LaneStatus: Sendable, Equatable {
        public var destination: ShardID
        /// Source records not relayed yet (applied on the source, past the destination's known mark).
        public var lagRecords: LogIndex
        /// Age of the oldest of them, by the leader's timestamps (0 when none).
        public var lagSeconds: Double
        public var mark: LogIndex
        public var batches: UInt64
        public var failures: UInt64
    }

    public init(
        source: ShardID, tail: ShardTail, destinations: [ShardID], rule: any RelayRule, batchSourceRecordsMax: Int = 1000,
        emptyRangeMax: LogIndex = 4096, retryPause: Duration = .milliseconds(100), coalesce: Duration = .milliseconds(2), startAt: LogIndex = 1,
        inFlightMax: Duration = .seconds(30), stallReportAfter: Duration = .seconds(30),
        send: @escaping Send
    ) {
        self.coalesce = coalesce
        self.inFlightMax = inFlightMax
        self.stallReportAfter = stallReportAfter
        self.source = source
        self.tail = tail
        self.rule = rule
        self.send = send
        // At least a source and its inline records in one poll (the lane decides on them together).
        self.batchSourceRecordsMax = max(Self.inlineRecordsMax + 1, batchSourceRecordsMax)
        self.emptyRangeMax = max(1, emptyRangeMax)
        self.retryPause = retryPause
        let start = max(1, startAt)
        // A lane per destination, the source itself included (the messaging layer writes inbox entries
        // of users homed on the same shard through it).
        for d in Set(destinations) { lanes[d] = Lane(cursor: start, mark: start - 1) }
    }

    public func start() {
        condition.lock()
        defer { condition.unlock() }
        guard !running else { return }
        running = true
        thread = NamedThread.start("relay-\(source)") { [self] in loop() }
    }

    /// Stops after the current step (a batch in flight is answered into the void).
    public func stop() {
        condition.lock()
        running = false
        condition.broadcast()
        condition.unlock()
    }

    /// The lowest index up to which every source record has been relayed to every destination (its
    /// derived records applied there, or it derives nothing for it): retention may drop the source's
    /// entries up to it. Nil without lanes.
    public func lowestMark() -> LogIndex? {
        condition.lock()
        defer { condition.unlock() }
        return lanes.values.map(Self.relayed).min()
    }

    /// Relayed: up to the destination's mark, and past it the ranges that derived nothing for it (skipped,
    /// not sent) while no batch is in flight. (A failed batch put the cursor back to its first index.)
    static func relayed(_ l: Lane) -> LogIndex { l.inFlight ? l.mark : max(l.mark, l.cursor - 1) }

    public func status() -> [LaneStatus] {
        let applied = tail.applied
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        condition.lock()
        defer { condition.unlock() }
        return lanes.keys.sorted { $0.rawValue < $1.rawValue }.compactMap { d in
            guard let l = lanes[d] else { return nil }
            let relayed = Self.relayed(l)
            let lag = applied > relayed ? applied - relayed : 0
            let seconds = lag > 0 ? max(0, Double(now - (l.oldestPendingMicros ?? now)) / 1e6) : 0
            return LaneStatus(destination: d, lagRecords: lag, lagSeconds: seconds, mark: l.mark, batches: l.batches, failures: l.failures)
        }
    }

    func wake() {
        condition.lock()
        if !dirty {
            dirty = true
            condition.signal()
        }
        condition.unlock()
    }

    func loop() {
        // When the last round began: the next waits until `coalesce` after it (a wake-up long after the
        // last round is served at once; a burst of wake-ups by one round per interval).
        var roundAt = ContinuousClock.now - coalesce
        while true {
            let due = roundAt + coalesce
            let wait = due - ContinuousClock.now
            if wait > .zero { Thread.sleep(forTimeInterval: Double(wait.components.attoseconds) / 1e18 + Double(wait.components.seconds)) }
            roundAt = ContinuousClock.now
            condition.lock()
            guard running else {
                // Subscriptions end with the relay.
                for d in Array(lanes.keys) { lanes[d]?.sub = nil }
                thread = nil
                condition.unlock()
                return
            }
            dirty = false
            let now = ContinuousClock.now
            let reports = watch(now)
            let ready = lanes.filter { !$0.value.inFlight && ($0.value.retryAt.map { now >= $0 } ?? true) }.map(\.key)
            let sink = logSink
            condition.unlock()
            for r in reports { sink(r) }
            var sent = false
            for d in ready.sorted(by: { $0.rawValue < $1.rawValue }) where step(d) { sent = true }
            if sent {
                // More may be ready at once (another lane's answer): go again without the pause.
                roundAt = ContinuousClock.now - coalesce
                continue
            }
            condition.lock()
            if running && !dirty { _ = condition.wait(until: Date(timeIntervalSinceNow: 0.05)) }
            condition.unlock()
        }
    }

    /// Gives up batches in flight past `inFlightMax` and reports lanes that have not moved for
    /// `stallReportAfter` while they have records to relay; returns the report lines. Under `condition`.
    func watch(_ now: ContinuousClock.Instant) -> [String] {
        // Lock order: `condition`, then the tail's lock (the tail runs wake-ups after unlocking).
        let applied = tail.applied
        var reports: [String] = []
        for d in Array(lanes.keys) {
            guard var l = lanes[d] else { continue }
            if l.inFlight, let at = l.sentAt, now - at >= inFlightMax {
                reports.append("relay \(source)→\(d): the batch from index \(l.sentFirst) had no answer in \(inFlightMax); sending it again")
                l.inFlight = false
                l.sentAt = nil
                l.sent &+= 1
                l.cursor = l.sentFirst
                l.failures += 1
                l.lastFailure = "no answer in \(inFlightMax)"
            }
            // Forward only: a lane whose batches fail flips between its mark (in flight) and the skipped
            // ranges past it (not), which is no progress.
            let relayed = Self.relayed(l)
            if relayed > l.seenRelayed {
                l.seenRelayed = relayed
                l.movedAt = now
            } else if applied > relayed, now - l.movedAt >= stallReportAfter, l.reportedAt.map({ now - $0 >= stallReportAfter }) ?? true {
                l.reportedAt = now
                let stuck = Double((now - l.movedAt).components.seconds)
                reports.append(
                    "relay \(source)→\(d) has not moved for \(Int(stuck)) s with \(applied - relayed) source records to relay: destination mark \(l.mark), next index \(l.cursor), "
                        + "\(l.inFlight ? "a batch from index \(l.sentFirst) in flight" : "nothing in flight"), \(l.batches) batches, \(l.failures) failures"
                        + (l.lastFailure.map { ", the last: \($0)" } ?? ""))
            }
            lanes[d] = l
        }
        return reports
    }

    /// One lane's next batch, if the tail has records for it; true if something was sent.
    func step(_ d: ShardID) -> Bool {
        condition.lock()
        guard var lane = lanes[d] else {
            condition.unlock()
            return false
        }
        condition.unlock()
        if lane.sub == nil || lane.sub?.next != lane.cursor {
            do {
                lane.sub = try tail.subscribe(from: lane.cursor) { [weak self] in self?.wake() }
            } catch {
                lane.sub = nil
                lane.lastFailure = "no subscription to the source's tail: \(error)"
            }
        }
        // A read that fails (damage being repaired, files replaced by a catch-up) is tried again next
        // round; it is kept as the lane's last failure, which a stall report names.
        let polled: TailSubscription.Batch?
        do {
            polled = try lane.sub?.poll(limit: batchSourceRecordsMax)
        } catch {
            polled = nil
            lane.lastFailure = "reading the source's log from index \(lane.cursor): \(error)"
        }
        guard let batch = polled, !batch.records.isEmpty else {
            store(d, lane)
            return false
        }
        let first = lane.cursor
        if lane.oldestPendingMicros == nil { lane.oldestPendingMicros = batch.records.first?.timestampMicros }
        var indexes: [LogIndex] = []
        var proposals: [Proposal] = []
        var bytes = 0
        var taken: Record?
        let records = batch.records
        for (j, r) in records.enumerated() {
            // A record apply rejected changed nothing: it causes nothing elsewhere either.
            var mine = tail.wasRejected(r.index) ? [] : rule.derive(r, source: source, for: d)
            if d == source, !mine.isEmpty, rule.hasInline(r) {
                // The leader wrote these right after it (Inline.swift), all of them or, when a leader
                // change cut its append short, a first part: the committed records after it say which.
                // While every one of those here is one of them and more may come, wait for the rest.
                let after = records[(j + 1)...].prefix(mine.count)
                let found = Self.inlineRun(mine, after: after)
                if found == after.count && found < mine.count { break }
                mine.removeFirst(found)
            }
            let more = mine.reduce(0) { $0 + $1.proposal.payload.count }
            if !proposals.isEmpty && (proposals.count + mine.count > Self.batchRecordsMax || bytes + more > Self.batchBytesMax) {
                // Full: this source record starts the next batch (the subscription is repositioned).
                break
            }
            for (_, p) in mine {
                indexes.append(r.index)
                proposals.append(p)
            }
            bytes += more
            taken = r
        }
        guard let last = taken else {
            // Waiting for what follows the first record: the subscription restarts at the cursor.
            store(d, lane)
            return false
        }
        if proposals.isEmpty && last.index - lane.mark < emptyRangeMax {
            // Nothing for this destination yet: move on without a batch (a restart re-reads this range).
            lane.cursor = last.index + 1
            store(d, lane)
            return false
        }
        lane.inFlight = true
        lane.cursor = last.index + 1
        lane.batches += 1
        lane.sent &+= 1
        lane.sentFirst = first
        lane.sentAt = ContinuousClock.now
        let number = lane.sent
        guard store(d, lane) else { return false }
        let header = RelayMarks.Header(source: source, first: first, last: last.index, sourceIndexes: indexes)
        send(d, header, proposals) { [weak self] result in self?.answered(d, first: first, batch: number, result) }
        return true
    }

    /// How many of `derived`, in order, are the records right after their source (`after`): the ones the
    /// leader wrote inline. No other record can match: relays write derived records only after a batch
    /// header, and the derived records name their source's index.
    static func inlineRun(_ derived: [(destination: ShardID, proposal: Proposal)], after: ArraySlice<Record>) -> Int {
        var k = 0
        for r in after {
            guard k < derived.count else { break }
            let p = derived[k].proposal
            guard r.type == p.type, r.stream == p.stream, r.payload == p.payload else { break }
            k += 1
        }
        return k
    }

    /// Puts back the lane `step` worked on (nothing else changes a lane with no batch in flight: `watch`
    /// runs on the same thread, and `answered` drops answers to no batch in flight); false when the
    /// relay has no such lane.
    @discardableResult
    func store(_ d: ShardID, _ lane: Lane) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard lanes[d] != nil else { return false }
        lanes[d] = lane
        return true
    }

    func answered(_ d: ShardID, first: LogIndex, batch: UInt64, _ result: Result<RelayResult, ReplicationError>) {
        condition.lock()
        defer {
            condition.signal()
            condition.unlock()
        }
        // Not the batch in flight: one given up as lost (`inFlightMax`), answered after all.
        guard var lane = lanes[d], lane.inFlight, lane.sent == batch else { return }
        // The loop may be mid-round (the signal alone would be lost): the next round must look at this lane.
        dirty = true
        lane.inFlight = false
        lane.sentAt = nil
        switch result {
        case .success(.written(let mark)), .success(.alreadyApplied(let mark)), .success(.stale(let mark)):
            lane.mark = max(lane.mark, mark)
            lane.cursor = mark + 1
            lane.oldestPendingMicros = nil
            lane.retryAt = nil
        case .failure(let e):
            // Not written, or unknown: the destination's mark decides on the resend.
            lane.failures += 1
            lane.lastFailure = "\(e)"
            lane.cursor = first
            lane.retryAt = ContinuousClock.now + retryPause
        }
        lanes[d] = lane
    }
}
