import Raft
import SegmentStore
import WeftCore

/// What a read returns: the query's committed records up to this replica's applied index.
public struct ReadResult: Sendable, Equatable {
    public var records: [Record]
    /// This replica's applied index when it read: the records are all the query has up to it.
    public var applied: LogIndex
    /// This replica's commit index (the highest index it knows committed; at least `applied`).
    public var commit: LogIndex
    /// For a stream read: the lowest seq of the stream this replica can still serve (`streamFloor`);
    /// asked from below it, the records start there, and the ones before were dropped by retention.
    /// 1 for other reads.
    public var floor: StreamSeq
    /// For a stream read asked from past the stream's end (`fromSeq` > last seq + 1): the stream's last
    /// seq here (counting records appended and not yet committed, so never below the committed one).
    /// A reader's cursor past it is not one this stream gave. Nil otherwise.
    public var head: StreamSeq?

    public init(records: [Record], applied: LogIndex, commit: LogIndex, floor: StreamSeq = 1, head: StreamSeq? = nil) {
        self.records = records
        self.applied = applied
        self.commit = commit
        self.floor = floor
        self.head = head
    }
}

extension ShardReplica {
    /// Waiters for an applied index at most; past it a new one fails at once (`unavailable`).
    public static let appliedWaitersMax = 65_536

    public func status() -> ShardStatus {
        ShardStatus(
            shard: shard, node: id, role: raft.membership.all.contains(id) ? raft.role.rawValue : "not a member", leader: raft.leader, term: raft.term,
            commitIndex: raft.commit, appliedIndex: raft.applied, lastIndex: raft.lastIndex, matchIndexes: raft.matchIndexes,
            voters: raft.membership.voters.sorted(), learners: raft.membership.learners.sorted(),
            recovering: raft.recovering, repairs: repairs, repairEvents: Array(repairEvents.suffix(10)), stats: stats, firstIndex: store.firstIndex,
            retainThrough: retainThrough)
    }

    /// Committed records only (up to the applied index), checked block by block as they are read; a
    /// damaged block is never served (the replica repairs itself on its next turn). Served from this
    /// replica as it is: the caller decides how current it must be (`whenApplied`, a read index).
    public func read(_ q: ReadQuery) -> Result<ReadResult, ReadError> {
        let upTo = raft.applied
        let commit = raft.commit
        do {
            switch q {
            case .log(let from, let limit):
                guard from >= store.firstIndex || from > upTo else { return .failure(.compacted(first: store.firstIndex)) }
                guard from <= upTo else { return .success(ReadResult(records: [], applied: upTo, commit: commit)) }
                return .success(ReadResult(records: try store.read(from: from, to: upTo, limit: limit), applied: upTo, commit: commit))
            case .stream(let s, let fromSeq, let limit):
                var out = try store.readStream(s, fromSeq: fromSeq, limit: limit)
                if let k = out.firstIndex(where: { $0.index > upTo }) { out.removeSubrange(k...) }
                // Only a read that found nothing can have asked past the end: no lookup for the others.
                var head: StreamSeq?
                if out.isEmpty {
                    let last = store.lastSeq(of: s)
                    if fromSeq > last &+ 1 { head = last }
                }
                return .success(ReadResult(records: out, applied: upTo, commit: commit, floor: store.streamFloor(s), head: head))
            }
        } catch StoreError.outOfRange(_, let first, _) {
            return .failure(.compacted(first: first))
        } catch {
            return .failure(.damaged("\(error)"))
        }
    }

    /// How far past this replica's last index a waiter may ask (further cannot be reached soon: refused).
    public static let appliedWaitAheadMax: LogIndex = 1 << 20

    /// `done` gets the applied index once it is at least `index` (at once if it is already). Waiters
    /// are kept sorted by index; they fail when the replica stops, when `appliedWaitersMax` wait, or
    /// when `index` is more than `appliedWaitAheadMax` past the log. `token` (0: none) lets the caller
    /// drop the waiter with `cancelWaiter` (its deadline passed).
    public func whenApplied(_ index: LogIndex, token: UInt64 = 0, done: @escaping (Result<LogIndex, ReplicationError>) -> Void) {
        if raft.applied >= index { return done(.success(raft.applied)) }
        guard index <= raft.lastIndex &+ Self.appliedWaitAheadMax else {
            return done(.failure(.invalid("index \(index) is far past the log of shard \(shard) on node \(id) (last index \(raft.lastIndex))")))
        }
        guard appliedWaiters.count < Self.appliedWaitersMax else {
            return done(.failure(.unavailable("\(Self.appliedWaitersMax) reads are already waiting on shard \(shard) of node \(id)")))
        }
        var lo = 0
        var hi = appliedWaiters.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if appliedWaiters[mid].index <= index { lo = mid + 1 } else { hi = mid }
        }
        appliedWaiters.insert((index, token, done), at: lo)
    }

    /// Drops the waiter registered with `token` (its caller stopped waiting); it is not answered.
    public func cancelWaiter(_ token: UInt64) {
        guard token != 0 else { return }
        appliedWaiters.removeAll { $0.token == token }
    }

    /// Answers the waiters whose index is applied now.
    func fireAppliedWaiters() {
        guard let first = appliedWaiters.first, first.index <= raft.applied else { return }
        let applied = raft.applied
        var k = 0
        while k < appliedWaiters.count, appliedWaiters[k].index <= applied { k += 1 }
        let ready = appliedWaiters[0..<k]
        appliedWaiters.removeFirst(k)
        for w in ready { w.done(.success(applied)) }
    }
}
