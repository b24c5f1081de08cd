import ClusterConfig
import Foundation
import Histogram
import NIOPosix
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `weft bench log` and `weft bench failover`: start the cluster of a config file as child processes,
/// drive it over the HTTP API, print figures, stop it. Assert nothing.
public struct ClusterBench {
    public let configPath: String
    public let executable: String
    let config: ClusterConfiguration
    var processes: [UInt64: Process] = [:]
    let session: URLSession

    public init(configPath: String, executable: String) throws {
        self.configPath = configPath
        self.executable = executable
        config = try ClusterConfiguration.load(path: configPath)
        let c = URLSessionConfiguration.ephemeral
        c.httpMaximumConnectionsPerHost = 512
        c.timeoutIntervalForRequest = 10
        session = URLSession(configuration: c)
    }

    mutating func start(_ n: UInt64) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = ["serve", "--config", configPath, "--node", String(n), "--log-level", "error"]
        try p.run()
        processes[n] = p
    }

    mutating func startAll() throws { for n in config.nodes { try start(n.id.rawValue) } }

    func stopAll() {
        for p in processes.values where p.isRunning { kill(p.processIdentifier, SIGTERM) }
        for p in processes.values { p.waitUntilExit() }
    }

    func api(_ n: UInt64) -> String {
        let a = config.node(.init(n))!.apiAddress  // n comes from the config itself
        return "http://\(a.host):\(a.port)"
    }

    /// The `shards` of node `n`'s `/api/v1/cluster/status`, or nil when it does not answer.
    func statusShards(of n: UInt64) async -> [[String: Any]]? {
        guard let url = URL(string: api(n) + "/api/v1/cluster/status"),
            let (data, _) = try? await session.data(for: operatorRequest(url, token: config.operatorToken)),
            let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
        else { return nil }
        return obj["shards"] as? [[String: Any]]
    }

    /// Leader of `shard` per its own report, or nil.
    func leader(of shard: Int) async -> UInt64? {
        for n in config.nodes {
            guard let shards = await statusShards(of: n.id.rawValue) else { continue }
            if shards.contains(where: { ($0["id"] as? Int) == shard && ($0["role"] as? String) == "leader" }) { return n.id.rawValue }
        }
        return nil
    }

    /// Every replica's counters (`stats` in each node's status), summed over shards and nodes.
    func replicaCounters() async -> [String: Double] {
        var sum: [String: Double] = [:]
        for n in config.nodes {
            for s in await statusShards(of: n.id.rawValue) ?? [] {
                guard let stats = s["stats"] as? [String: Any] else { continue }
                for (k, v) in stats { if let x = v as? Double { sum[k, default: 0] += x } else if let x = v as? Int { sum[k, default: 0] += Double(x) } }
            }
        }
        return sum
    }

    /// Where a run's work went, per committed request, from the replicas' counters before and after.
    public struct WorkPerRequest: Codable, Sendable {
        /// Store appends on all replicas (under every_batch each is made durable by its own fdatasync
        /// or by its lane's shared flush).
        public var store_appends: Double
        /// Of those, the ones a shared flush made durable (no fdatasync of their own).
        public var shared_syncs: Double
        public var records_per_store_append: Double
        public var raft_messages: Double
        public var append_messages: Double
        public var shard_thread_wakeups: Double
    }

    func workPerRequest(before: [String: Double], after: [String: Double], requests: Int) -> WorkPerRequest {
        func d(_ k: String) -> Double { (after[k] ?? 0) - (before[k] ?? 0) }
        let r = Double(max(requests, 1))
        return WorkPerRequest(
            store_appends: d("storeAppends") / r, shared_syncs: d("sharedSyncs") / r,
            records_per_store_append: d("recordsAppended") / max(d("storeAppends"), 1),
            raft_messages: d("messagesSent") / r, append_messages: d("appendsSent") / r,
            shard_thread_wakeups: d("wakeups") / r)
    }

    func waitForLeaders(seconds: Double = 15) async throws {
        let end = Date().addingTimeInterval(seconds)
        for s in 0..<config.shards {
            while await leader(of: s) == nil {
                if Date() > end { throw BenchFailure(description: "no leader for shard \(s) after \(seconds) s") }
                try await Task.sleep(for: .milliseconds(50))
            }
        }
    }

    var appender: Appender {
        var apis: [UInt64: String] = [:]
        for n in config.nodes { apis[n.id.rawValue] = api(n.id.rawValue) }
        return Appender(session: session, apis: apis, token: config.operatorToken)
    }

    func append(via n: UInt64, shard: Int, records: Int, seed: Int) async -> Bool {
        await appender.append(via: n, shard: shard, records: records, seed: seed)
    }

    /// What one `runLog` measured (also written as JSON with `--json-out`, so runs compare by script).
    public struct LogResult: Codable, Sendable {
        public var nodes: Int
        public var shards: Int
        public var fsync: String
        public var inflight: Int
        public var batch: Int
        public var binary: Bool
        /// Requests went straight to each shard's leader (no forwarding hop).
        public var to_leader: Bool
        /// Requests went over the append stream (WebSocket) instead of one HTTP request each.
        public var stream: Bool
        public var requests: Int
        public var failed_requests: Int
        public var seconds: Double
        public var records_per_second: Double
        public var requests_per_second: Double
        /// Commit latency per request, microseconds.
        public var latency_us: Percentiles
        /// pwrite + fdatasync of 4 KiB in the cluster's data directory, microseconds, measured first.
        public var fsync_floor_us: Percentiles
        /// The replicas' work per committed request, from their counters (all nodes).
        public var work_per_request: WorkPerRequest?
        /// CPU time (user + system) per committed request during the load, microseconds: the server
        /// processes together, and this client process. On a shared box this is the figure that
        /// compares with other systems' CPU per message.
        public var cpu_us_per_request_servers: Double?
        public var cpu_us_per_request_client: Double?
    }

    /// CPU seconds (user + system) the node processes have used so far, from /proc (nil where unreadable).
    func serverCPUSeconds() -> Double? {
        let tick = Double(sysconf(Int32(_SC_CLK_TCK)))
        var total = 0.0
        for p in processes.values {
            guard let text = try? String(contentsOfFile: "/proc/\(p.processIdentifier)/stat", encoding: .utf8),
                let close = text.lastIndex(of: ")")
            else { return nil }
            // Fields after the command name: state is field 3; utime and stime are fields 14 and 15.
            let fields = text[text.index(after: close)...].split(separator: " ")
            guard fields.count > 13, let u = Double(fields[11]), let s = Double(fields[12]) else { return nil }
            total += (u + s) / tick
        }
        return total
    }

    /// CPU seconds this process has used so far.
    static func ownCPUSeconds() -> Double {
        var u = rusage()
        getrusage(RUSAGE_SELF.rawValue, &u)
        return Double(u.ru_utime.tv_sec) + Double(u.ru_utime.tv_usec) / 1e6 + Double(u.ru_stime.tv_sec) + Double(u.ru_stime.tv_usec) / 1e6
    }

    public struct Percentiles: Codable, Sendable {
        public var p50: UInt64
        public var p90: UInt64
        public var p99: UInt64
        public var p999: UInt64
        public var max: UInt64
        public var count: UInt64

        init(_ values: [Duration]) {
            var h = Histogram<UInt64>(highestTrackableValue: 600_000_000, numberOfSignificantValueDigits: .three)
            for v in values {
                let us = UInt64(clamping: v.components.seconds * 1_000_000 + v.components.attoseconds / 1_000_000_000_000)
                _ = h.record(Swift.max(1, Swift.min(us, 600_000_000)))
            }
            p50 = h.valueAtPercentile(50)
            p90 = h.valueAtPercentile(90)
            p99 = h.valueAtPercentile(99)
            p999 = h.valueAtPercentile(99.9)
            max = h.max
            count = h.totalCount
        }

        public var text: String {
            "p50 \(ms(p50)) p90 \(ms(p90)) p99 \(ms(p99)) p99.9 \(ms(p999)) max \(ms(max)) ms"
        }

        func ms(_ us: UInt64) -> String { f3(Double(us) / 1000) }
    }

    /// Committed records/s and commit latency, with `inflight` requests of `batch` records outstanding.
    @discardableResult
    public mutating func runLog(
        records: Int, inflight: Int, batch: Int, binary: Bool, toLeader: Bool = false, stream: Bool = false, jsonOut: String? = nil,
        print: @Sendable (String) -> Void
    ) async throws -> LogResult {
        let contentType = binary ? "application/x-weft-records" : "application/json"
        let token = config.operatorToken
        let floor = Percentiles(try measureFsyncFloor(directory: config.storage.dataDir, count: 300))
        print("fsync floor in \(config.storage.dataDir) (4 KiB pwrite + fdatasync): \(floor.text)")
        try startAll()
        defer { stopAll() }
        try await waitForLeaders()
        print("weft bench log: \(config.nodes.count) nodes, \(config.shards) shards, replication \(config.replication), fsync \(config.storage.fsync); \(records) records, \(inflight) requests in flight, \(batch) records per request, \(binary ? "binary" : "JSON") bodies\(stream ? ", on the append stream (one WebSocket per node)" : " over HTTP")\(toLeader ? ", sent to each shard's leader" : ", spread over the nodes (forwarded to the leader)")")
        let requests = max(1, records / batch)
        let nodes = config.nodes
        let shards = config.shards
        let bodies = appender
        let clock = ContinuousClock()
        // One keep-alive connection per request in flight, spread over the nodes; most requests are
        // forwarded by a follower to the shard's leader, like a client behind a load balancer.
        var conns: [HTTPLoadConnection] = []
        // With `toLeader`, request stream w writes only shard w % shards, on a connection to that
        // shard's leader (a client that knows where leaders are: no forwarding hop).
        var leaders: [Int: UInt64] = [:]
        if toLeader { for s in 0..<shards { leaders[s] = await leader(of: s) } }
        for w in 0..<inflight {
            var n = nodes[w % nodes.count]
            if toLeader, let l = leaders[w % shards], let ln = config.node(.init(l)) { n = ln }
            conns.append(try await HTTPLoadConnection.connect(host: n.apiAddress.host, port: n.apiAddress.port, group: MultiThreadedEventLoopGroup.singleton))
        }
        let countersBefore = await replicaCounters()
        let serverCPU0 = serverCPUSeconds()
        let clientCPU0 = Self.ownCPUSeconds()
        let t0 = clock.now
        var streamFailures = 0
        var streamFirstFailure: String?
        let lat: [Duration]
        if stream {
            // One WebSocket per node (fewer if fewer requests are in flight) on the append stream;
            // `inflight` requests outstanding in all.
            // With `toLeader`, request r goes on the connection to its shard's leader, and each
            // connection gets its share of `inflight`.
            let n = toLeader ? nodes.count : min(nodes.count, inflight)
            let assigned: [[Int]] = (0..<n).map { k in
                toLeader
                    ? (0..<requests).filter { leaders[$0 % shards] == nodes[k].id.rawValue }
                    : Array(stride(from: k, to: requests, by: n))
            }
            let loads = (0..<n).filter { !assigned[$0].isEmpty }.map { k in
                StreamLoad(
                    url: "ws://\(nodes[k].apiAddress.host):\(nodes[k].apiAddress.port)/api/v1/append-stream", token: token, shards: shards,
                    requestNumbers: assigned[k],
                    inflight: toLeader
                        ? max(1, Int((Double(inflight) * Double(assigned[k].count) / Double(max(requests, 1))).rounded()))
                        : max(1, (inflight + n - 1 - k) / n),
                    body: { r in bodies.binaryBody(records: batch, seed: r) })
            }
            let outcomes = try await withThrowingTaskGroup(of: StreamLoad.Outcome.self) { group in
                for l in loads { group.addTask { try await l.run() } }
                var all: [StreamLoad.Outcome] = []
                for try await o in group { all.append(o) }
                return all
            }
            lat = outcomes.flatMap(\.latencies)
            streamFailures = outcomes.map(\.failures).reduce(0, +)
            streamFirstFailure = outcomes.compactMap(\.firstFailure).first
        } else {
            lat = await Self.drive(conns, requests: requests) { w, r, conn in
                let body = binary ? bodies.binaryBody(records: batch, seed: r) : Array(bodies.body(records: batch, seed: r))
                let shard = toLeader ? w % shards : r % shards
                return (try? await conn.post(path: "/api/v1/shards/\(shard)/append", body: body, contentType: contentType, token: token)) == 200
            }
        }
        let secs = seconds(clock.now - t0)
        let serverCPU = serverCPUSeconds().flatMap { end in serverCPU0.map { end - $0 } }
        let clientCPU = Self.ownCPUSeconds() - clientCPU0
        if let why = streamFirstFailure { print("\(streamFailures) requests failed; the first: \(why)") }
        for c in conns { await c.close() }
        let ok = lat.count * batch
        let work = workPerRequest(before: countersBefore, after: await replicaCounters(), requests: lat.count)
        var result = LogResult(
            nodes: config.nodes.count, shards: shards, fsync: config.storage.fsync.description, inflight: inflight, batch: batch,
            binary: binary, to_leader: toLeader, stream: stream, requests: requests, failed_requests: requests - lat.count, seconds: secs,
            records_per_second: Double(ok) / secs, requests_per_second: Double(lat.count) / secs, latency_us: Percentiles(lat),
            fsync_floor_us: floor)
        result.work_per_request = work
        let done = Double(max(lat.count, 1))
        result.cpu_us_per_request_servers = serverCPU.map { $0 * 1e6 / done }
        result.cpu_us_per_request_client = clientCPU * 1e6 / done
        print("committed \(ok) records in \(f2(secs)) s = \(Int(result.records_per_second)) records/s (\(Int(result.requests_per_second)) requests/s); \(requests - lat.count) requests failed")
        print("commit latency per request: \(result.latency_us.text)")
        print(
            "per request, all replicas: \(f2(work.store_appends)) store appends (\(f2(work.shared_syncs)) made durable by a shared flush), \(f2(work.records_per_store_append)) records per append, "
                + "\(f2(work.raft_messages)) Raft messages (\(f2(work.append_messages)) appends), \(f2(work.shard_thread_wakeups)) shard-thread wake-ups")
        print(
            "CPU per request: servers \(result.cpu_us_per_request_servers.map { "\(Int($0)) µs" } ?? "unknown (no /proc)"), client \(Int(clientCPU * 1e6 / done)) µs; "
                + "cores busy: servers \(serverCPU.map { f2($0 / secs) } ?? "?"), client \(f2(clientCPU / secs))")
        if let jsonOut {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(result).write(to: URL(fileURLWithPath: jsonOut))
            print("result written to \(jsonOut)")
        }
        return result
    }

    /// Writes `records` records (batched over every shard), SIGKILLs one node, starts it again, and prints
    /// how long it takes to answer again and to have applied, on every replica it holds, everything that
    /// was committed before the kill (Docs/state.md: a restart loads the newest snapshot and replays only
    /// the entries after it).
    public mutating func runRestart(records: Int, batch: Int, print: @Sendable (String) -> Void) async throws {
        try startAll()
        defer { stopAll() }
        try await waitForLeaders()
        let shards = config.shards
        print("weft bench restart: \(config.nodes.count) nodes, \(shards) shards, snapshot every \(config.storage.snapshotEveryRecords) entries; writing \(records) records in batches of \(batch)")
        let clock = ContinuousClock()
        let t0 = clock.now
        let requests = max(1, records / batch)
        let appender = self.appender
        let nodes = config.nodes.map(\.id.rawValue)
        let ok = await withTaskGroup(of: Int.self) { group in
            for w in 0..<16 {
                group.addTask {
                    var n = 0
                    var r = w
                    while r < requests {
                        if await appender.append(via: nodes[r % nodes.count], shard: r % shards, records: batch, seed: r) { n += 1 }
                        r += 16
                    }
                    return n
                }
            }
            var total = 0
            for await n in group { total += n }
            return total
        }
        print("wrote \(ok * batch) records in \(f2(seconds(clock.now - t0))) s")
        let victim = nodes[nodes.count - 1]
        // What the victim must reach: every shard's commit index before the kill, per its leader.
        var target: [Int: UInt64] = [:]
        for n in nodes {
            for s in await statusShards(of: n) ?? [] {
                if let id = s["id"] as? Int, let c = (s["commit_index"] as? NSNumber)?.uint64Value { target[id] = max(target[id] ?? 0, c) }
            }
        }
        guard let p = processes[victim] else { throw BenchFailure(description: "node \(victim) is not running") }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let t1 = clock.now
        try start(victim)
        var answered: Duration?
        while clock.now - t1 < .seconds(120) {
            if let shardsNow = await statusShards(of: victim) {
                if answered == nil { answered = clock.now - t1 }
                let behind = shardsNow.filter { s in
                    guard let id = s["id"] as? Int, let a = (s["applied_index"] as? NSNumber)?.uint64Value else { return true }
                    return a < (target[id] ?? 0)
                }
                if behind.isEmpty && !shardsNow.isEmpty {
                    let dt = clock.now - t1
                    print("node \(victim) restarted: answered after \(f3(seconds(answered ?? dt) * 1000)) ms, applied everything committed before the kill after \(f3(seconds(dt) * 1000)) ms (\(shardsNow.count) replicas, up to index \(target.values.max() ?? 0))")
                    return
                }
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw BenchFailure(description: "node \(victim) had not caught up 120 s after its restart")
    }

    /// Time from SIGKILL of shard 0's leader to the next acknowledged append through another node.
    public mutating func runFailover(rounds: Int, print: @Sendable (String) -> Void) async throws {
        try startAll()
        defer { stopAll() }
        try await waitForLeaders()
        print("weft bench failover: \(config.nodes.count) nodes, election timeout \(config.raft.electionTimeoutMinMs)-\(config.raft.electionTimeoutMaxMs) ms, heartbeat \(config.raft.heartbeatIntervalMs) ms")
        var times: [Duration] = []
        let clock = ContinuousClock()
        for round in 1...rounds {
            guard let l = await leader(of: 0), let p = processes[l] else { throw BenchFailure(description: "no leader for shard 0") }
            // Warm: a write goes through before the kill.
            _ = await append(via: l, shard: 0, records: 1, seed: round)
            let other = config.nodes.map(\.id.rawValue).first { $0 != l } ?? l
            kill(p.processIdentifier, SIGKILL)
            let t0 = clock.now
            p.waitUntilExit()
            var k = 0
            while !(await append(via: other, shard: 0, records: 1, seed: round * 100 + k)) {
                k += 1
                if clock.now - t0 > .seconds(30) { throw BenchFailure(description: "no write accepted 30 s after the kill") }
            }
            let dt = clock.now - t0
            times.append(dt)
            print("round \(round): killed node \(l) (leader of shard 0); next commit after \(f3(seconds(dt) * 1000)) ms")
            try start(l)
            try await Task.sleep(for: .seconds(2))
        }
        times.sort()
        print("failover: p50 \(ms(times, 0.5)) ms, max \(ms(times, 1.0)) ms over \(rounds) SIGKILLs")
    }
}

public struct BenchFailure: Error, CustomStringConvertible {
    public var description: String
}

extension ClusterBench {
    /// Runs requests 0..<requests over the connections, one at a time on each (connection w takes w,
    /// w + n, w + 2n, …); `send` answers whether a request succeeded. Returns the successes' latencies.
    static func drive(
        _ conns: [HTTPLoadConnection], requests: Int, _ send: @escaping @Sendable (_ w: Int, _ r: Int, HTTPLoadConnection) async -> Bool
    ) async -> [Duration] {
        let clock = ContinuousClock()
        let n = conns.count
        return await withTaskGroup(of: [Duration].self) { group in
            for (w, conn) in conns.enumerated() {
                group.addTask {
                    var out: [Duration] = []
                    var r = w
                    while r < requests {
                        let s = clock.now
                        if await send(w, r, conn) { out.append(clock.now - s) }
                        r += n
                    }
                    return out
                }
            }
            var all: [Duration] = []
            for await part in group { all += part }
            return all
        }
    }
}

/// POSTs batches of chat-like records to a node's append endpoint.
struct Appender: Sendable {
    let session: URLSession
    let apis: [UInt64: String]
    let token: String

    func body(records: Int, seed: Int) -> Data {
        // ~200-byte chat-like records.
        let items = (0..<records).map { k in
            "{\"stream\":\((seed + k) % 1000 + 1),\"payload\":\"{\\\"message_id\\\":\(seed * 1000 + k),\\\"sender_id\\\":4821,\\\"receiver_id\\\":9912,\\\"message_type\\\":\\\"text\\\",\\\"content\\\":\\\"see you at the station at seven, the train is running a few minutes late today\\\"}\"}"
        }
        return Data("{\"records\":[\(items.joined(separator: ","))]}".utf8)
    }

    /// The same records in the binary append format (`u64 stream | u32 length | payload`).
    func binaryBody(records: Int, seed: Int) -> [UInt8] {
        var out: [UInt8] = []
        for k in 0..<records {
            let payload = Array("{\"message_id\":\(seed * 1000 + k),\"sender_id\":4821,\"receiver_id\":9912,\"message_type\":\"text\",\"content\":\"see you at the station at seven, the train is running a few minutes late today\"}".utf8)
            withUnsafeBytes(of: UInt64((seed + k) % 1000 + 1).littleEndian) { out.append(contentsOf: $0) }
            withUnsafeBytes(of: UInt32(payload.count).littleEndian) { out.append(contentsOf: $0) }
            out += payload
        }
        return out
    }

    func append(via n: UInt64, shard: Int, records: Int, seed: Int) async -> Bool {
        guard let base = apis[n], let url = URL(string: base + "/api/v1/shards/\(shard)/append") else { return false }
        var req = URLRequest(url: url)
        req.httpMethod = "POST"
        req.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
        req.httpBody = body(records: records, seed: seed)
        req.setValue("application/json", forHTTPHeaderField: "Content-Type")
        guard let (_, resp) = try? await session.data(for: req) else { return false }
        return (resp as? HTTPURLResponse)?.statusCode == 200
    }
}

/// A request carrying the operator token (`[api] operator_token`), as every operator route needs.
func operatorRequest(_ url: URL, token: String) -> URLRequest {
    var req = URLRequest(url: url)
    req.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
    return req
}
