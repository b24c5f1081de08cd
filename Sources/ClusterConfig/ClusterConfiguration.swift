import WeftCore

/// A validated cluster configuration (the file's shape: `cluster.example.toml`).
///
/// Only `load(path:)` and `parse(_:configPath:)` make one, so every value below has passed the
/// checks described on each property.
public struct ClusterConfiguration: Sendable, Equatable {
    /// `cluster.name`: non-empty.
    public let name: String
    /// `cluster.shards`: 1...1024 (default 8). A user's home shard is `user_id % shards`.
    public let shards: Int
    /// `cluster.replication`: replicas per shard, 1...nodes.count (default 3).
    public let replication: Int
    /// `cluster.secret`: peers authenticate with an HMAC challenge over it; at least 16 bytes of UTF-8.
    public let secret: String
    public let storage: StorageConfig
    public let raft: RaftTiming
    /// `api.operator_token`: required on every operator route (raw shard appends and reads, admin,
    /// cluster status) as `Authorization: Bearer <token>`; at least 16 bytes of printable ASCII.
    public let operatorToken: String
    /// `[[nodes]]`, sorted by id; at least one; ids and addresses unique.
    public let nodes: [NodeConfig]
    /// `cluster.founders`: the nodes the cluster was created with, sorted (default: every node). Shard
    /// placement (`replicas(of:)`) is computed over these only: adding a node to `[[nodes]]` never moves
    /// a shard; a new node gets replicas only through a membership change.
    public let founders: [NodeID]
    /// The file the configuration came from, as given; relative paths in the file resolve against its directory.
    public let configPath: String

    /// `cluster.shards` bounds.
    public static let shardsRange = 1...1024
    public static let defaultShards = 8
    public static let defaultReplication = 3
    /// `cluster.secret` must be at least this many bytes (UTF-8).
    public static let secretBytesMin = 16
    /// `[messaging]`: accounts, tokens and rate limits of the messaging API (Docs/messaging.md).
    public var messaging = MessagingConfig()
    /// `[delivery]`: WebSocket sessions (Docs/delivery.md).
    public var delivery = DeliveryConfig()
    /// `[push]`: offline notifications to a webhook (Docs/delivery.md, "Offline push").
    public var push = PushConfig()

    /// `api.operator_token` must be at least this many bytes.
    public static let operatorTokenBytesMin = 16
    /// `load(path:)` refuses larger files: a configuration is a few hundred bytes per node.
    public static let configFileBytesMax = 1 << 20

    init(
        name: String, shards: Int, replication: Int, secret: String, storage: StorageConfig, raft: RaftTiming,
        operatorToken: String, nodes: [NodeConfig], founders: [NodeID], configPath: String
    ) {
        precondition(Self.shardsRange.contains(shards), "shards \(shards) outside \(Self.shardsRange)")
        precondition(!founders.isEmpty && (1...founders.count).contains(replication), "replication \(replication), \(founders.count) founders")
        precondition(founders.allSatisfy { f in nodes.contains { $0.id == f } }, "a founder is not a node")
        precondition(zip(nodes, nodes.dropFirst()).allSatisfy { $0.id < $1.id }, "nodes not sorted by unique id")
        self.name = name
        self.shards = shards
        self.replication = replication
        self.secret = secret
        self.storage = storage
        self.raft = raft
        self.operatorToken = operatorToken
        self.nodes = nodes
        self.founders = founders.sorted()
        self.configPath = configPath
    }

    /// Reads and validates the configuration file at `path`.
    ///
    /// - Throws: `ConfigError` naming `path` when the file cannot be read, is larger than
    ///   `configFileBytesMax`, is not UTF-8 or not TOML, or breaks a rule (then also the key).
    public static func load(path: String) throws(ConfigError) -> ClusterConfiguration {
        let text = try readTextFile(path)
        return try parse(text, configPath: path)
    }

    /// Validates the TOML document `text`. `configPath` names the file in errors, and a relative
    /// `storage.data_dir` resolves against its directory (against the working directory when
    /// `configPath` is relative).
    public static func parse(_ text: String, configPath: String) throws(ConfigError) -> ClusterConfiguration {
        try ConfigParser(file: configPath).parse(text)
    }

    /// The node with id `id`, if the cluster has one.
    public func node(_ id: NodeID) -> NodeConfig? {
        nodes.first { $0.id == id }
    }

    /// Where node `node` keeps its data: `<storage.dataDir>/<node id>`.
    public func dataDirectory(for node: NodeID) -> String {
        storage.dataDir.hasSuffix("/") ? storage.dataDir + node.description : storage.dataDir + "/" + node.description
    }

    /// Every shard of the cluster: 0..<shards.
    public var shardIDs: [ShardID] {
        (0..<UInt64(shards)).map { ShardID($0) }
    }

