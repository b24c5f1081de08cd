import ClusterConfig
import Foundation
import Testing
import WeftCore

@Suite struct ParseTests {
    @Test func exampleFileParses() throws {
        let root = packageRoot()
        let path = root + "/cluster.example.toml"
        let config = try ClusterConfiguration.load(path: path)
        #expect(config.name == "weft-local")
        #expect(config.nodes.count == 3)
        #expect(config.shards == 8)
        #expect(config.replication == 3)
        #expect(config.secret == "change-me-local-only")
        #expect(config.storage == StorageConfig(dataDir: root + "/data", fsync: .everyBatch, segmentBytes: 67_108_864))
        #expect(config.raft == RaftTiming(electionTimeoutMinMs: 300, electionTimeoutMaxMs: 600, heartbeatIntervalMs: 50))
        #expect(config.raft.driverThreads == 2)
        #expect(config.nodes.map(\.id) == [NodeID(1), NodeID(2), NodeID(3)])
        #expect(config.node(NodeID(2))?.peerAddress == HostPort(host: "127.0.0.1", port: 7102))
        #expect(config.node(NodeID(3))?.apiAddress.description == "127.0.0.1:8103")
        #expect(config.node(NodeID(4)) == nil)
        #expect(config.dataDirectory(for: NodeID(2)) == root + "/data/2")
        #expect(config.configPath == path)
    }

    @Test func defaultsApplyWhenKeysAreMissing() throws {
        let config = try ClusterConfiguration.parse(document(), configPath: "/etc/weft/cluster.toml")
        #expect(config.shards == 8)
        #expect(config.replication == 3)
        #expect(config.storage == StorageConfig(dataDir: "/etc/weft/data", fsync: .everyBatch, segmentBytes: 64 << 20))
        #expect(config.raft == RaftTiming(electionTimeoutMinMs: 300, electionTimeoutMaxMs: 600, heartbeatIntervalMs: 50))
        #expect(config.raft.driverThreads == 2)

        // Empty [storage] and [raft] tables behave like missing ones.
        let empty = try ClusterConfiguration.parse(document(storage: "", raft: ""), configPath: "/etc/weft/cluster.toml")
        #expect(empty == config)
    }

    @Test func explicitValuesAreKept() throws {
        let text = document(
            cluster: "name = \"prod\"\nshards = 1024\nreplication = 2\nsecret = \"\(validSecret)\"",
            storage: "data_dir = \"/var/lib/weft\"\nfsync = \"every_n_batches:16\"\nsegment_bytes = 4096\nsnapshot_every_records = 500\nretention = \"30d, 10GiB\"",
            raft: "election_timeout_min_ms = 1000\nelection_timeout_max_ms = 1001\nheartbeat_interval_ms = 499\ndriver_threads = 7")
        let config = try ClusterConfiguration.parse(text, configPath: "cluster.toml")
        #expect(config.shards == 1024)
        #expect(config.replication == 2)
        #expect(
            config.storage
                == StorageConfig(
                    dataDir: "/var/lib/weft", fsync: .everyBatches(16), segmentBytes: 4096, snapshotEveryRecords: 500,
                    retention: Retention(bytesMax: 10 << 30, ageSecondsMax: 30 * 86400)))
        #expect(config.storage.retention.description == "10737418240 bytes, 2592000 s")
        #expect(try ClusterConfiguration.parse(document(storage: "retention = \"off\""), configPath: "c.toml").storage.retention.isOff)
        #expect(try ClusterConfiguration.parse(document(storage: "retention = \"12h\""), configPath: "c.toml").storage.retention == Retention(ageSecondsMax: 43200))
        var timing = RaftTiming(electionTimeoutMinMs: 1000, electionTimeoutMaxMs: 1001, heartbeatIntervalMs: 499)
        timing.driverThreads = 7
        #expect(config.raft == timing)
        #expect(config.dataDirectory(for: NodeID(3)) == "/var/lib/weft/3")

