import ClusterConfig
import Testing

/// One way to break the configuration, and what the error must say.
struct Rejection: Sendable, CustomTestStringConvertible {
    let toml: String
    /// The key path the message must name, right after the file.
    let key: String
    /// A fragment of the message that says what is wrong.
    let problem: String

    init(_ key: String, _ problem: String, _ toml: String) {
        self.key = key
        self.problem = problem
        self.toml = toml
    }

    var testDescription: String { "\(key): \(problem)" }
}

private let secretLine = "secret = \"\(validSecret)\""
private func cluster(_ lines: String) -> String { "name = \"test\"\n\(secretLine)\n\(lines)" }
private func node0(_ lines: String) -> String {
    "[[nodes]]\n\(lines)\n\n" + nodes(ids: [2, 3])
}

let rejections: [Rejection] = [
    // [cluster]
    Rejection("cluster", "the required table [cluster] is missing", "[storage]\n" + threeNodes),
    Rejection("cluster", "expected a table, got an integer", "cluster = 5\n" + threeNodes),
    Rejection("cluster.name", "required key is missing", document(cluster: secretLine)),
    Rejection("cluster.name", "must not be empty", document(cluster: "name = \"\"\n\(secretLine)")),
    Rejection("cluster.name", "expected a string, got an integer", document(cluster: "name = 1\n\(secretLine)")),
    Rejection("cluster.shards", "must be 1...1024, got 0", document(cluster: cluster("shards = 0"))),
    Rejection("cluster.shards", "must be 1...1024, got 1025", document(cluster: cluster("shards = 1025"))),
    Rejection("cluster.shards", "must be 1...1024, got -8", document(cluster: cluster("shards = -8"))),
    Rejection("cluster.shards", "expected an integer, got a string", document(cluster: cluster("shards = \"8\""))),
    Rejection("cluster.shards", "expected an integer, got a float", document(cluster: cluster("shards = 8.0"))),
    Rejection("cluster.replication", "must be 1...3 (the number of founding nodes), got 0", document(cluster: cluster("replication = 0"))),
    Rejection("cluster.replication", "must be 1...3 (the number of founding nodes), got 4", document(cluster: cluster("replication = 4"))),
    Rejection("cluster.replication", "must be 1...2 (the number of founding nodes), got 3 (the default)", document(nodes: nodes(ids: [1, 2]))),
    Rejection("cluster.replication", "expected an integer, got a boolean", document(cluster: cluster("replication = true"))),
    Rejection("cluster.secret", "required key is missing", document(cluster: "name = \"test\"")),
    Rejection("cluster.secret", "must be at least 16 bytes, got 15", document(cluster: "name = \"t\"\nsecret = \"0123456789abcde\"")),
    Rejection("cluster.secret", "expected a string, got an array", document(cluster: "name = \"t\"\nsecret = [1]")),
    Rejection("cluster.shard", "unknown key (expected one of: name, shards, replication, secret, founders)", document(cluster: cluster("shard = 8"))),
    Rejection("cluster.\"two words\"", "unknown key", document(cluster: cluster("\"two words\" = 1"))),
    Rejection("cluster.shards", "expected an integer, got a table", document(cluster: cluster("shards.count = 8"))),
    Rejection("cluster.founders", "element 1: 7 is not the id of a [[nodes]] entry", document(cluster: cluster("founders = [1, 7]"))),
    Rejection("cluster.founders", "element 1: 1 is listed twice", document(cluster: cluster("founders = [1, 1]"))),
    Rejection("cluster.founders", "must name at least one node", document(cluster: cluster("founders = []"))),
    Rejection("cluster.founders", "must be an array of node ids, got an integer", document(cluster: cluster("founders = 3"))),
    Rejection("cluster.replication", "must be 1...2 (the number of founding nodes), got 3 (the default)", document(cluster: cluster("founders = [1, 2]"))),
    // [api]
    Rejection("api", "the required table [api] is missing", document(api: nil)),
    Rejection("api.operator_token", "required key is missing", document(api: "")),
    Rejection("api.operator_token", "must be at least 16 bytes, got 5", document(api: "operator_token = \"short\"")),
    Rejection("api.operator_token", "printable ASCII", document(api: "operator_token = \"has a space 0123456789\"")),
    Rejection("api.token", "unknown key (expected one of: operator_token)", document(api: "operator_token = \"\(validToken)\"\ntoken = 1")),
    // top level
    Rejection("stroage", "unknown key (expected one of: cluster, storage, raft, api, messaging, delivery, push, nodes)", document(extra: "[stroage]\ndata_dir = \"x\"")),
    Rejection("push.webhook_url", "must be http://host[:port][/path] or https://", document(extra: "[push]\nwebhook_url = \"ftp://hooks.example/p\"")),
    Rejection("push.webhook_url", "must be http://host[:port][/path]", document(extra: "[push]\nwebhook_url = \"https://hooks.example:0/p\"")),
    Rejection("push.ca_file", "is for an https webhook_url", document(extra: "[push]\nwebhook_url = \"http://h/p\"\nca_file = \"/etc/passwd\"")),
    Rejection("push.ca_file", "/nonexistent-weft/ca.pem: cannot open the file", document(extra: "[push]\nwebhook_url = \"https://h/p\"\nca_file = \"/nonexistent-weft/ca.pem\"")),
    Rejection("push.ca_file", "/etc/passwd holds no PEM certificate", document(extra: "[push]\nwebhook_url = \"https://h/p\"\nca_file = \"/etc/passwd\"")),
    Rejection("push.webhook_url", "must be http://host[:port][/path]", document(extra: "[push]\nwebhook_url = \"http://h:99999/p\"")),
    Rejection("push.delay_ms", "must be", document(extra: "[push]\ndelay_ms = -1")),
    Rejection("push.secret", "at least 16 bytes", document(extra: "[push]\nsecret = \"short\"")),
    Rejection("push.hook", "unknown key", document(extra: "[push]\nhook = 1")),
    Rejection("delivery.session_queue_max", "must be", document(extra: "[delivery]\nsession_queue_max = 1")),
    Rejection("delivery.write_stall_ms", "expected", document(extra: "[delivery]\nwrite_stall_ms = \"slow\"")),
    Rejection("version", "unknown key", "version = 1\n" + document()),
    // [storage]
    Rejection("storage", "expected a table, got a string", "storage = \"x\"\n" + document()),
    Rejection("storage.data_dir", "must not be empty", document(storage: "data_dir = \"\"")),
    Rejection("storage.data_dir", "expected a string, got an integer", document(storage: "data_dir = 5")),
    Rejection("storage.fsync", "got \"sometimes\"", document(storage: "fsync = \"sometimes\"")),
    Rejection("storage.fsync", "N >= 1", document(storage: "fsync = \"every_n_batches:0\"")),
    Rejection("storage.fsync", "got \"every_n_batches:\"", document(storage: "fsync = \"every_n_batches:\"")),
    Rejection("storage.fsync", "got \"every_n_batches:-2\"", document(storage: "fsync = \"every_n_batches:-2\"")),
    Rejection("storage.fsync", "got \"every_n_batches: 2\"", document(storage: "fsync = \"every_n_batches: 2\"")),
    Rejection("storage.fsync", "got \"every_n_batches:99999999999999999999\"", document(storage: "fsync = \"every_n_batches:99999999999999999999\"")),
    Rejection("storage.fsync", "got \"EVERY_BATCH\"", document(storage: "fsync = \"EVERY_BATCH\"")),
    Rejection("storage.fsync", "expected a string, got a boolean", document(storage: "fsync = true")),
    Rejection("storage.segment_bytes", "must be at least 4096, got 4095", document(storage: "segment_bytes = 4095")),
    Rejection("storage.segment_bytes", "must be at least 4096, got -1", document(storage: "segment_bytes = -1")),
    Rejection("storage.segment_bytes", "expected an integer, got a float", document(storage: "segment_bytes = 6.4e7")),
    Rejection("storage.fsync_policy", "unknown key (expected one of: data_dir, fsync, segment_bytes, snapshot_every_records, retention)", document(storage: "fsync_policy = \"never\"")),
    Rejection("storage.snapshot_every_records", "must be 1...1000000000, got 0", document(storage: "snapshot_every_records = 0")),
    Rejection("storage.retention", "\"forever\" is not a size (10GiB) or an age (30d, 12h)", document(storage: "retention = \"forever\"")),
    Rejection("storage.retention", "\"10GB\": unknown unit (KiB, MiB, GiB, TiB, h, d)", document(storage: "retention = \"10GB\"")),
    Rejection("storage.retention", "1KiB is below one segment (segment_bytes = 67108864)", document(storage: "retention = \"1KiB\"")),
    Rejection("storage.retention", "100000000000000d is out of range", document(storage: "retention = \"100000000000000d\"")),
    Rejection("storage.retention", "\"30m\": unknown unit (KiB, MiB, GiB, TiB, h, d)", document(storage: "retention = \"30m\"")),
    Rejection("storage.retention", "two ages given", document(storage: "retention = \"1d, 2d\"")),
    Rejection("storage.retention", "\"\" is not a size (10GiB) or an age (30d, 12h)", document(storage: "retention = \"\"")),
    Rejection("storage.snapshot_every_records", "must be 1...1000000000, got -5", document(storage: "snapshot_every_records = -5")),
    // [raft]
    Rejection("raft.election_timeout_min_ms", "must be 1...3600000, got 0", document(raft: "election_timeout_min_ms = 0")),
    Rejection("raft.election_timeout_max_ms", "must be 1...3600000, got 3600001", document(raft: "election_timeout_max_ms = 3600001")),
    Rejection("raft.election_timeout_max_ms", "must be greater than raft.election_timeout_min_ms (300, the default), got 300", document(raft: "election_timeout_max_ms = 300")),
    Rejection("raft.election_timeout_max_ms", "must be greater than raft.election_timeout_min_ms (700), got 600 (the default)", document(raft: "election_timeout_min_ms = 700")),
    Rejection("raft.heartbeat_interval_ms", "must be less than half of raft.election_timeout_min_ms (300, the default), got 150", document(raft: "heartbeat_interval_ms = 150")),
    Rejection("raft.heartbeat_interval_ms", "must be less than half of raft.election_timeout_min_ms (101), got 51", document(raft: "election_timeout_min_ms = 101\nheartbeat_interval_ms = 51")),
    Rejection("raft.heartbeat_interval_ms", "must be 1...3600000, got 0", document(raft: "heartbeat_interval_ms = 0")),
    Rejection("raft.driver_threads", "must be 1...256, got 0", document(raft: "driver_threads = 0")),
    Rejection("raft.driver_threads", "must be 1...256, got 1000", document(raft: "driver_threads = 1000")),
    Rejection("raft.heartbeat_interval_ms", "must be less than half of raft.election_timeout_min_ms (90), got 50 (the default)", document(raft: "election_timeout_min_ms = 90")),
    Rejection("raft.heartbeat_interval_ms", "expected an integer, got a string", document(raft: "heartbeat_interval_ms = \"50ms\"")),
    Rejection("raft.heartbeat_ms", "unknown key", document(raft: "heartbeat_ms = 50")),
    // [[nodes]]
    Rejection("nodes", "at least one [[nodes]] entry is required", document(nodes: "")),
    Rejection("nodes", "at least one [[nodes]] entry is required", document(nodes: "nodes = []")),
    Rejection("nodes", "must be an array of tables ([[nodes]]), got a table", document(nodes: "[nodes]\nid = 1")),
    Rejection("nodes[0]", "expected a table, got an integer", document(nodes: "nodes = [1]")),
    Rejection("nodes[0].id", "required key is missing", document(nodes: node0("peer_addr = \"h:1\"\napi_addr = \"h:2\""))),
    Rejection("nodes[0].id", "must be at least 1, got 0", document(nodes: node0("id = 0\npeer_addr = \"h:1\"\napi_addr = \"h:2\""))),
    Rejection("nodes[0].id", "expected an integer, got a string", document(nodes: node0("id = \"1\"\npeer_addr = \"h:1\"\napi_addr = \"h:2\""))),
    Rejection("nodes[2].id", "2 is already the id of nodes[1]", document(nodes: nodes(ids: [1, 2, 2]))),
    Rejection("nodes[0].peer_addr", "required key is missing", document(nodes: node0("id = 1\napi_addr = \"h:2\""))),
    Rejection("nodes[0].api_addr", "required key is missing", document(nodes: node0("id = 1\npeer_addr = \"h:1\""))),
    Rejection("nodes[0].peer_adr", "unknown key (expected one of: id, peer_addr, api_addr)", document(nodes: node0("id = 1\npeer_adr = \"h:1\"\npeer_addr = \"h:1\"\napi_addr = \"h:2\""))),
    Rejection("nodes[0].peer_addr", "expected a string, got an integer", document(nodes: node0("id = 1\npeer_addr = 7101\napi_addr = \"h:2\""))),
    Rejection("nodes[0].api_addr", "\"h:1\" is already used by nodes[0].peer_addr", document(nodes: node0("id = 1\npeer_addr = \"h:1\"\napi_addr = \"h:1\""))),
    Rejection("nodes[2].peer_addr", "\"127.0.0.1:7101\" is already used by nodes[0].peer_addr", document(nodes: threeNodes.replacingOccurrences("127.0.0.1:7103", "127.0.0.1:7101"))),
    Rejection("nodes[1].api_addr", "\"HOST.example:9\" is already used by nodes[0].peer_addr", document(cluster: cluster("replication = 2"), nodes: """
        [[nodes]]
        id = 1
        peer_addr = "host.example:9"
        api_addr = "host.example:10"
        [[nodes]]
        id = 2
        peer_addr = "host.example:11"
        api_addr = "HOST.example:9"
        """)),
    Rejection("nodes[0].peer_addr", "must be \"host:port\"", document(nodes: node0("id = 1\npeer_addr = \"127.0.0.1\"\napi_addr = \"h:2\""))),
    Rejection("nodes[0].peer_addr", "port must be 1...65535, got \"0\"", document(nodes: node0("id = 1\npeer_addr = \"127.0.0.1:0\"\napi_addr = \"h:2\""))),
    Rejection("nodes[0].api_addr", "port must be 1...65535, got \"65536\"", document(nodes: node0("id = 1\npeer_addr = \"h:1\"\napi_addr = \"h:65536\""))),
    Rejection("nodes[0].peer_addr", "an IPv6 address must be in brackets", document(nodes: node0("id = 1\npeer_addr = \"::1:7000\"\napi_addr = \"h:2\""))),
    Rejection("nodes[0].peer_addr", "invalid IPv4 address \"127.0.0.256\"", document(nodes: node0("id = 1\npeer_addr = \"127.0.0.256:1\"\napi_addr = \"h:2\""))),
    Rejection("nodes[0].peer_addr", "invalid host name \"bad_host\"", document(nodes: node0("id = 1\npeer_addr = \"bad_host:1\"\napi_addr = \"h:2\""))),
]

