import TOMLKit
import WeftCore

/// Turns TOML text into a `ClusterConfiguration`, checking types, ranges and cross-key rules in file
/// order (`[cluster]`, `[storage]`, `[raft]`, `[[nodes]]`, then rules that span tables) and throwing the
/// first problem found. TOMLKit's values are read only through its optional accessors, so a value of
/// the wrong type is a `ConfigError`, never a crash.
struct ConfigParser {
    /// The configuration file, for messages and for resolving `storage.data_dir`.
    let file: String

    static let rootKeys = ["cluster", "storage", "raft", "api", "messaging", "delivery", "push", "nodes"]
    static let deliveryKeys = ["session_queue_max", "write_stall_ms"]
    static let pushKeys = ["webhook_url", "ca_file", "delay_ms", "secret", "retry_max_ms"]
    static let messagingKeys = [
        "bcrypt_cost", "token_ttl_seconds", "sends_per_minute", "history_reads_per_minute", "actions_per_minute", "syncs_per_minute",
        "logins_per_minute", "group_members_max",
    ]
    static let clusterKeys = ["name", "shards", "replication", "secret", "founders"]
    static let apiKeys = ["operator_token"]
    static let storageKeys = ["data_dir", "fsync", "segment_bytes", "snapshot_every_records", "retention"]
    static let raftKeys = ["election_timeout_min_ms", "election_timeout_max_ms", "heartbeat_interval_ms", "driver_threads"]
    static let nodeKeys = ["id", "peer_addr", "api_addr"]

    func parse(_ text: String) throws(ConfigError) -> ClusterConfiguration {
        // TOMLKit passes the text to C as a NUL-terminated string: anything after a NUL would be ignored.
        if let nul = text.utf8.firstIndex(of: 0) {
            let line = text.utf8[..<nul].reduce(1) { $1 == UInt8(ascii: "\n") ? $0 + 1 : $0 }
            throw ConfigError(file: file, line: line, message: "the file contains a NUL byte")
        }
        let rootTable: TOMLTable
        do {
            rootTable = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw ConfigError(
                file: file, line: error.source.begin.line, column: error.source.begin.column,
                message: "TOML syntax error: \(error.description)")
        } catch {
            throw ConfigError(file: file, message: "TOML syntax error: \(error)")
        }
        let root = TableReader(table: rootTable, path: nil, file: file)
        try root.rejectUnknownKeys(Self.rootKeys)

        // [cluster]
        guard let cluster = try root.table("cluster") else {
            throw root.error("cluster", "the required table [cluster] is missing")
        }
        try cluster.rejectUnknownKeys(Self.clusterKeys)
        let name = try cluster.requiredString("name")
        guard !name.isEmpty else { throw cluster.error("name", "must not be empty") }
        let shards = try cluster.int("shards") ?? ClusterConfiguration.defaultShards
        guard ClusterConfiguration.shardsRange.contains(shards) else {
            throw cluster.error("shards", "must be \(rangeText(ClusterConfiguration.shardsRange)), got \(shards)")
        }
        let replicationGiven = try cluster.int("replication")
        let replication = replicationGiven ?? ClusterConfiguration.defaultReplication
        let secret = try cluster.requiredString("secret")
        guard secret.utf8.count >= ClusterConfiguration.secretBytesMin else {
            // Never echo the secret itself.
            throw cluster.error(
                "secret", "must be at least \(ClusterConfiguration.secretBytesMin) bytes, got \(secret.utf8.count)")
        }

        let storage = try parseStorage(root.table("storage"))
        let raft = try parseRaft(root.table("raft"))
        guard let apiTable = try root.table("api") else {
            throw root.error("api", "the required table [api] is missing (it holds operator_token)")
        }
        try apiTable.rejectUnknownKeys(Self.apiKeys)
        let token = try apiTable.requiredString("operator_token")
        guard token.utf8.count >= ClusterConfiguration.operatorTokenBytesMin else {
            // Never echo the token itself.
            throw apiTable.error(
                "operator_token", "must be at least \(ClusterConfiguration.operatorTokenBytesMin) bytes, got \(token.utf8.count)")
        }
        guard token.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw apiTable.error("operator_token", "must be printable ASCII without spaces (it is sent in an HTTP header)")
        }
        let nodes = try parseNodes(root)
        let founders = try parseFounders(cluster, nodes: nodes)