        let never = try ClusterConfiguration.parse(document(storage: "fsync = \"never\""), configPath: "cluster.toml")
        #expect(never.storage.fsync == .never)
        #expect(never.storage.fsync.description == "never")
        #expect(FsyncPolicy.everyBatches(4).description == "every_n_batches:4")
    }

    @Test func nodesAreSortedByID() throws {
        let config = try ClusterConfiguration.parse(document(nodes: nodes(ids: [10, 2, 7])), configPath: "c.toml")
        #expect(config.nodes.map(\.id.rawValue) == [2, 7, 10])
        #expect(config.node(NodeID(7))?.peerAddress.port == 7007)
    }

    @Test func inlineArrayOfNodeTablesIsAccepted() throws {
        let inline = """
            nodes = [
              { id = 1, peer_addr = "a.internal:1", api_addr = "a.internal:2" },
              { id = 2, peer_addr = "[::1]:7000", api_addr = "[2001:db8::2]:7000" },
              { id = 3, peer_addr = "10.0.0.3:1", api_addr = "10.0.0.3:65535" },
            ]
            """
        let config = try ClusterConfiguration.parse(document(nodes: inline), configPath: "c.toml")
        #expect(config.node(NodeID(2))?.peerAddress == HostPort(host: "::1", port: 7000))
        #expect(config.node(NodeID(3))?.apiAddress.port == 65535)
    }

    @Test(arguments: [
        // (data_dir, config path, resolved)
        ("data", "/etc/weft/cluster.toml", "/etc/weft/data"),
        ("state/../db", "/etc/weft/cluster.toml", "/etc/weft/db"),
        ("../shared/./data/", "/srv/weft/conf/cluster.toml", "/srv/weft/shared/data"),
        ("/var/lib//weft/", "/etc/weft/cluster.toml", "/var/lib/weft"),
        ("data", "/cluster.toml", "/data"),
        ("../../..", "/a/cluster.toml", "/"),
    ])
    func relativeDataDirResolvesAgainstTheConfigDirectory(dataDir: String, configPath: String, resolved: String) throws {
        let text = document(storage: "data_dir = \"\(dataDir)\"")
        let config = try ClusterConfiguration.parse(text, configPath: configPath)
        #expect(config.storage.dataDir == resolved)
    }

    @Test func relativeConfigPathResolvesAgainstTheWorkingDirectory() throws {
        let config = try ClusterConfiguration.parse(document(), configPath: "conf/cluster.toml")
        #expect(config.storage.dataDir.hasPrefix("/"))
        #expect(config.storage.dataDir.hasSuffix("/conf/data"))
        #expect(config.dataDirectory(for: NodeID(1)).hasSuffix("/conf/data/1"))
        let bare = try ClusterConfiguration.parse(document(), configPath: "cluster.toml")
        #expect(bare.storage.dataDir.hasPrefix("/") && bare.storage.dataDir.hasSuffix("/data"))
        #expect(!bare.storage.dataDir.contains("/./"))
    }

    @Test func loadReadsAFileAndResolvesAgainstItsDirectory() throws {
        let directory = makeTemporaryDirectory()
        defer { removeTree(directory, files: ["cluster.toml", "bad-utf8.toml"]) }
        let path = directory + "/cluster.toml"
        writeFile(path, Array(document(storage: "data_dir = \"store\"").utf8))
        let config = try ClusterConfiguration.load(path: path)
        #expect(config.storage.dataDir == directory + "/store")
        #expect(config.dataDirectory(for: NodeID(1)) == directory + "/store/1")

        let badPath = directory + "/bad-utf8.toml"
        writeFile(badPath, Array("[cluster]\nname = \"".utf8) + [0xFF, 0xFE] + Array("\"\n".utf8))
        let error = #expect(throws: ConfigError.self) { try ClusterConfiguration.load(path: badPath) }
        #expect(error?.description == "\(badPath):2: the file is not valid UTF-8")
    }

    @Test func loadOfAMissingFileNamesThePath() {
        let path = "/nonexistent-weft-dir/cluster.toml"
        let error = #expect(throws: ConfigError.self) { try ClusterConfiguration.load(path: path) }
        #expect(error?.file == path)
        #expect(error?.description.hasPrefix(path + ": cannot open the file: ") == true)
        #expect(error?.description.contains("No such file") == true)
    }

    @Test func loadOfADirectoryIsAnError() {
        let error = #expect(throws: ConfigError.self) { try ClusterConfiguration.load(path: "/") }
        #expect(error?.description.hasPrefix("/: ") == true)
    }

    @Test func syntaxErrorsNameTheFileAndLine() {
        let text = "[cluster]\nname = \"x\"\nshards = = 3\n"
        let error = parseError(text, configPath: "conf/cluster.toml")
        #expect(error?.file == "conf/cluster.toml")
        #expect(error?.line == 3)
        #expect(error?.description.hasPrefix("conf/cluster.toml:3:") == true)
        #expect(error?.description.contains("TOML syntax error") == true)

        let duplicate = parseError("[cluster]\nname = \"a\"\nname = \"b\"\n")
        #expect(duplicate?.line == 3)
    }

    @Test func aNulByteIsRejectedWithItsLine() {
        let error = parseError("[cluster]\nname = \"a\"\n\0secret = \"x\"\n")
        #expect(error?.description == "cluster.toml:3: the file contains a NUL byte")
    }

    @Test func errorDescriptionFormat() {
        #expect(
            ConfigError(file: "cluster.toml", keyPath: "cluster.shards", message: "must be 1...1024, got 0").description
                == "cluster.toml: cluster.shards: must be 1...1024, got 0")
        #expect(ConfigError(file: "c.toml", line: 4, column: 2, message: "bad").description == "c.toml:4:2: bad")
        #expect(ConfigError(file: "c.toml", message: "bad").description == "c.toml: bad")
    }

    @Test func messagingSettings() throws {
        let defaults = try ClusterConfiguration.parse(document(), configPath: "c.toml").messaging
        #expect(defaults == MessagingConfig())
        #expect(defaults.bcryptCost == 12 && defaults.sendsPerMinute == 100 && defaults.historyReadsPerMinute == 30)
        let m = try ClusterConfiguration.parse(
            document(extra: "[messaging]\nbcrypt_cost = 4\ntoken_ttl_seconds = 600\nsends_per_minute = 5\nhistory_reads_per_minute = 7"),
            configPath: "c.toml"
        ).messaging
        #expect(m.bcryptCost == 4 && m.tokenTTLSeconds == 600 && m.sendsPerMinute == 5 && m.historyReadsPerMinute == 7)
        for bad in ["bcrypt_cost = 3", "bcrypt_cost = 17", "token_ttl_seconds = 59", "sends_per_minute = 0", "colour = 1", "bcrypt_cost = \"12\""] {
            let e = parseError(document(extra: "[messaging]\n\(bad)"))
            #expect(e?.message.isEmpty == false, "\(bad)")
        }
    }

    @Test func deliveryAndPushSettings() throws {
        let defaults = try ClusterConfiguration.parse(document(), configPath: "c.toml")
        #expect(defaults.delivery == DeliveryConfig() && defaults.delivery.sessionQueueMax == 1024)
        #expect(defaults.push.webhookURL == nil, "no webhook: no push")
        let c = try ClusterConfiguration.parse(
            document(
                extra: "[delivery]\nsession_queue_max = 64\nwrite_stall_ms = 5000\n[push]\nwebhook_url = \"http://push.internal:8080/hooks/weft\"\n"
                    + "delay_ms = 1500\nsecret = \"0123456789abcdef\"\nretry_max_ms = 9000"),
            configPath: "c.toml")
        #expect(c.delivery.sessionQueueMax == 64 && c.delivery.writeStallMillis == 5000)
        #expect(c.push.webhookURL?.host == "push.internal" && c.push.webhookURL?.port == 8080 && c.push.webhookURL?.path == "/hooks/weft")
        #expect(c.push.delayMillis == 1500 && c.push.secret == "0123456789abcdef" && c.push.retryMaxMillis == 9000)
        #expect(WebhookURL("http://h")?.port == 80 && WebhookURL("http://h")?.path == "/" && WebhookURL("http://h")?.tls == false)
        #expect(WebhookURL("https://h/x")?.port == 443 && WebhookURL("https://h/x")?.tls == true && WebhookURL("https://h:8443")?.port == 8443)
        #expect(WebhookURL("https://[::1]/p")?.host == "[::1]" && WebhookURL("https://[::1]/p")?.port == 443 && WebhookURL("https://[::1]:8443")?.port == 8443)
        for bad in ["https://", "https://h:0/", "httpss://h/", "http://h:+80/", "http://h:80:81/", "http://[::1", "http://[::1]x/", "http://[zz]/", "http://h?x", "http://", "http://:80/p", "http://u@h/p", "http://h:0/", "http://h/a b", "ftp://h/"] {
            #expect(WebhookURL(bad) == nil, "\(bad)")
        }
    }

    /// `ca_file` is read at parse (a missing file stops the start with its name) and resolved against
    /// the config file's directory.
    @Test func anHTTPSWebhookTrustsTheCAFile() throws {
        let dir = NSTemporaryDirectory() + "weft-ca-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".write(toFile: dir + "/ca.pem", atomically: true, encoding: .utf8)
        let c = try ClusterConfiguration.parse(
            document(extra: "[push]\nwebhook_url = \"https://push.internal/hooks\"\nca_file = \"ca.pem\""), configPath: dir + "/c.toml")
        #expect(c.push.webhookURL?.tls == true && c.push.webhookURL?.port == 443)
        #expect(c.push.caFile == dir + "/ca.pem")
        let none = try ClusterConfiguration.parse(document(extra: "[push]\nwebhook_url = \"https://push.internal/hooks\""), configPath: "c.toml")
        #expect(none.push.caFile == nil, "no ca_file: the system's trust store")
    }
}
