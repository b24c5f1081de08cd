import ClusterConfig
import Foundation
import NIOPosix
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `weft bench chat`: the messaging API end to end (Docs/benchmarks.md). Registers users, makes each
/// user a contact of the next (a ring), then sends ~200-byte text messages between contacts through
/// random nodes with N in flight; prints sends/s, send latency, bytes on disk per message (every record
/// one message causes — the message, both inbox entries, relay headers — on one replica), and, in the
/// same run, the raw log's figure for single-record appends at the same concurrency.
extension ClusterBench {
    public struct ChatResult: Codable, Sendable {
        public var nodes: Int
        public var shards: Int
        public var fsync: String
        public var users: Int
        public var messages: Int
        public var inflight: Int
        public var failed: Int
        public var seconds: Double
        public var sends_per_second: Double
        public var send_latency_us: Percentiles
        public var single_send_latency_us: Percentiles?
        public var content_bytes_per_message: Double
        public var disk_bytes_per_message: Double
        public var log_records_per_second: Double?
        public var log_latency_us: Percentiles?
        public var cpu_us_per_send_servers: Double?
    }

    /// Sends through the messaging API; `single`: messages also sent one at a time (latency floor).
    @discardableResult
    public mutating func runChat(
        users: Int, messages: Int, inflight: Int, single: Int, logRecords: Int, jsonOut: String?, print: @Sendable (String) -> Void
    ) async throws -> ChatResult {
        let m = config.messaging
        guard m.sendsPerMinute >= messages, m.actionsPerMinute >= 4, m.bcryptCost <= 4 else {
            throw BenchFailure(
                description: "\(configPath): the chat bench sends \(messages) messages from few users: set [messaging] sends_per_minute >= \(messages) "
                    + "(and bcrypt_cost = 4 so that signing up \(users) users is quick)")
        }
        try startAll()
        defer { stopAll() }
        try await waitForLeaders()
        print("weft bench chat: \(config.nodes.count) nodes, \(config.shards) shards, replication \(config.replication), fsync \(config.storage.fsync); \(users) users, \(messages) messages, \(inflight) in flight")
        let nodes = config.nodes.map(\.id.rawValue)
        // Users, tokens, a ring of contacts.
        let (ids, tokens) = try await signUp(users)
        try await makeRing(ids: ids, tokens: tokens)
        print("\(users) users signed up, \(users) contact pairs")

        // The messages: from user u to u+1 or u-1 (a contact), ~200 bytes of chat text each.
        var corpus = ChatCorpus(seed: 42, streams: 1)
        var rng = BenchRNG(seed: 7)
        var plans: [(sender: Int, body: [UInt8])] = []
        var contentBytes = 0
        for k in 0..<(messages + single) {
            let u = Int(rng.next() % UInt64(users))
            let v = k % 2 == 0 ? (u + 1) % users : (u + users - 1) % users
            var text = ""
            while text.utf8.count < 180 { text += (text.isEmpty ? "" : " ") + corpus.sentence() }
            while text.utf8.count > 200, !text.isEmpty { text.removeLast() }
            contentBytes += text.utf8.count
            let body = try JSONSerialization.data(withJSONObject: ["receiver_id": ids[v], "message_type": "text", "content": text, "client_msg_id": "b\(k)"])
            plans.append((u, Array(body)))
        }
        let diskBefore = nodes.map { replicaDiskBytes(node: $0) }.reduce(0, +)
        let countersBefore = await replicaCounters()
        let serverCPU0 = serverCPUSeconds()
        var conns: [HTTPLoadConnection] = []
        for w in 0..<inflight {
            let n = config.nodes[w % config.nodes.count]
            conns.append(try await HTTPLoadConnection.connect(host: n.apiAddress.host, port: n.apiAddress.port, group: MultiThreadedEventLoopGroup.singleton))
        }
        let clock = ContinuousClock()
        let t0 = clock.now
        let sendPlans = Array(plans.prefix(messages))
        let tokenList = tokens
        let lat = await Self.drive(conns, requests: sendPlans.count) { _, k, conn in
            let p = sendPlans[k]
            return (try? await conn.post(path: "/api/v1/messages", body: p.body, contentType: "application/json", token: tokenList[p.sender])) == 200
        }
        let secs = seconds(clock.now - t0)
        let serverCPU = serverCPUSeconds().flatMap { end in serverCPU0.map { end - $0 } }
        for c in conns { await c.close() }
        let work = workPerRequest(before: countersBefore, after: await replicaCounters(), requests: lat.count)
        try await waitForRelays()
        // All nodes' files over the replication factor: one replica of every shard, on average.
        let diskAfter = nodes.map { replicaDiskBytes(node: $0) }.reduce(0, +)
        var result = ChatResult(
            nodes: nodes.count, shards: config.shards, fsync: config.storage.fsync.description, users: users, messages: messages, inflight: inflight,
            failed: messages - lat.count, seconds: secs, sends_per_second: Double(lat.count) / secs, send_latency_us: Percentiles(lat),
            content_bytes_per_message: Double(contentBytes) / Double(max(1, plans.count)),
            disk_bytes_per_message: Double(diskAfter - diskBefore) / Double(config.replication) / Double(max(1, lat.count)))
        result.cpu_us_per_send_servers = serverCPU.map { $0 * 1e6 / Double(max(1, lat.count)) }
        print("sent \(lat.count) messages in \(f2(secs)) s = \(Int(result.sends_per_second)) sends/s; \(result.failed) failed")
        print("send latency (\(inflight) in flight): \(result.send_latency_us.text)")
        print(
            "per send, all replicas: \(f2(work.store_appends)) store appends, \(f2(work.records_per_store_append)) records per append, \(f2(work.raft_messages)) Raft messages; "
                + "CPU per send, servers: \(result.cpu_us_per_send_servers.map { "\(Int($0)) µs" } ?? "unknown")")
        print("disk, one replica of every shard (all nodes' files / replication): \(Int(result.disk_bytes_per_message)) bytes per message of \(Int(result.content_bytes_per_message)) content bytes (message, inbox entries, relay headers, indexes)")

        if single > 0 {
            let n = config.nodes[0]
            let conn = try await HTTPLoadConnection.connect(host: n.apiAddress.host, port: n.apiAddress.port, group: MultiThreadedEventLoopGroup.singleton)
            var one: [Duration] = []
            for p in plans.suffix(single) {
                let s = clock.now
                if (try? await conn.post(path: "/api/v1/messages", body: p.body, contentType: "application/json", token: tokens[p.sender])) == 200 {
                    one.append(clock.now - s)
                }
            }
            await conn.close()
            result.single_send_latency_us = Percentiles(one)
            print("send latency, 1 in flight (\(one.count) messages): \(Percentiles(one).text)")
        }

        if logRecords > 0 {
            // The raw log at the same concurrency, same cluster, same run: single ~200-byte records.
            var lconns: [HTTPLoadConnection] = []
            for w in 0..<inflight {
                let n = config.nodes[w % config.nodes.count]
                lconns.append(try await HTTPLoadConnection.connect(host: n.apiAddress.host, port: n.apiAddress.port, group: MultiThreadedEventLoopGroup.singleton))
            }
            let bodies = appender
            let token = config.operatorToken
            let shards = config.shards
            let lt0 = clock.now
            let llat = await Self.drive(lconns, requests: logRecords) { _, r, conn in
                (try? await conn.post(
                    path: "/api/v1/shards/\(r % shards)/append", body: bodies.binaryBody(records: 1, seed: r), contentType: "application/x-weft-records",
                    token: token)) == 200
            }
            let lsecs = seconds(clock.now - lt0)
            for c in lconns { await c.close() }
            result.log_records_per_second = Double(llat.count) / lsecs
            result.log_latency_us = Percentiles(llat)
            print("raw log, same run: \(Int(Double(llat.count) / lsecs)) single-record appends/s with \(inflight) in flight; latency \(Percentiles(llat).text)")
        }
        if let jsonOut {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(result).write(to: URL(fileURLWithPath: jsonOut))
            print("result written to \(jsonOut)")
        }
        return result
    }