        guard (1...founders.count).contains(replication) else {
            let suffix = replicationGiven == nil ? " (the default)" : ""
            throw cluster.error(
                "replication",
                "must be 1...\(founders.count) (the number of founding nodes), got \(replication)\(suffix)")
        }
        var config = ClusterConfiguration(
            name: name, shards: shards, replication: replication, secret: secret, storage: storage, raft: raft,
            operatorToken: token, nodes: nodes.sorted { $0.id < $1.id }, founders: founders, configPath: file)
        config.messaging = try parseMessaging(root.table("messaging"))
        config.delivery = try parseDelivery(root.table("delivery"))
        config.push = try parsePush(root.table("push"))
        return config
    }

    private func ranged(_ t: TableReader, _ key: String, _ range: ClosedRange<Int>) throws(ConfigError) -> Int? {
        guard let v = try t.int(key) else { return nil }
        guard range.contains(v) else { throw t.error(key, "must be \(rangeText(range)), got \(v)") }
        return v
    }

    /// `[delivery]`: every key optional (defaults in `DeliveryConfig`).
    private func parseDelivery(_ t: TableReader?) throws(ConfigError) -> DeliveryConfig {
        var d = DeliveryConfig()
        guard let t else { return d }
        try t.rejectUnknownKeys(Self.deliveryKeys)
        if let v = try ranged(t, "session_queue_max", DeliveryConfig.sessionQueueRange) { d.sessionQueueMax = v }
        if let v = try ranged(t, "write_stall_ms", DeliveryConfig.writeStallRange) { d.writeStallMillis = v }
        return d
    }

    /// `[push]`: every key optional; no `webhook_url`, no push.
    private func parsePush(_ t: TableReader?) throws(ConfigError) -> PushConfig {
        var p = PushConfig()
        guard let t else { return p }
        try t.rejectUnknownKeys(Self.pushKeys)
        if let text = try t.string("webhook_url") {
            guard let url = WebhookURL(text) else {
                throw t.error("webhook_url", "must be http://host[:port][/path] or https://host[:port][/path], got \"\(text.prefix(200))\"")
            }
            p.webhookURL = url
        }
        if let text = try t.string("ca_file") {
            guard p.webhookURL?.tls == true else {
                throw t.error("ca_file", "is for an https webhook_url (it names the certificates to trust)")
            }
            guard !text.isEmpty, let path = resolvePath(text, againstDirectoryOf: file) else {
                throw t.error("ca_file", "\(quoted(text)) is empty, or relative and the working directory cannot be determined")
            }
            // Read here so a missing or unreadable file stops the start with its name; the certificates
            // themselves are parsed when the push worker starts (Docs/delivery.md).
            let pem: String
            do throws(ConfigError) {
                pem = try readTextFile(path)
            } catch {
                throw t.error("ca_file", "\(path): \(error.message)")
            }
            guard pem.contains("-----BEGIN CERTIFICATE-----") else {
                throw t.error("ca_file", "\(path) holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
            }
            p.caFile = path
        }
        if let v = try ranged(t, "delay_ms", PushConfig.delayRange) { p.delayMillis = v }
        if let v = try ranged(t, "retry_max_ms", PushConfig.retryMaxRange) { p.retryMaxMillis = v }
        if let s = try t.string("secret") {
            guard s.utf8.count >= 16 else { throw t.error("secret", "must be at least 16 bytes") }
            p.secret = s
        }
        return p
    }

    /// `[messaging]`: every key optional (defaults in `MessagingConfig`).
    private func parseMessaging(_ t: TableReader?) throws(ConfigError) -> MessagingConfig {
        var m = MessagingConfig()
        guard let t else { return m }
        try t.rejectUnknownKeys(Self.messagingKeys)
        func ranged(_ key: String, _ range: ClosedRange<Int>) throws(ConfigError) -> Int? {
            guard let v = try t.int(key) else { return nil }
            guard range.contains(v) else { throw t.error(key, "must be \(rangeText(range)), got \(v)") }
            return v
        }
        if let v = try ranged("bcrypt_cost", MessagingConfig.bcryptCostRange) { m.bcryptCost = v }
        if let v = try ranged("token_ttl_seconds", MessagingConfig.tokenTTLRange) { m.tokenTTLSeconds = v }
        if let v = try ranged("sends_per_minute", MessagingConfig.perMinuteRange) { m.sendsPerMinute = v }
        if let v = try ranged("history_reads_per_minute", MessagingConfig.perMinuteRange) { m.historyReadsPerMinute = v }
        if let v = try ranged("actions_per_minute", MessagingConfig.perMinuteRange) { m.actionsPerMinute = v }
        if let v = try ranged("syncs_per_minute", MessagingConfig.perMinuteRange) { m.syncsPerMinute = v }
        if let v = try ranged("logins_per_minute", MessagingConfig.perMinuteRange) { m.loginsPerMinute = v }
        if let v = try ranged("group_members_max", MessagingConfig.groupMembersRange) { m.groupMembersMax = v }
        return m
    }

    /// `cluster.founders`: the ids of the nodes the cluster was created with (default: every [[nodes]]
    /// id). Shard placement is computed over them only, so adding a node to [[nodes]] moves nothing.
    private func parseFounders(_ cluster: TableReader, nodes: [NodeConfig]) throws(ConfigError) -> [NodeID] {
        guard let value = cluster.value("founders") else { return nodes.map(\.id).sorted() }
        guard let array = value.array else {
            throw cluster.error("founders", "must be an array of node ids, got \(typeName(value.type))")
        }
        guard array.count > 0 else { throw cluster.error("founders", "must name at least one node") }
        var ids: [NodeID] = []
        for k in 0..<array.count {
            guard let n = array[k].int else {
                throw cluster.error("founders", "element \(k): expected an integer, got \(typeName(array[k].type))")
            }
            guard n >= 1, nodes.contains(where: { $0.id == NodeID(UInt64(n)) }) else {
                throw cluster.error("founders", "element \(k): \(n) is not the id of a [[nodes]] entry")
            }
            guard !ids.contains(NodeID(UInt64(n))) else { throw cluster.error("founders", "element \(k): \(n) is listed twice") }
            ids.append(NodeID(UInt64(n)))
        }
        return ids.sorted()
    }

    private func parseStorage(_ storage: TableReader?) throws(ConfigError) -> StorageConfig {
        let keyPath = "storage"
        try storage?.rejectUnknownKeys(Self.storageKeys)

        let dataDirText = try storage?.string("data_dir") ?? StorageConfig.defaultDataDir
        guard !dataDirText.isEmpty else {
            throw ConfigError(file: file, keyPath: "\(keyPath).data_dir", message: "must not be empty")
        }
        guard let dataDir = resolvePath(dataDirText, againstDirectoryOf: file) else {
            throw ConfigError(
                file: file, keyPath: "\(keyPath).data_dir",
                message: "\(quoted(dataDirText)) is relative and the working directory cannot be determined")
        }

        var fsync = FsyncPolicy.everyBatch
        if let text = try storage?.string("fsync") {
            guard let policy = Self.parseFsync(text) else {
                throw ConfigError(
                    file: file, keyPath: "\(keyPath).fsync",
                    message: "must be \"every_batch\", \"every_n_batches:N\" with N >= 1, or \"never\"; got \(quoted(text))")
            }
            fsync = policy
        }

        var segmentBytes = StorageConfig.defaultSegmentBytes
        if let value = try storage?.int("segment_bytes") {
            guard value >= 0, UInt64(value) >= StorageConfig.segmentBytesMin else {
                throw ConfigError(
                    file: file, keyPath: "\(keyPath).segment_bytes",
                    message: "must be at least \(StorageConfig.segmentBytesMin), got \(value)")
            }
            segmentBytes = UInt64(value)
        }
        var snapshotEvery = StorageConfig.defaultSnapshotEveryRecords
        if let value = try storage?.int("snapshot_every_records") {
            guard value >= 0, StorageConfig.snapshotEveryRecordsRange.contains(UInt64(value)) else {
                throw ConfigError(
                    file: file, keyPath: "\(keyPath).snapshot_every_records",
                    message: "must be \(StorageConfig.snapshotEveryRecordsRange.lowerBound)...\(StorageConfig.snapshotEveryRecordsRange.upperBound), got \(value)")
            }
            snapshotEvery = UInt64(value)
        }
        var retention = Retention.off
        if let text = try storage?.string("retention") {
            switch Retention.parse(text, segmentBytes: segmentBytes) {
            case .success(let r): retention = r
            case .failure(let e): throw ConfigError(file: file, keyPath: "\(keyPath).retention", message: e.message)
            }
        }
        return StorageConfig(dataDir: dataDir, fsync: fsync, segmentBytes: segmentBytes, snapshotEveryRecords: snapshotEvery, retention: retention)
    }

    /// `every_batch`, `never`, or `every_n_batches:N` with N decimal digits, N >= 1.
    static func parseFsync(_ text: String) -> FsyncPolicy? {
        switch text {
        case "every_batch": return .everyBatch
        case "never": return .never
        default:
            let prefix = "every_n_batches:"
            guard text.utf8.starts(with: prefix.utf8) else { return nil }
            let digits = text.utf8.dropFirst(prefix.utf8.count)
            guard (1...18).contains(digits.count), digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
            let n = digits.reduce(0) { $0 * 10 + Int($1 - 0x30) }  // at most 18 digits: no overflow
            return n >= 1 ? .everyBatches(n) : nil
        }
    }

    private func parseRaft(_ raft: TableReader?) throws(ConfigError) -> RaftTiming {
        try raft?.rejectUnknownKeys(Self.raftKeys)
        let limit = 1...RaftTiming.timeoutMsMax

        /// The value and whether the file gave it (messages mention defaults, which the reader cannot see).
        func value(_ key: String, default fallback: Int) throws(ConfigError) -> (Int, given: Bool) {
            guard let given = try raft?.int(key) else { return (fallback, false) }
            guard limit.contains(given) else {
                throw ConfigError(file: file, keyPath: "raft.\(key)", message: "must be \(rangeText(limit)), got \(given)")
            }
            return (given, true)
        }
        let (minMs, minGiven) = try value("election_timeout_min_ms", default: RaftTiming.defaultElectionTimeoutMinMs)
        let (maxMs, maxGiven) = try value("election_timeout_max_ms", default: RaftTiming.defaultElectionTimeoutMaxMs)
        let (heartbeatMs, heartbeatGiven) = try value(
            "heartbeat_interval_ms", default: RaftTiming.defaultHeartbeatIntervalMs)
        let minText = "raft.election_timeout_min_ms (\(minMs)\(minGiven ? "" : ", the default"))"
        guard maxMs > minMs else {
            throw ConfigError(
                file: file, keyPath: "raft.election_timeout_max_ms",
                message: "must be greater than \(minText), got \(maxMs)\(maxGiven ? "" : " (the default)")")
        }
        // heartbeat < min / 2, exactly; both are positive, so `minMs - heartbeatMs` cannot overflow.
        guard heartbeatMs < minMs - heartbeatMs else {
            throw ConfigError(
                file: file, keyPath: "raft.heartbeat_interval_ms",
                message: "must be less than half of \(minText), got \(heartbeatMs)\(heartbeatGiven ? "" : " (the default)")")
        }
        var timing = RaftTiming(electionTimeoutMinMs: minMs, electionTimeoutMaxMs: maxMs, heartbeatIntervalMs: heartbeatMs)
        if let threads = try raft?.int("driver_threads") {
            let allowed = 1...RaftTiming.driverThreadsMax
            guard allowed.contains(threads) else {
                throw ConfigError(file: file, keyPath: "raft.driver_threads", message: "must be \(rangeText(allowed)), got \(threads)")
            }
            timing.driverThreads = threads
        }
        return timing
    }

    private func parseNodes(_ root: TableReader) throws(ConfigError) -> [NodeConfig] {
        let required = "at least one [[nodes]] entry is required"
        guard let value = root.value("nodes") else { throw root.error("nodes", required) }
        guard let array = value.array else {
            throw root.error("nodes", "must be an array of tables ([[nodes]]), got \(typeName(value.type))")
        }
        guard array.count > 0 else { throw root.error("nodes", required) }

        var nodes: [NodeConfig] = []
        var indexOfID: [NodeID: Int] = [:]
        var keyPathOfAddress: [HostPort: String] = [:]
        for index in 0..<array.count {
            let path = "nodes[\(index)]"
            let element = array[index]
            guard let table = element.table else {
                throw ConfigError(file: file, keyPath: path, message: "expected a table, got \(typeName(element.type))")
            }
            let node = TableReader(table: table, path: path, file: file)
            try node.rejectUnknownKeys(Self.nodeKeys)

            let rawID = try node.requiredInt("id")
            guard rawID >= 1 else { throw node.error("id", "must be at least 1, got \(rawID)") }
            let id = NodeID(UInt64(rawID))
            if let other = indexOfID[id] {
                throw node.error("id", "\(rawID) is already the id of nodes[\(other)]")
            }
            indexOfID[id] = index

            let peer = try node.requiredAddress("peer_addr")
            let api = try node.requiredAddress("api_addr")
            for (key, address) in [("peer_addr", peer), ("api_addr", api)] {
                let canonical = address.canonical
                if let other = keyPathOfAddress[canonical] {
                    throw node.error(key, "\(quoted(address.description)) is already used by \(other)")
                }
                keyPathOfAddress[canonical] = node.keyPath(key)
            }
            nodes.append(NodeConfig(id: id, peerAddress: peer, apiAddress: api))
        }
        return nodes
    }
}

