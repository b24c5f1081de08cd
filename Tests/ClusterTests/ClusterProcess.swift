import Foundation
import Testing
import WeftTesting
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The suites that start real clusters, one at a time: several clusters at once on a 2-core machine would
/// make their elections race the test timeouts.
@Suite(.serialized) enum Clusters {}

/// A real cluster for tests: `weft serve` processes on loopback, started from a generated config file.
final class ClusterProcess: @unchecked Sendable {
    let dir: String
    let configPath: String
    let nodes: [Int]
    let apiPorts: [Int: Int]
    var processes: [Int: Process] = [:]
    let lock = NSLock()
    /// Start each node under a group id of its own (`groupID(n)`, through util-linux `setpriv`), so an
    /// iptables `owner` rule can cut the peer links of one pair of nodes on loopback (root only).
    var ownGroups = false
    static let blocks = CounterBox()
    /// The operator token every generated config carries (`[api] operator_token`).
    static let token = "test-operator-token-0123456789"

    static func authorized(_ url: URL) -> URLRequest {
        var req = URLRequest(url: url)
        req.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
        return req
    }

    static var bin: URL {
        if let dir = ProcessInfo.processInfo.environment["WEFT_BIN_DIR"] { return URL(fileURLWithPath: dir) }
        var url = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<4 where !FileManager.default.fileExists(atPath: url.appendingPathComponent("weft").path) {
            url.deleteLastPathComponent()
        }
        return url.appendingPathComponent("weft")
    }