    /// Signs up `count` users named `prefix0`, `prefix1`, … (register, then log in) through the nodes in
    /// turn, `concurrency` at a time; their ids and login tokens, in order.
    func signUp(_ count: Int, prefix: String = "bench", concurrency: Int = 1) async throws -> (ids: [UInt64], tokens: [String]) {
        let client = apiClient
        let nodes = config.nodes.map(\.id.rawValue)
        let lanes = max(1, min(concurrency, count))
        let accounts = try await withThrowingTaskGroup(of: [(Int, UInt64, String)].self) { group in
            for lane in 0..<lanes {
                group.addTask {
                    var out: [(Int, UInt64, String)] = []
                    for u in stride(from: lane, to: count, by: lanes) {
                        let via = nodes[u % nodes.count]
                        let name = "\(prefix)\(u)"
                        let credentials: [String: Any] = ["username": name, "password": "password-123"]
                        _ = try await client.call(via, "POST", "/api/v1/auth/register", body: credentials, expect: [201, 409])
                        let login = try await client.call(via, "POST", "/api/v1/auth/login", body: credentials, expect: [200])
                        guard let token = login["token"] as? String, let id = (login["user_id"] as? NSNumber)?.uint64Value else {
                            throw BenchFailure(description: "login of \(name) gave no token")
                        }
                        out.append((u, id, token))
                    }
                    return out
                }
            }
            var all: [(Int, UInt64, String)] = []
            for try await part in group { all += part }
            return all.sorted { $0.0 < $1.0 }
        }
        return (accounts.map(\.1), accounts.map(\.2))
    }