/// One TOML table and where it sits in the document, for reading typed values with useful errors.
struct TableReader {
    let table: TOMLTable
    /// The table's key path (`cluster`, `nodes[2]`), nil for the document root.
    let path: String?
    let file: String

    func keyPath(_ key: String) -> String {
        let part = key.utf8.allSatisfy(Self.isBareKeyByte) && !key.isEmpty ? key : quoted(key)
        return path.map { "\($0).\(part)" } ?? part
    }

    func error(_ key: String, _ message: String) -> ConfigError {
        ConfigError(file: file, keyPath: keyPath(key), message: message)
    }

    /// Typos must not pass silently: any key outside `allowed` is an error (sorted, so the first is reported).
    func rejectUnknownKeys(_ allowed: [String]) throws(ConfigError) {
        for key in table.keys.sorted() where !allowed.contains(key) {
            throw error(key, "unknown key (expected one of: \(allowed.joined(separator: ", ")))")
        }
    }

    func value(_ key: String) -> (any TOMLValueConvertible)? {
        table[key]
    }

    func table(_ key: String) throws(ConfigError) -> TableReader? {
        guard let value = table[key] else { return nil }
        guard let child = value.table else { throw mismatch(key, expected: .table, got: value.type) }
        return TableReader(table: child, path: keyPath(key), file: file)
    }