    /// The home shard of a user: `userID % shards`.
    public func shard(ofUser userID: UInt64) -> ShardID {
        ShardID(userID % UInt64(shards))
    }

    /// The initial group of `shard`: with the founders sorted by id, the `replication` consecutive
    /// founders starting at index `shard % founders.count`, wrapping around. Deterministic, distinct, the
    /// same on every node that reads the same founders, and independent of nodes added later. The group
    /// a shard has *now* is in its log (membership changes); this is only where it started.
    /// `shard` must be below `shards` (a bug otherwise).
    public func replicas(of shard: ShardID) -> [NodeID] {
        precondition(shard.rawValue < UInt64(shards), "shard \(shard) outside 0..<\(shards)")
        let start = Int(shard.rawValue % UInt64(founders.count))
        return (0..<replication).map { founders[(start + $0) % founders.count] }
    }

    /// What placement depends on, as one line (recorded by each node at first start, and part of the
    /// peer handshake's cluster name, so nodes that compute placement differently never talk).
    public var placementBasis: String {
        "shards=\(shards) replication=\(replication) founders=\(founders.map(\.description).joined(separator: ","))"
    }

    /// The shards whose replica set includes `node`, ascending; empty for an unknown node.
    public func shards(hostedBy node: NodeID) -> [ShardID] {
        shardIDs.filter { replicas(of: $0).contains(node) }
    }
}

/// `[storage]`.
public struct StorageConfig: Sendable, Equatable {
    /// `storage.data_dir` as an absolute, lexically normalized path (default `data` next to the config file).
    public let dataDir: String
    /// `storage.fsync` (default `every_batch`).
    public let fsync: FsyncPolicy
    /// `storage.segment_bytes`: a segment is sealed once it reaches this size; at least 4096 (default 64 MiB).
    public let segmentBytes: UInt64
    /// `storage.snapshot_every_records`: a replica writes a snapshot of its state once this many entries
    /// were applied since the last one (Docs/state.md); 1...1e9 (default 100 000).
    public let snapshotEveryRecords: UInt64
    /// `storage.retention`: what each shard keeps of its log (Docs/state.md, "Retention"); off by default.
    public let retention: Retention

    public static let defaultDataDir = "data"
    public static let defaultSegmentBytes: UInt64 = 64 << 20
    public static let segmentBytesMin: UInt64 = 4096
    public static let defaultSnapshotEveryRecords: UInt64 = 100_000
    public static let snapshotEveryRecordsRange: ClosedRange<UInt64> = 1...1_000_000_000

    public init(
        dataDir: String, fsync: FsyncPolicy, segmentBytes: UInt64, snapshotEveryRecords: UInt64 = defaultSnapshotEveryRecords,
        retention: Retention = .off
    ) {
        self.retention = retention
        self.dataDir = dataDir
        self.fsync = fsync
        self.segmentBytes = segmentBytes
        self.snapshotEveryRecords = snapshotEveryRecords
    }
}

/// `storage.retention`: `"off"` (the default: chat history is the log), or a comma-separated list of
/// limits, each a size (`"10GiB"`: keep at most that much segment data per shard replica; KiB, MiB, GiB,
/// TiB) or an age (`"30d"`, `"12h"`: drop segments whose newest record is older). Whole sealed segments
/// go, never past a snapshot, relay or tail that still needs them.
public struct Retention: Equatable, Sendable, CustomStringConvertible {
    public var bytesMax: UInt64?
    public var ageSecondsMax: UInt64?
    public init(bytesMax: UInt64? = nil, ageSecondsMax: UInt64? = nil) {
        self.bytesMax = bytesMax
        self.ageSecondsMax = ageSecondsMax
    }
    public static let off = Retention()
    public var isOff: Bool { bytesMax == nil && ageSecondsMax == nil }
    /// Ages below this are refused (an hour, the smallest unit).
    public static let ageSecondsMin: UInt64 = 3600
    public var description: String {
        var parts: [String] = []
        if let b = bytesMax { parts.append("\(b) bytes") }
        if let a = ageSecondsMax { parts.append("\(a) s") }
        return parts.isEmpty ? "off" : parts.joined(separator: ", ")
    }

