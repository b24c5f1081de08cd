import Foundation
import Raft
import SegmentFormat
import SegmentStore
import WeftCore

/// What a shard keeps of its log (`[storage] retention`, Docs/state.md "Retention"). Off by default: chat
/// history is the log. Either limit, when set, lets whole sealed segments go, oldest first.
public struct RetentionPolicy: Sendable, Equatable {
    /// Keep at most this many bytes of segment data per replica; older sealed segments go (nil: no limit).
    public var bytesMax: UInt64?
    /// Sealed segments whose newest record is older than this (microseconds, by the leader's
    /// timestamps) go (nil: no limit).
    public var ageMicrosMax: Int64?

    public init(bytesMax: UInt64? = nil, ageMicrosMax: Int64? = nil) {
        self.bytesMax = bytesMax
        self.ageMicrosMax = ageMicrosMax
    }

    public static let off = RetentionPolicy()
    public var isOff: Bool { bytesMax == nil && ageMicrosMax == nil }

    /// The last index of the newest sealed segment the policy lets go (0: none). Segments go oldest
    /// first and never past an unsealed one; `lastTimestamp` reads the timestamp of a segment's last
    /// record (nil: unreadable, which keeps the segment).
    public func dropThrough(_ spans: [SegmentStore.SegmentSpan], nowMicros: Int64, lastTimestamp: (LogIndex) -> Int64?) -> LogIndex {
        var through: LogIndex = 0
        if let bytesMax {
            var total = spans.reduce(UInt64(0)) { $0 + $1.bytes }
            for s in spans {
                guard total > bytesMax, s.sealed else { break }
                total -= s.bytes
                if s.lastIndex >= s.base { through = max(through, s.lastIndex) }
            }
        }
        if let ageMicrosMax {
            for s in spans {
                guard s.sealed else { break }
                guard s.lastIndex >= s.base else { continue }
                guard let t = lastTimestamp(s.lastIndex), t < nowMicros - ageMicrosMax else { break }
                through = max(through, s.lastIndex)
            }
        }
        return through
    }
}

/// Retention on a replica (Docs/state.md, "Retention"):
///
/// ```
///  leader, every retentionCheckTicks:  policy ─┐
///                                      relays' lowest destination mark ─┼─ min ─▶ propose retain(through)
///                                      own oldest snapshot, tails ──────┘            │ commit, apply (every replica)
///  every replica:  drop whole sealed segments ≤ min(retainThrough, own oldest snapshot, own tails) ◀─┘
/// ```
///
/// The decision is a record in the shard's log, so every replica drops the same prefix (at its own
/// segment boundaries) and a new leader's relays know where their sources start; what each replica
/// drops never passes what it itself needs to restart (its oldest snapshot) or to serve its tail
/// subscribers. A follower that needs dropped entries gets the leader's files and a snapshot
/// (CatchUp.swift).
extension ShardReplica {
    /// The `retain` record's payload: `u64 through`, little-endian.
    static func retainPayload(_ through: LogIndex) -> [UInt8] {
        var b: [UInt8] = []
        b.appendLE(through)
        return b
    }

    static func retainedThrough(_ payload: [UInt8]) -> LogIndex? {
        guard payload.count == 8 else { return nil }
        return payload.withUnsafeBytes { LogIndex(littleEndian: $0.loadUnaligned(as: LogIndex.self)) }
    }

    /// The first index this replica's log holds (shard thread).
    public var firstLogIndex: LogIndex { store.firstIndex }

    /// Where a relay of this shard may start reading: past the applied retention mark, and past what this
    /// log dropped (its drop was bounded by a retention mark already committed, which the applied state of
    /// a replica restarted from an older snapshot may not have reached yet; every destination had reached
    /// that mark).
    public var relayStart: LogIndex { max(retainThrough, store.firstIndex - 1) + 1 }

    /// Types only the replica itself proposes (request keys, relay batch headers, retention).
    static func isReplicaType(_ t: RecordType) -> Bool { t == .requestKey || t == .relayBatch || t == .retain }

    /// One retention check (from `tick`): the leader proposes, every replica drops what it may.
    func retentionCheck() {
        guard !raft.recovering, store.damagedFrom == nil else { return }
        if raft.role == .leader && !retention.isOff { proposeRetention() }
        dropRetained()
    }

    /// What this replica itself must keep: the entries after its oldest snapshot (a restart restores from
    /// it or a newer one), after its applied index, and from its tail subscribers' positions on; and the
    /// last entry (the log's last term stays readable).
    func localRetentionFloor() -> LogIndex {
        guard let oldest = (try? snapshots.indexes())?.last else { return 0 }
        var floor = min(oldest, raft.applied, store.lastIndex > 0 ? store.lastIndex - 1 : 0)
        if let t = tail.lowestPosition { floor = min(floor, t > 0 ? t - 1 : 0) }
        return floor
    }

    /// The leader: proposes a `retain` record when the policy, its relays and its own needs allow
    /// dropping past the current mark.
    func proposeRetention() {
        let want = retention.dropThrough(store.segmentSpans(), nowMicros: clockMicros()) { i in
            (try? store.read(from: i, to: i, limit: 1))?.first?.timestampMicros
        }
        var through = min(want, localRetentionFloor())
        if hasRelays { through = min(through, relayFloor() ?? 0) }
        guard through > retainThrough else { return }
        do {
            _ = try raft.propose(stamped([Proposal(stream: .none, type: .retain, payload: Self.retainPayload(through))]))
        } catch {
            log("retention: could not propose dropping through \(through): \(error)")
        }
    }

    /// Drops the whole sealed segments this replica may: up to the applied `retain` mark and its own floor.
    func dropRetained() {
        let through = min(retainThrough, localRetentionFloor())
        // Not while files are being shipped to or staged from a catch-up (the shipper reads them later).
        guard through >= store.firstIndex, currentTransfer == nil, outgoingSnapshots.isEmpty, raft.catchUpTransfers.isEmpty else { return }
        do {
            let n = try store.dropSegments(through: through)
            if n > 0 {
                stats.segmentsDropped += UInt64(n)
                log("retention dropped \(n) segment(s) through \(through): the log now starts at \(store.firstIndex)")
            }
        } catch {
            record("retention could not drop segments through \(through): \(error)")
        }
    }
}
