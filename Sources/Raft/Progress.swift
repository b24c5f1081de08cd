import WeftCore

/// The leader's view of one follower (etcd's Progress): what it has, what to send next, and how many
/// append messages are in flight.
struct Progress: Sendable {
    enum State: Sendable {
        /// Sending one append at a time until the follower's match is found.
        case probe
        /// Streaming appends, up to `inflightAppendsMax` unacknowledged.
        case replicate
        /// Behind the leader's first index: waits for a snapshot (catch-up outside the log).
        case snapshot
    }

    var match: LogIndex = 0
    var next: LogIndex
    var state: State = .probe
    /// In probe state: an append is out and unanswered.
    var probeSent = false
    /// Last index of each append in flight, oldest first (replicate state).
    var inflight: [LogIndex] = []
    /// Heard from since the last check-quorum round.
    var recentActive = false
    /// Ticks spent waiting in snapshot state: a catch-up whose answer never comes is retried.
    var snapshotTicks = 0
    /// In snapshot state: the catch-up transfer under way (its answer and the shipper's reports name it).
    var transfer: UInt64 = 0
    /// The highest commit index sent to it (with any append).
    var commitSent: LogIndex = 0

    init(next: LogIndex) { self.next = next }

    func isPaused(window: Int) -> Bool {
        switch state {
        case .probe: probeSent
        case .replicate: inflight.count >= window
        case .snapshot: true
        }
    }

    /// An acknowledgement up to `index`; true if it moved `match`.
    mutating func maybeUpdate(_ index: LogIndex) -> Bool {
        var updated = false
        if match < index {
            match = index
            updated = true
            probeSent = false
        }
        next = max(next, index + 1)
        return updated
    }

    /// A rejection of the append at `rejected`; `matchHint` is the highest index that may still match.
    /// False for a stale rejection.
    mutating func maybeDecrease(rejected: LogIndex, matchHint: LogIndex) -> Bool {
        if state == .replicate {
            if rejected <= match { return false }
            next = match + 1
            return true
        }
        if next == 0 || next - 1 != rejected { return false }
        next = max(min(rejected, matchHint + 1), match + 1)
        probeSent = false
        return true
    }

    /// The follower reports that its log was cut back (storage damage) and may hold no more than
    /// `matchHint`: forget what it acknowledged above that and probe again from there.
    mutating func lostEntries(matchHint: LogIndex) {
        match = min(match, matchHint)
        becomeProbe()
    }

    mutating func becomeProbe() {
        state = .probe
        next = match + 1
        inflight = []
        probeSent = false
    }

    mutating func becomeReplicate() {
        state = .replicate
        next = match + 1
        inflight = []
    }

    mutating func freeInflight(upTo index: LogIndex) {
        var k = 0
        while k < inflight.count && inflight[k] <= index { k += 1 }
        if k > 0 { inflight.removeFirst(k) }
    }
}