    func int(_ key: String) throws(ConfigError) -> Int? {
        guard let value = table[key] else { return nil }
        guard let int = value.int else { throw mismatch(key, expected: .int, got: value.type) }
        return int
    }

    func string(_ key: String) throws(ConfigError) -> String? {
        guard let value = table[key] else { return nil }
        guard let string = value.string else { throw mismatch(key, expected: .string, got: value.type) }
        return string
    }

    func requiredInt(_ key: String) throws(ConfigError) -> Int {
        guard let int = try int(key) else { throw error(key, "required key is missing") }
        return int
    }

    func requiredString(_ key: String) throws(ConfigError) -> String {
        guard let string = try string(key) else { throw error(key, "required key is missing") }
        return string
    }

    /// A required `"host:port"` string.
    func requiredAddress(_ key: String) throws(ConfigError) -> HostPort {
        let text = try requiredString(key)
        switch HostPort.parse(text) {
        case .success(let address): return address
        case .failure(let problem): throw error(key, problem.message)
        }
    }

    private func mismatch(_ key: String, expected: TOMLType, got: TOMLType) -> ConfigError {
        error(key, "expected \(typeName(expected)), got \(typeName(got))")
    }

    private static func isBareKeyByte(_ byte: UInt8) -> Bool {
        (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
            || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
    }
}

/// A TOML type with its article, for messages: "an integer", "a string".
func typeName(_ type: TOMLType) -> String {
    switch type {
    case .table: "a table"
    case .array: "an array"
    case .string: "a string"
    case .int: "an integer"
    case .double: "a float"
    case .bool: "a boolean"
    case .date: "a date"
    case .time: "a time"
    case .dateTime: "a date-time"
    }
}

func rangeText(_ range: ClosedRange<Int>) -> String {
    "\(range.lowerBound)...\(range.upperBound)"
}