@Suite struct ValidationTests {
    @Test(arguments: rejections)
    func everyRuleRejectsNamingTheKey(_ rejection: Rejection) {
        guard let error = parseError(rejection.toml) else { return }
        #expect(error.file == "cluster.toml")
        #expect(error.keyPath == rejection.key)
        #expect(error.description.hasPrefix("cluster.toml: \(rejection.key): "))
        #expect(error.message.contains(rejection.problem), "\(error)")
    }

    @Test func theSecretIsNeverEchoed() {
        let error = parseError(document(cluster: "name = \"t\"\nsecret = \"hunter2\""))
        #expect(error?.description == "cluster.toml: cluster.secret: must be at least 16 bytes, got 7")
    }

    @Test func secretLengthCountsUTF8Bytes() throws {
        // 8 two-byte characters: 16 bytes.
        let config = try ClusterConfiguration.parse(
            document(cluster: "name = \"t\"\nsecret = \"éééééééé\""), configPath: "cluster.toml")
        #expect(config.secret.utf8.count == 16)
    }

    @Test func theExampleMessageFromTheDesign() {
        let error = parseError(document(cluster: cluster("shards = 0")))
        #expect(error?.description == "cluster.toml: cluster.shards: must be 1...1024, got 0")
    }
}

extension String {
    fileprivate func replacingOccurrences(_ target: String, _ replacement: String) -> String {
        split(separator: target, omittingEmptySubsequences: false).joined(separator: replacement)
    }
}
