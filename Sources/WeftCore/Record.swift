/// What a record is, as far as the log cares. Higher layers (Raft, messaging) define the meaning of
/// their own values; the log only stores the number.
public struct RecordType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public init(_ rawValue: UInt16) { self.rawValue = rawValue }

    /// An opaque application record.
    public static let data = RecordType(1)
    /// A Raft leader's empty entry at the start of its term.
    public static let noop = RecordType(2)
    /// A Raft membership change.
    public static let config = RecordType(3)
    /// A client's request key, proposed right before the request's records (Docs/state.md,
    /// "Idempotent writes"): payload `u8 key length | key | u32 record count`.
    public static let requestKey = RecordType(4)
    /// A relay batch's header, proposed right before the records a relay derived from another shard
    /// (Docs/state.md, "Relays").
    public static let relayBatch = RecordType(5)
    /// A client record a relay copies to streams of other shards (the raw log's fan-out, Docs/state.md):
    /// payload `u16 n | n × (u64 shard | u64 stream) | body`. Client-writable.
    public static let fanout = RecordType(6)
    /// A shard leader's retention decision (Docs/state.md, "Retention"): payload `u64 through`, the
    /// highest log index every replica may drop (each still keeps what its own snapshots, tails and
    /// relays need). System only.
    public static let retain = RecordType(7)
    /// A messaging record (Docs/messaging.md, "Records"): payload `u8 op | fields`. System only: the raw
    /// shard API refuses it; the nodes' messaging API and the relays write it.
    public static let messaging = RecordType(16)

    /// Types a client may write through the raw shard API: `data`, and the opaque application range
    /// 0x8000...0xFFFF. Every other value is reserved for the system (Raft's no-op and membership
    /// changes, and the record types of the state layer, messaging and delivery as later issues define
    /// them) and is refused at the API and again at the leader, so a client can never write a record the
    /// system would interpret.
    public static let clientRange: ClosedRange<UInt16> = 0x8000...0xFFFF

    /// Whether a client may write records of this type (`data` or `clientRange`).
    public var isClientWritable: Bool { self == .data || self == .fanout || Self.clientRange.contains(rawValue) }

    /// Types a relay may write at its destination: client types (the raw fan-out's copies) and the
    /// records domain layers derive (messaging's inbox entries).
    public var isRelayWritable: Bool { isClientWritable || self == .messaging }

    public var description: String {
        switch self {
        case .data: "data"
        case .noop: "noop"
        case .config: "config"
        case .requestKey: "requestKey"
        case .relayBatch: "relayBatch"
        case .fanout: "fanout"
        case .retain: "retain"
        case .messaging: "messaging"
        default: "type\(rawValue)"
        }
    }
}

/// One entry of a shard's log.
///
/// Invariants kept by the store: indexes of a log are dense (each append continues at the last index + 1),
/// and within one stream `seq` strictly increases with `index`.
public struct Record: Hashable, Sendable {
    public var index: LogIndex
    public var term: Term
    public var stream: StreamID
    public var seq: StreamSeq
    public var type: RecordType
    /// Microseconds since the Unix epoch, as stamped by whoever proposed the record.
    public var timestampMicros: Int64
    public var payload: [UInt8]

    public init(
        index: LogIndex, term: Term, stream: StreamID, seq: StreamSeq, type: RecordType = .data,
        timestampMicros: Int64, payload: [UInt8]
    ) {
        self.index = index
        self.term = term
        self.stream = stream
        self.seq = seq
        self.type = type
        self.timestampMicros = timestampMicros
        self.payload = payload
    }
}