    /// Parses the key's text; nil with a reason on anything else.
    public static func parse(_ text: String, segmentBytes: UInt64) -> Result<Retention, RetentionSyntaxError> {
        if text == "off" { return .success(.off) }
        var r = Retention()
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let t = item.trimmingCharacters(in: .whitespaces)
            let digits = t.prefix { $0.isASCII && $0.isNumber }
            let unit = t.dropFirst(digits.count)
            guard (1...15).contains(digits.count), let n = UInt64(digits), n > 0 else {
                return .failure(RetentionSyntaxError(message: "\"\(t.prefix(32))\" is not a size (10GiB) or an age (30d, 12h)"))
            }
            let sizes: [Substring: UInt64] = ["KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40]
            let ages: [Substring: UInt64] = ["h": 3600, "d": 86400]
            if let m = sizes[unit] {
                guard r.bytesMax == nil else { return .failure(RetentionSyntaxError(message: "two sizes given")) }
                let (v, over) = n.multipliedReportingOverflow(by: m)
                guard !over, v >= segmentBytes else {
                    return .failure(RetentionSyntaxError(message: "\(t) is below one segment (segment_bytes = \(segmentBytes))"))
                }
                r.bytesMax = v
            } else if let m = ages[unit] {
                guard r.ageSecondsMax == nil else { return .failure(RetentionSyntaxError(message: "two ages given")) }
                let (v, over) = n.multipliedReportingOverflow(by: m)
                guard !over, v >= ageSecondsMin, v <= UInt64(Int64.max / 1_000_000) else {
                    return .failure(RetentionSyntaxError(message: "\(t) is out of range"))
                }
                r.ageSecondsMax = v
            } else {
                return .failure(RetentionSyntaxError(message: "\"\(t.prefix(32))\": unknown unit (KiB, MiB, GiB, TiB, h, d)"))
            }
        }
        return .success(r)
    }
}

public struct RetentionSyntaxError: Error, Equatable, Sendable {
    public var message: String
}

/// `storage.fsync`: when appended log data is made durable (Docs/storage.md, "When Weft fsyncs").
public enum FsyncPolicy: Equatable, Sendable, CustomStringConvertible {
    /// `every_batch`: fdatasync after every append batch (the default).
    case everyBatch
    /// `every_n_batches:N`, N >= 1: fdatasync after every N-th batch; a crash may lose up to N-1 batches.
    case everyBatches(Int)
    /// `never`: no fdatasync on append; segments are still synced when sealed.
    case never

    /// The spelling used in the configuration file.
    public var description: String {
        switch self {
        case .everyBatch: "every_batch"
        case .everyBatches(let n): "every_n_batches:\(n)"
        case .never: "never"
        }
    }
}

/// `[raft]`, in milliseconds. Invariants: 1 <= heartbeat, 2 * heartbeat < min < max <= `timeoutMsMax`.
public struct RaftTiming: Sendable, Equatable {
    /// `raft.election_timeout_min_ms` (default 300).
    public let electionTimeoutMinMs: Int
    /// `raft.election_timeout_max_ms`, greater than the minimum (default 600).
    public let electionTimeoutMaxMs: Int
    /// `raft.heartbeat_interval_ms`, less than half the minimum election timeout (default 50).
    public let heartbeatIntervalMs: Int
    /// `raft.driver_threads`: threads that drive a node's replicas (1...256, default 2): a node's
    /// shards share them, shard s on thread s % n (Docs/replication.md).
    public var driverThreads: Int = RaftTiming.defaultDriverThreads

    public static let defaultDriverThreads = 2
    public static let driverThreadsMax = 256
    public static let defaultElectionTimeoutMinMs = 300
    public static let defaultElectionTimeoutMaxMs = 600
    public static let defaultHeartbeatIntervalMs = 50
    /// No timing may exceed one hour: larger values are typos, and this keeps arithmetic on them far from overflow.
    public static let timeoutMsMax = 3_600_000

    public init(electionTimeoutMinMs: Int, electionTimeoutMaxMs: Int, heartbeatIntervalMs: Int) {
        self.electionTimeoutMinMs = electionTimeoutMinMs
        self.electionTimeoutMaxMs = electionTimeoutMaxMs
        self.heartbeatIntervalMs = heartbeatIntervalMs
    }
}

/// One `[[nodes]]` entry.
public struct NodeConfig: Sendable, Equatable {
    /// `id`, >= 1 and unique in the cluster.
    public let id: NodeID
    /// `peer_addr`: where other nodes reach this one (Raft, replication).
    public let peerAddress: HostPort
    /// `api_addr`: where clients reach this node.
    public let apiAddress: HostPort

    public init(id: NodeID, peerAddress: HostPort, apiAddress: HostPort) {
        self.id = id
        self.peerAddress = peerAddress
        self.apiAddress = apiAddress
    }
}

