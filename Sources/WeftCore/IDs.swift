/// Identifiers shared by every Weft module. Plain integers on the wire and on disk;
/// distinct types in code so a stream id is never passed where a sequence number belongs.

/// A position in a shard's replicated log. The first record of a log is index 1; 0 means "none".
public typealias LogIndex = UInt64

/// A Raft term. 0 is the term before any election.
public typealias Term = UInt64

/// A sequence number inside one stream: 1, 2, 3, ... in log order. 0 means "before the first".
public typealias StreamSeq = UInt64

/// Which stream (user inbox, conversation, group, ...) a record belongs to.
/// `StreamID.none` marks records that belong to no stream (Raft no-ops, configuration changes).
public struct StreamID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static let none = StreamID(0)
    public static func < (a: StreamID, b: StreamID) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}

/// A shard: one Raft group and one segment log.
public struct ShardID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: ShardID, b: ShardID) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}

/// A node of the cluster, as named in the configuration file.
public struct NodeID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: NodeID, b: NodeID) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}