    /// Makes each user a contact of the next (a ring: user u asks u+1, who accepts), then waits until the
    /// relays have copied every inbox entry.
    func makeRing(ids: [UInt64], tokens: [String]) async throws {
        let users = ids.count
        let nodes = config.nodes.map(\.id.rawValue)
        for u in 0..<users {
            let v = (u + 1) % users
            let via = nodes[u % nodes.count]
            _ = try await call(via, "POST", "/api/v1/contacts/requests", token: tokens[u], body: ["user_id": ids[v]], expect: [200, 202, 409])
            _ = try await call(via, "POST", "/api/v1/contacts/requests/\(ids[u])/accept", token: tokens[v], body: nil, expect: [200, 404])
        }
        try await waitForRelays()
    }

    /// The messaging API's JSON client for these nodes (Sendable: for requests from several tasks).
    var apiClient: APIClient {
        var apis: [UInt64: String] = [:]
        for n in config.nodes { apis[n.id.rawValue] = api(n.id.rawValue) }
        return APIClient(session: session, apis: apis)
    }

    /// One JSON request; the decoded object when the status is one of `expect`.
    func call(_ n: UInt64, _ method: String, _ path: String, token: String? = nil, body: [String: Any]?, expect: Set<Int>) async throws -> [String: Any] {
        try await apiClient.call(n, method, path, token: token, body: body, expect: expect)
    }

    /// Waits until every relay of every node has nothing left to relay (from `/metrics`).
    func waitForRelays(seconds: Double = 60) async throws {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            var lag = 0.0
            for n in config.nodes {
                guard let url = URL(string: api(n.id.rawValue) + "/metrics"), let (data, _) = try? await session.data(from: url) else { continue }
                for line in String(decoding: data, as: UTF8.self).split(separator: "\n") where line.hasPrefix("weft_relay_lag_records{") {
                    lag += Double(line.split(separator: " ").last ?? "0") ?? 0
                }
            }
            if lag == 0 { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw BenchFailure(description: "relays did not catch up within \(Int(seconds)) s")
    }

    /// Bytes of segment and index files of node `n`'s replicas (one replica of every shard it holds), not
    /// counting the zeros the store writes ahead of an active segment's end (1 MiB preallocation).
    func replicaDiskBytes(node n: UInt64) -> Int {
        let dir = config.dataDirectory(for: .init(n))
        guard let e = FileManager.default.enumerator(atPath: dir) else { return 0 }
        var total = 0
        while let f = e.nextObject() as? String {
            guard f.hasSuffix(".seg") || f.hasSuffix(".idx"), let data = FileManager.default.contents(atPath: dir + "/" + f) else { continue }
            total += data.withUnsafeBytes { b in (b.lastIndex { $0 != 0 } ?? -1) + 1 }
        }
        return total
    }
}

/// JSON requests to the nodes' messaging API, retried through elections (503/504) at start.
struct APIClient: Sendable {
    let session: URLSession
    let apis: [UInt64: String]

    /// One JSON request; the decoded object when the status is one of `expect`.
    func call(_ n: UInt64, _ method: String, _ path: String, token: String? = nil, body: [String: Any]?, expect: Set<Int>) async throws -> [String: Any] {
        guard let base = apis[n], let url = URL(string: base + path) else { throw BenchFailure(description: "bad node \(n) or path \(path)") }
        for attempt in 0..<50 {
            var req = URLRequest(url: url)
            req.httpMethod = method
            if let token { req.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
            if let body {
                req.httpBody = try JSONSerialization.data(withJSONObject: body)
                req.setValue("application/json", forHTTPHeaderField: "Content-Type")
            }
            if let (data, resp) = try? await session.data(for: req), let status = (resp as? HTTPURLResponse)?.statusCode {
                if expect.contains(status) { return (try? JSONSerialization.jsonObject(with: data) as? [String: Any]) ?? [:] }
                // Elections at start: retried; anything else is the bench's failure.
                if status != 503 && status != 504 {
                    throw BenchFailure(description: "\(method) \(path): \(status) \(String(decoding: data.prefix(300), as: UTF8.self))")
                }
            }
            try await Task.sleep(for: .milliseconds(100 * (attempt < 10 ? 1 : 5)))
        }
        throw BenchFailure(description: "\(method) \(path): no answer")
    }
}
