import WeftCore

/// What applying one committed record did, as the proposer learns it.
///
/// A record that apply rejects stays in the log (it committed: every replica saw it and rejected it the
/// same way) and keeps its stream seq; it changes no state. Readers of a stream see it and skip it by its
/// outcome's rule, which is the state machine's: the stream stays dense (Docs/state.md).
public enum ApplyOutcome: Sendable, Equatable {
    /// Applied; the bytes are the state machine's answer (may be empty).
    case accepted([UInt8])
    /// Not applied, for a reason the proposer is told (`code` is machine-readable).
    case rejected(code: String, message: String)

    public static let ok = ApplyOutcome.accepted([])
}

/// A shard's state, derived from its committed log (design.md: "state is derived from the log").
///
/// A value type: the driver applies batches on the shard's thread and, to take a snapshot, copies the
/// value (O(1): its storage is copy-on-write) and serialises the copy on another thread while apply goes
/// on. Implementations keep their big collections in `BucketedMap` so that the first writes after such a
/// copy duplicate one bucket each, not the whole state (Docs/state.md, "Snapshots").
///
/// Rules for `apply` (checked by the simulation: replicas at the same applied index have the same
/// `stateHash`): deterministic, from the records alone. No wall clock (use `Record.timestampMicros`,
/// stamped by the leader and never below the previous record's), no randomness, no I/O, no iteration
/// order of a `Dictionary` or `Set` leaking into the state or the outcomes (their order is seeded per
/// process). CPU-heavy work (hashing passwords, signing tokens) is done before proposing, never here.
public protocol ShardStateMachine: Sendable {
    /// The empty state (before index 1).
    init()
    /// Restores the state `snapshot()` returned. Throws on bytes it cannot read (the caller then tries
    /// an older snapshot, or replays the log from the start).
    init(snapshot: [UInt8]) throws
    /// Applies committed records in log order; one outcome per record, in the same order.
    mutating func apply(_ records: ArraySlice<Record>) -> [ApplyOutcome]
    /// The whole state as bytes.
    func snapshot() -> [UInt8]
    /// A digest of the state: equal on every replica at the same applied index. Independent of how
    /// the state is laid out in memory (insertion order, buckets).
    var stateHash: UInt64 { get }
    /// Checked on the leader before a client record is proposed: a rejection here is answered at once and
    /// nothing is written. Only a fast pre-check against the applied state (an entry not applied yet can
    /// change the answer): `apply` stays the authority. Default: admit everything.
    func admit(type: RecordType, stream: StreamID, payload: [UInt8]) -> ApplyOutcome?
    /// Indexes of the records apply rejected that relays must not derive from, ascending (part of the
    /// state: it survives snapshots). Default: none.
    var relayRejected: [LogIndex] { get }
}

extension ShardStateMachine {
    public func admit(type: RecordType, stream: StreamID, payload: [UInt8]) -> ApplyOutcome? { nil }
    public var relayRejected: [LogIndex] { [] }
}

/// The state of a shard without a state machine (the raw log API): nothing but the applied index, which
/// the snapshot carries; every record is accepted.
public struct NoState: ShardStateMachine {
    public init() {}
    public init(snapshot: [UInt8]) throws {
        guard snapshot.isEmpty else { throw StateDecodeError("the raw log keeps no state, got \(snapshot.count) bytes") }
    }
    public mutating func apply(_ records: ArraySlice<Record>) -> [ApplyOutcome] {
        Array(repeating: .ok, count: records.count)
    }
    public func snapshot() -> [UInt8] { [] }
    public var stateHash: UInt64 { 0 }
}

/// A state machine could not read snapshot bytes.
public struct StateDecodeError: Error, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// 64-bit FNV-1a: a stable hash (the same in every process, unlike `Hasher`) for bucket choice and state
/// digests.
@frozen
public struct FNV1a: Sendable {
    /// The hash of everything added so far.
    public var value: UInt64 { state }
    @usableFromInline var state: UInt64 = 0xcbf2_9ce4_8422_2325
    @inlinable public init() {}
    @inlinable public mutating func add(_ bytes: some Sequence<UInt8>) {
        for b in bytes {
            state ^= UInt64(b)
            state &*= 0x0000_0100_0000_01b3
        }
    }
    @inlinable public mutating func add(_ v: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { add($0) }
    }
    @inlinable public static func hash(_ bytes: some Sequence<UInt8>) -> UInt64 {
        var h = FNV1a()
        h.add(bytes)
        return h.value
    }
}