    /// `storage`: more `[storage]` keys, one per line.
    /// `messaging`: more `[messaging]` keys, one per line (bcrypt's cost is the minimum, 4, unless given).
    /// `tables`: more tables (`[push]`, `[delivery]`), as TOML.
    init(
        name: String, nodes count: Int = 3, shards: Int = 2, segmentBytes: Int = 1_048_576, storage: String = "",
        messaging: String = "bcrypt_cost = 4", tables: String = ""
    ) throws {
        dir = NSTemporaryDirectory() + "weft-cluster-\(name)-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        nodes = Array(1...count)
        // A block of 10 ports per cluster, from the pid (parallel test processes) and a per-process
        // counter (several clusters in one process), so no two clusters ever share a port. All below
        // Linux's ephemeral range (32768 and up): a port there can be taken by any outgoing connection
        // (the tests' own clients, the nodes' peer links) before the node binds it ("address already in
        // use", seen when tests with 500 WebSocket clients ran beside others).
        let block = Self.blocks.withLock { n -> Int in
            n += 1
            return n % 4
        }
        let base = 10_000 + Int(getpid() % 550) * 40 + block * 10
        var toml = """
            [cluster]
            name = "test-\(name)"
            shards = \(shards)
            replication = \(min(3, count))
            secret = "test-secret-0123456789abcdef"

            [storage]
            data_dir = "data"
            fsync = "every_batch"
            segment_bytes = \(segmentBytes)
            \(storage)

            [api]
            operator_token = "\(Self.token)"

            [messaging]
            \(messaging)

            [raft]
            election_timeout_min_ms = 300
            election_timeout_max_ms = 600
            heartbeat_interval_ms = 50

            \(tables)

            """
        var api: [Int: Int] = [:]
        for n in nodes {
            api[n] = base + 2 * n
            toml += """

                [[nodes]]
                id = \(n)
                peer_addr = "127.0.0.1:\(base + 2 * n + 1)"
                api_addr = "127.0.0.1:\(base + 2 * n)"

                """
        }
        apiPorts = api
        configPath = dir + "/cluster.toml"
        try toml.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    /// `fileSizeLimit`: the node runs under RLIMIT_FSIZE of that many bytes with SIGXFSZ ignored, so a
    /// write past it fails with EFBIG, as on a full disk (`prlimit`, util-linux). Only the soft limit: the
    /// test can lift it (`liftFileSizeLimit`), as an operator frees a disk.
    func start(_ n: Int, fileSizeLimit: Int? = nil) throws {
        let p = Process()
        let serve = ["serve", "--config", configPath, "--node", String(n), "--log-level", "warning"]
        var command = [Self.bin.path] + serve
        if let limit = fileSizeLimit {
            command = ["/bin/sh", "-c", "trap '' XFSZ; exec prlimit --fsize=\(limit):unlimited \"$0\" \"$@\""] + command
        }
        if ownGroups { command = [Firewall.setpriv, "--regid=\(groupID(n))", "--clear-groups"] + command }
        p.executableURL = URL(fileURLWithPath: command[0])
        p.arguments = Array(command.dropFirst())
        let logPath = dir + "/node\(n).log"
        if !FileManager.default.fileExists(atPath: logPath) {
            _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        }
        guard let log = FileHandle(forWritingAtPath: logPath) else { throw CocoaError(.fileWriteUnknown) }
        log.seekToEndOfFile()
        p.standardError = log
        p.standardOutput = log
        try p.run()
        lock.withLock { processes[n] = p }
    }

    func startAll() throws { for n in nodes { try start(n) } }

    /// Node n's group id when `ownGroups` (distinct per test process).
    func groupID(_ n: Int) -> Int { 47_000 + Int(getpid() % 500) * 4 + n }

    /// Node n's peer port (its API port + 1, as the generated config has it).
    func peerPort(_ n: Int) -> Int { (apiPorts[n] ?? 0) + 1 }

    /// Lifts the file-size limit node n was started with; true if `prlimit` did.
    func liftFileSizeLimit(_ n: Int) -> Bool {
        guard let p = lock.withLock({ processes[n] }), p.isRunning else { return false }
        let lift = Process()
        lift.executableURL = URL(fileURLWithPath: "/usr/bin/prlimit")
        lift.arguments = ["--pid", String(p.processIdentifier), "--fsize=unlimited:unlimited"]
        guard (try? lift.run()) != nil, lift.waitForExit(seconds: 10) else { return false }
        return lift.terminationStatus == 0
    }

    func kill9(_ n: Int) {
        guard let p = lock.withLock({ processes[n] }) else { return }
        kill(p.processIdentifier, SIGKILL)
        if !p.waitForExit(seconds: 30) { Issue.record("node \(n) (pid \(p.processIdentifier)) still runs 30 s after SIGKILL") }
    }

    /// SIGSTOP (`pause`) or SIGCONT to one node: a node that stops answering without closing anything.
    func pause(_ n: Int, _ paused: Bool) {
        guard let p = lock.withLock({ processes[n] }) else { return }
        kill(p.processIdentifier, paused ? SIGSTOP : SIGCONT)
    }

    /// SIGTERM to one node (a graceful shutdown); waits up to 30 s for it to exit, true if it did.
    func terminate(_ n: Int) -> Bool {
        guard let p = lock.withLock({ processes[n] }) else { return false }
        kill(p.processIdentifier, SIGTERM)
        return p.waitForExit(seconds: 30)
    }

    /// SIGTERM to every node, then waits for each; a node still running 30 s later (its own shutdown
    /// deadline is 20 s) is a failure, and is SIGKILLed so the suite goes on.
    func stopAll() {
        let ps = lock.withLock { processes.sorted { $0.key < $1.key } }
        for (_, p) in ps where p.isRunning { kill(p.processIdentifier, SIGTERM) }
        for (n, p) in ps where !p.waitForExit(seconds: 30) {
            Issue.record("node \(n) did not exit within 30 s of SIGTERM: SIGKILLed")
            kill(p.processIdentifier, SIGKILL)
            _ = p.waitForExit(seconds: 30)
        }
    }

    struct Status: Decodable {
        struct Shard: Decodable {
            var id: UInt64
            var role: String
            var leader: UInt64?
            var term: UInt64
            var commit_index: UInt64
            var applied_index: UInt64?
            var first_index: UInt64?
            var retained_through: UInt64?
            var repair: Repair?
            var stats: Stats?
        }
        struct Stats: Decodable {
            var catchUpsInstalled: UInt64?
            var snapshotsInstalled: UInt64?
        }
        struct Repair: Decodable {
            var recovering: Bool
            var repairs: Int
            var events: [String]
        }
        struct Reach: Decodable {
            var id: UInt64
            var reachable: Bool
        }
        var node: UInt64
        var nodes: [Reach]?
        var shards: [Shard]
    }

    func status(_ n: Int) async -> Status? {
        guard let port = apiPorts[n], let url = URL(string: "http://127.0.0.1:\(port)/api/v1/cluster/status") else { return nil }
        var req = URLRequest(url: url)
        req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
        req.timeoutInterval = 2
        guard let (data, _) = try? await URLSession.shared.data(for: req) else { return nil }
        return try? JSONDecoder().decode(Status.self, from: data)
    }

    /// Node n's `/metrics` page.
    func metricsText(_ n: Int) async -> String? {
        guard let port = apiPorts[n], let url = URL(string: "http://127.0.0.1:\(port)/metrics") else { return nil }
        var req = URLRequest(url: url)
        req.timeoutInterval = 3
        guard let (data, _) = try? await URLSession.shared.data(for: req) else { return nil }
        return String(decoding: data, as: UTF8.self)
    }

    /// The sum of a metric's lines (every label set) on a `/metrics` page; 0 when it has none.
    static func metric(_ text: String, _ name: String) -> Double {
        text.split(separator: "\n").filter { $0.hasPrefix(name + " ") || $0.hasPrefix(name + "{") }
            .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0, +)
    }