/// `[messaging]`.
public struct MessagingConfig: Sendable, Equatable {
    /// `bcrypt_cost`: the work factor of password hashes (4...16, default 12 as the seed asks; each step
    /// doubles the CPU a registration or login costs).
    public var bcryptCost = 12
    /// `token_ttl_seconds`: how long a login's token is valid (60 s ... 1 year, default 1 day).
    public var tokenTTLSeconds = 86_400
    /// `sends_per_minute`: messages a user may send per minute, across the cluster (default 100).
    public var sendsPerMinute = 100
    /// `history_reads_per_minute`: history pages a user may fetch per minute (default 30).
    public var historyReadsPerMinute = 30
    /// `actions_per_minute`: other writes a user may make per minute — contact requests, blocks, read
    /// marks, profile and TOTP changes, logouts (default 60).
    public var actionsPerMinute = 60
    /// `syncs_per_minute`: sync pages a user may fetch per minute (default 600).
    public var syncsPerMinute = 600
    /// `logins_per_minute`: login attempts per username per minute (default 10: online password and
    /// TOTP guessing).
    public var loginsPerMinute = 10
    /// `group_members_max`: members a group may have (2 ... 5 000, default 500 as in WeChat). Each group
    /// record names its members, so the bound also bounds a record (8 bytes a member).
    public var groupMembersMax = 500

    public static let groupMembersRange = 2...5_000
    /// Above 16 one hash takes seconds (and the node computes one at start).
    public static let bcryptCostRange = 4...16
    public static let tokenTTLRange = 60...31_536_000
    public static let perMinuteRange = 1...1_000_000
    public init() {}
}

/// `[delivery]`.
public struct DeliveryConfig: Sendable, Equatable {
    /// `session_queue_max`: events a session may have queued for its socket (pushed, not yet written)
    /// before it is closed with 4000 "resume" (default 1024).
    public var sessionQueueMax = 1024
    /// `write_stall_ms`: a session whose socket took none of its queued events for this long is closed
    /// with 4000 (default 30 000).
    public var writeStallMillis = 30_000
    public static let sessionQueueRange = 16...65_536
    public static let writeStallRange = 1_000...600_000
    public init() {}
}

/// `[push]`: when an inbox event worth a notification (a message or contact request from someone
/// else) is acknowledged by none of the user's devices within `delay_ms`, the leader of the user's home
/// shard POSTs it to `webhook_url`.
public struct PushConfig: Sendable, Equatable {
    /// `webhook_url`: `http://` or `https://host[:port][/path]` (absent: no offline push).
    public var webhookURL: WebhookURL?
    /// `ca_file`: for an `https` webhook, a PEM file of the certificates to trust instead of the
    /// system's store (a private CA, a self-signed receiver); absolute, resolved against the config file.
    public var caFile: String?
    /// `delay_ms`: how long devices have to acknowledge an event (default 10 000).
    public var delayMillis = 10_000
    /// `secret`: when set, each POST carries `X-Weft-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    public var secret: String?
    /// `retry_max_ms`: the longest back-off between attempts for one user (default 60 000; it starts
    /// at 500 ms and doubles).
    public var retryMaxMillis = 60_000
    public static let delayRange = 0...86_400_000
    public static let retryMaxRange = 500...3_600_000
    public init() {}
}

/// An `http://` or `https://` webhook address, split.
public struct WebhookURL: Sendable, Equatable {
    /// `https`: the POSTs go over TLS, the server's certificate checked against its host name.
    public var tls: Bool
    public var host: String
    public var port: Int
    /// Starts with "/".
    public var path: String
    public var text: String

    /// Nil unless `http://` or `https://host[:port][/path]`: a host name, IPv4 address or bracketed IPv6
    /// address, a port of digits in 1...65535, no spaces and no user part.
    public init?(_ text: String) {
        guard !text.contains(where: { $0.isWhitespace }) else { return nil }
        let scheme: String
        if text.hasPrefix("http://") {
            scheme = "http://"
            tls = false
        } else if text.hasPrefix("https://") {
            scheme = "https://"
            tls = true
        } else {
            return nil
        }
        let rest = text.dropFirst(scheme.count)
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        let authority = rest[..<slash]
        path = slash == rest.endIndex ? "/" : String(rest[slash...])
        // host: a DNS name or IPv4 address, or an IPv6 address in brackets; port: digits only.
        var hostPart = authority
        var portPart: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { return nil }
            hostPart = authority[...close]
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { return nil }
                portPart = after.dropFirst()
            }
            guard hostPart.dropFirst().dropLast().allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }), hostPart.count > 2 else { return nil }
        } else {
            if let colon = authority.firstIndex(of: ":") {
                hostPart = authority[..<colon]
                portPart = authority[authority.index(after: colon)...]
            }
            guard hostPart.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_") }) else { return nil }
        }
        guard !hostPart.isEmpty else { return nil }
        host = String(hostPart)
        if let portPart {
            guard !portPart.isEmpty, portPart.count <= 5, portPart.allSatisfy({ $0.isASCII && $0.isNumber }), let p = Int(portPart), (1...65535).contains(p) else { return nil }
            port = p
        } else {
            port = tls ? 443 : 80
        }
        self.text = text
    }
}