    /// The leader of `shard` as its own replica reports it, polling up to `seconds`.
    func leader(of shard: UInt64, seconds: Double = 10) async -> Int? {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            for n in nodes {
                if let s = await status(n), let sh = s.shards.first(where: { $0.id == shard }), sh.role == "leader" { return n }
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return nil
    }

    struct Ack: Decodable {
        struct Ref: Decodable {
            var index: UInt64
            var term: UInt64
            var stream: UInt64
            var seq: UInt64
        }
        var records: [Ref]
    }

    /// POSTs one record; nil when the node did not acknowledge it (error, timeout, node down).
    func append(via n: Int, shard: UInt64, stream: UInt64, payload: String) async -> Ack.Ref? {
        guard let port = apiPorts[n], let url = URL(string: "http://127.0.0.1:\(port)/api/v1/shards/\(shard)/append") else { return nil }
        var req = URLRequest(url: url)
        req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
        req.httpMethod = "POST"
        req.timeoutInterval = 6
        req.httpBody = try? JSONSerialization.data(withJSONObject: ["records": [["stream": stream, "payload": payload]]])
        guard let (data, resp) = try? await URLSession.shared.data(for: req), (resp as? HTTPURLResponse)?.statusCode == 200 else { return nil }
        return (try? JSONDecoder().decode(Ack.self, from: data))?.records.first
    }

    func shardDirectory(node n: Int, shard: UInt64) -> String { "\(dir)/data/\(n)/shard-\(shard)" }
}

extension Process {
    /// Waits up to `seconds` for the process to end; true once it has. `waitUntilExit` is not used:
    /// it spins the calling thread's run loop until Foundation's monitor marks the process ended, and a
    /// test suite that ran it from Swift concurrency's threads hung past CI's limit (stop 19). This
    /// polls instead, and also reads `/proc` so a child that is already a zombie counts as ended
    /// (`terminationStatus` is only meaningful once `isRunning` is false: pass `status: true` to read it).
    func waitForExit(seconds: Double, status: Bool = false) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        var zombieSince: Date?
        while isRunning {
            if zombieSince == nil, Self.hasEnded(pid: processIdentifier) { zombieSince = Date() }
            // A zombie whose end Foundation has not noticed within 5 s: ended all the same.
            if !status, let z = zombieSince, Date().timeIntervalSince(z) > 5 { return true }
            if Date() > end { return false }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return true
    }

    /// Whether `pid` is gone or a zombie (state `Z` or `X` in `/proc/<pid>/stat`, after the last `)`).
    static func hasEnded(pid: Int32) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
        guard let close = stat.lastIndex(of: ")") else { return false }
        let state = stat[stat.index(after: close)...].drop { $0 == " " }.first
        return state == "Z" || state == "X"
    }
}

/// A counter behind a lock.
final class CounterBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func withLock<T>(_ body: (inout Int) -> T) -> T {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
}
