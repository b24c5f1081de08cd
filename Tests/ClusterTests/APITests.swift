import Foundation
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The HTTP API of a real single-node cluster: appends in both formats, and bad input answered with a
/// JSON error and a 4xx status, changing nothing.
extension Clusters {
    @Suite(.serialized) struct APITests {
        func request(
            _ c: ClusterProcess, _ method: String, _ path: String, body: Data? = nil, type: String = "application/json", node: Int = 1,
            token: String? = ClusterProcess.token
        ) async throws -> (Int, [String: Any]) {
            let url = try #require(URL(string: "http://127.0.0.1:\(c.apiPorts[node]!)\(path)"))
            var req = URLRequest(url: url)
            if let token { req.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
            req.httpMethod = method
            req.httpBody = body
            req.setValue(type, forHTTPHeaderField: "Content-Type")
            req.timeoutInterval = 10
            let (data, resp) = try await URLSession.shared.data(for: req)
            let obj = (try? JSONSerialization.jsonObject(with: data) as? [String: Any]) ?? [:]
            return ((resp as? HTTPURLResponse)?.statusCode ?? 0, obj)
        }

        func binary(_ records: [(UInt64, [UInt8])]) -> Data {
            var b = Data()
            for (stream, payload) in records {
                withUnsafeBytes(of: stream.littleEndian) { b.append(contentsOf: $0) }
                withUnsafeBytes(of: UInt32(payload.count).littleEndian) { b.append(contentsOf: $0) }
                b.append(contentsOf: payload)
            }
            return b
        }

        @Test func appendsAndRejectsBadInput() async throws {
            let c = try ClusterProcess(name: "api", nodes: 1, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            #expect(await c.leader(of: 0) == 1)

            let (s1, ok) = try await request(c, "POST", "/api/v1/shards/0/append", body: Data(#"{"records":[{"stream":9,"payload":"hi"},{"stream":9,"payload_b64":"AAEC"}]}"#.utf8))
            #expect(s1 == 200)
            let refs = try #require(ok["records"] as? [[String: Any]])
            #expect(refs.compactMap { $0["seq"] as? Int } == [1, 2])
            let (s2, ok2) = try await request(c, "POST", "/api/v1/shards/0/append", body: binary([(9, Array("x".utf8)), (10, [])]), type: "application/x-weft-records")
            #expect(s2 == 200)
            #expect((ok2["records"] as? [[String: Any]])?.compactMap { $0["seq"] as? Int } == [3, 1])

            let bad: [(String, Data, String, Int, String)] = [
                ("/api/v1/shards/0/append", Data("not json".utf8), "application/json", 400, "invalid_json"),
                ("/api/v1/shards/0/append", Data(#"{"records":[]}"#.utf8), "application/json", 400, "invalid_batch"),
                ("/api/v1/shards/0/append", Data(#"{"records":[{"stream":1}]}"#.utf8), "application/json", 400, "invalid_payload"),
                ("/api/v1/shards/0/append", Data(#"{"records":[{"stream":1,"payload_b64":"%%%"}]}"#.utf8), "application/json", 400, "invalid_payload"),
                ("/api/v1/shards/7/append", Data(#"{"records":[{"payload":"a"}]}"#.utf8), "application/json", 404, "unknown_shard"),
                ("/api/v1/shards/0/append", binary([(1, [1, 2, 3])]).dropLast(), "application/x-weft-records", 400, "invalid_records"),
                ("/api/v1/shards/0/append", Data([1, 2, 3]), "application/x-weft-records", 400, "invalid_records"),
                ("/api/v1/nothing", Data(), "application/json", 404, "not_found"),
                // Found by weft-faults' hostile clients: a body past the 16 MiB limit was a 500.
                ("/api/v1/shards/0/append", Data(count: (16 << 20) + 1), "application/x-weft-records", 413, "body_too_large"),
            ]
            for (path, body, type, status, code) in bad {
                let (s, obj) = try await request(c, "POST", path, body: body, type: type)
                let err = obj["error"] as? [String: Any]
                #expect(s == status, "\(path) \(code): status \(s)")
                #expect(err?["code"] as? String == code, "\(path): \(obj)")
                #expect((err?["message"] as? String)?.isEmpty == false)
            }
            // Nothing above changed the log: the next record of stream 9 is seq 4.
            let (s3, ok3) = try await request(c, "POST", "/api/v1/shards/0/append", body: Data(#"{"records":[{"stream":9,"payload":"after"}]}"#.utf8))
            #expect(s3 == 200)
            #expect((ok3["records"] as? [[String: Any]])?.first?["seq"] as? Int == 4)

            let (s4, status) = try await request(c, "GET", "/api/v1/cluster/status")
            #expect(s4 == 200)
            let shards = try #require(status["shards"] as? [[String: Any]])
            #expect(shards.count == 2)
            #expect(shards.first?["commit_index"] as? Int ?? 0 >= 5)
            #expect((shards.first?["repair"] as? [String: Any])?["recovering"] as? Bool == false)
        }

        /// Committed reads: a stream by cursor, page by page, and the log by index; bad parameters are a
        /// 4xx JSON error.
        @Test func readsCommittedRecordsByCursorAndRejectsBadInput() async throws {
            let c = try ClusterProcess(name: "apiread", nodes: 1, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            #expect(await c.leader(of: 1) == 1)
            let items = (1...5).map { #"{"stream":4,"payload":"m\#($0)"}"# }.joined(separator: ",")
            let (s0, _) = try await request(c, "POST", "/api/v1/shards/1/append", body: Data(#"{"records":[\#(items),{"stream":5,"payload":"other"}]}"#.utf8))
            #expect(s0 == 200)

            func payloads(_ obj: [String: Any]) -> [String] {
                (obj["records"] as? [[String: Any]] ?? []).compactMap { r in
                    (r["payload_b64"] as? String).flatMap { Data(base64Encoded: $0) }.map { String(decoding: $0, as: UTF8.self) }
                }
            }
            let (s1, page1) = try await request(c, "GET", "/api/v1/shards/1/streams/4?cursor=1&limit=3")
            #expect(s1 == 200)
            #expect(payloads(page1) == ["m1", "m2", "m3"])
            let next = try #require(page1["next"] as? Int)
            #expect(next == 4)
            let (_, page2) = try await request(c, "GET", "/api/v1/shards/1/streams/4?cursor=\(next)&limit=3")
            #expect(payloads(page2) == ["m4", "m5"])
            #expect(page2["next"] as? Int == 6)
            let (_, empty) = try await request(c, "GET", "/api/v1/shards/1/streams/4?cursor=6")
            #expect(payloads(empty).isEmpty)
            #expect(empty["next"] as? Int == 6)

            let (s2, log) = try await request(c, "GET", "/api/v1/shards/1/log?from=1&limit=100")
            #expect(s2 == 200)
            let data = (log["records"] as? [[String: Any]] ?? []).filter { $0["type"] as? Int == 1 }
            #expect(data.count == 6)
            let indexes = (log["records"] as? [[String: Any]] ?? []).compactMap { $0["index"] as? Int }
            #expect(indexes == Array(1...indexes.count))

            let bad: [(String, Int, String)] = [
                ("/api/v1/shards/1/streams/4?cursor=0", 400, "invalid_cursor"),
                ("/api/v1/shards/1/streams/4?cursor=x", 400, "invalid_cursor"),
                ("/api/v1/shards/1/streams/4?limit=0", 400, "invalid_limit"),
                ("/api/v1/shards/1/streams/4?limit=10001", 400, "invalid_limit"),
                ("/api/v1/shards/1/streams/0", 400, "invalid_stream"),
                ("/api/v1/shards/9/streams/4", 404, "unknown_shard"),
                ("/api/v1/shards/1/log?from=0", 400, "invalid_from"),
                ("/api/v1/shards/1/log?consistency=eventual", 400, "invalid_consistency"),
                ("/api/v1/shards/1/streams/4?consistency=local&min_index=x", 400, "invalid_min_index"),
                // Found by review: a waiter for an index no replica will reach soon held a slot for ever.
                ("/api/v1/shards/1/streams/4?consistency=local&min_index=9223372036854775807", 400, "invalid_min_index"),
                ("/api/v1/shards/9/log", 404, "unknown_shard"),
            ]
            for (path, status, code) in bad {
                let (s, obj) = try await request(c, "GET", path)
                let err = obj["error"] as? [String: Any]
                #expect(s == status, "\(path): status \(s)")
                #expect(err?["code"] as? String == code, "\(path): \(obj)")
                #expect((err?["message"] as? String)?.isEmpty == false)
            }
        }

        /// Issue 8, items 1 and 14: three anonymous requests with `type: 3` used to add voters 9, 10 and
        /// 11 to a shard and take its quorum away. Reserved types are refused with 400 on every node
        /// (leader or not), nothing reaches the log, and operator routes need the operator token.
        @Test func reservedTypesAndMissingTokensAreRefused() async throws {
            let c = try ClusterProcess(name: "reserved", nodes: 3, shards: 1)
            try c.startAll()
            defer { c.stopAll() }
            let leader = try #require(await c.leader(of: 0))
            let follower = c.nodes.first { $0 != leader } ?? 1
            let config = Data(ConfigChangeBytes.addVoter(9).base64EncodedString().utf8)
            for node in [leader, follower] {
                for type in [0, 2, 3, 4, 100, 0x7FFF] {
                    let body = Data(#"{"records":[{"stream":0,"type":\#(type),"payload_b64":"\#(String(decoding: config, as: UTF8.self))"}]}"#.utf8)
                    let (s, obj) = try await request(c, "POST", "/api/v1/shards/0/append", body: body, node: node)
                    #expect(s == 400, "type \(type) via node \(node): \(s) \(obj)")
                    #expect((obj["error"] as? [String: Any])?["code"] as? String == "reserved_type")
                }
            }
            // The client range and plain data are accepted.
            let (ok, _) = try await request(c, "POST", "/api/v1/shards/0/append", body: Data(#"{"records":[{"stream":1,"type":32768,"payload":"x"},{"stream":1,"payload":"y"}]}"#.utf8), node: follower)
            #expect(ok == 200)

            // No token, a wrong one, another scheme: 401 on every operator route; /metrics stays open.
            for (token, path, method) in [
                (nil, "/api/v1/shards/0/append", "POST"), ("wrong-token-0123456789", "/api/v1/shards/0/append", "POST"),
                (nil, "/api/v1/shards/0/log", "GET"), (nil, "/api/v1/shards/0/streams/1", "GET"), (nil, "/api/v1/cluster/status", "GET"),
                (nil, "/api/v1/admin/shards/0/membership", "POST"), (String(ClusterProcess.token.dropLast()), "/api/v1/cluster/status", "GET"),
            ] as [(String?, String, String)] {
                let (s, obj) = try await request(c, method, path, body: method == "POST" ? Data(#"{"add_voter":2}"#.utf8) : nil, node: follower, token: token)
                #expect(s == 401, "\(method) \(path) token \(token ?? "none"): \(s)")
                #expect((obj["error"] as? [String: Any])?["code"] as? String == "unauthorized")
            }
            let metrics = try #require(URL(string: "http://127.0.0.1:\(c.apiPorts[follower]!)/metrics"))
            let (_, resp) = try await URLSession.shared.data(from: metrics)
            #expect((resp as? HTTPURLResponse)?.statusCode == 200)

            // The log holds the bootstrap group (three config entries), the leader's no-ops and the two
            // accepted records: no other config entry, and the group is still 1, 2, 3 on every node.
            let (_, log) = try await request(c, "GET", "/api/v1/shards/0/log?from=1&limit=1000", node: leader)
            let types = (log["records"] as? [[String: Any]] ?? []).compactMap { $0["type"] as? Int }
            #expect(types.filter { $0 == 3 }.count == 3)
            #expect(types.filter { $0 == 1 || $0 == 32768 }.count == 2)
            for n in c.nodes {
                let (_, st) = try await request(c, "GET", "/api/v1/cluster/status", node: n)
                let replicas = ((st["shards"] as? [[String: Any]])?.first?["replicas"] as? [[String: Any]]) ?? []
                #expect(Set(replicas.compactMap { $0["node"] as? Int }) == [1, 2, 3], "node \(n): \(replicas)")
            }
        }

        /// Issue 10: with an `Idempotency-Key` a request is written once, whatever node the retries go to and
        /// across a SIGKILL of the shard's leader; the retry answers with the first attempt's places.
        @Test func keyedAppendsAreWrittenOnceAcrossRetriesAndALeaderKill() async throws {
            let c = try ClusterProcess(name: "keys", nodes: 3, shards: 1)
            try c.startAll()
            defer { c.stopAll() }
            let leader = try #require(await c.leader(of: 0))
            func keyed(_ key: String, _ payload: String, node: Int) async throws -> (Int, [String: Any], String?) {
                let url = try #require(URL(string: "http://127.0.0.1:\(c.apiPorts[node]!)/api/v1/shards/0/append"))
                var req = URLRequest(url: url)
                req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
                req.setValue(key, forHTTPHeaderField: "Idempotency-Key")
                req.setValue("application/json", forHTTPHeaderField: "Content-Type")
                req.httpMethod = "POST"
                req.timeoutInterval = 8
                req.httpBody = Data(#"{"records":[{"stream":3,"payload":"\#(payload)"}]}"#.utf8)
                let (data, resp) = try await URLSession.shared.data(for: req)
                let http = resp as? HTTPURLResponse
                return (http?.statusCode ?? 0, (try? JSONSerialization.jsonObject(with: data) as? [String: Any]) ?? [:], http?.value(forHTTPHeaderField: "Idempotent-Replayed"))
            }
            let followers = c.nodes.filter { $0 != leader }
            let (s1, a1, r1) = try await keyed("order-1", "first", node: followers[0])
            #expect(s1 == 200 && r1 == nil)
            let (s2, a2, r2) = try await keyed("order-1", "second body, same key", node: followers[1])
            #expect(s2 == 200 && r2 == "true")
            #expect((a1["records"] as? [[String: Any]])?.first?["index"] as? Int == (a2["records"] as? [[String: Any]])?.first?["index"] as? Int)
            let (s3, _, r3) = try await keyed("order-1", "first", node: leader)
            #expect(s3 == 200 && r3 == "true")
            // Bad keys are refused and write nothing.
            for bad in ["", String(repeating: "k", count: 65), "has space"] where !bad.isEmpty {
                let (s, obj, _) = try await keyed(bad, "x", node: leader)
                #expect(s == 400 && (obj["error"] as? [String: Any])?["code"] as? String == "invalid_idempotency_key")
            }
            // Kill the leader right after sending keyed writes through a follower; retry each until it is
            // acknowledged (through the surviving nodes).
            let survivor = followers[0]
            async let inFlight: [Int] = withTaskGroup(of: Int.self) { g in
                for k in 0..<10 { g.addTask { (try? await keyed("kill-\(k)", "k\(k)", node: survivor).0) ?? 0 } }
                var out: [Int] = []
                for await s in g { out.append(s) }
                return out
            }
            c.kill9(leader)
            _ = await inFlight
            for k in 0..<10 {
                var ok = false
                for _ in 0..<40 where !ok {
                    if let (s, _, _) = try? await keyed("kill-\(k)", "k\(k)", node: followers[k % 2]), s == 200 { ok = true } else {
                        try await Task.sleep(for: .milliseconds(250))
                    }
                }
                #expect(ok, "kill-\(k) was never acknowledged")
            }
            // Every keyed payload is in the stream exactly once.
            var payloads: [String] = []
            var cursor = 1
            while true {
                let (s, page) = try await request(c, "GET", "/api/v1/shards/0/streams/3?cursor=\(cursor)&limit=1000", node: survivor)
                #expect(s == 200)
                let recs = page["records"] as? [[String: Any]] ?? []
                if recs.isEmpty { break }
                payloads += recs.compactMap { ($0["payload_b64"] as? String).flatMap { Data(base64Encoded: $0) }.map { String(decoding: $0, as: UTF8.self) } }
                cursor = page["next"] as? Int ?? cursor + recs.count
            }
            #expect(payloads.filter { $0 == "first" }.count == 1)
            for k in 0..<10 { #expect(payloads.filter { $0 == "k\(k)" }.count == 1, "k\(k): \(payloads)") }
            #expect(payloads.count == 11)
        }

        /// Issue 10: a read right after a write sees it on every node, followers included (the default
        /// read asks the leader for a read index); `consistency=local&min_index=N` waits for index N on the
        /// node it asks; `commit_index` is the commit index and `applied_index` the applied one.
        @Test func aReadOnAFollowerRightAfterAWriteSeesIt() async throws {
            let c = try ClusterProcess(name: "reads", nodes: 3, shards: 1)
            try c.startAll()
            defer { c.stopAll() }
            let leader = try #require(await c.leader(of: 0))
            for k in 0..<30 {
                // Alternate the node that takes the write; read at once from another one.
                let writer = [1, 2, 3][k % 3]
                let reader = [1, 2, 3][(k + 1) % 3]
                let (s, ack) = try await request(c, "POST", "/api/v1/shards/0/append", body: Data(#"{"records":[{"stream":7,"payload":"r\#(k)"}]}"#.utf8), node: writer)
                #expect(s == 200)
                let ref = try #require((ack["records"] as? [[String: Any]])?.first)
                let seq = try #require(ref["seq"] as? Int)
                let index = try #require(ref["index"] as? Int)
                let (rs, page) = try await request(c, "GET", "/api/v1/shards/0/streams/7?cursor=\(seq)&limit=1", node: reader)
                #expect(rs == 200)
                let got = (page["records"] as? [[String: Any]])?.first?["seq"] as? Int
                #expect(got == seq, "node \(reader) missed seq \(seq) written through node \(writer) (leader \(leader))")
                let commit = try #require(page["commit_index"] as? Int)
                let applied = try #require(page["applied_index"] as? Int)
                #expect(applied >= index && commit >= applied)
                let (ls, local) = try await request(c, "GET", "/api/v1/shards/0/log?from=\(index)&limit=1&consistency=local&min_index=\(index)", node: reader)
                #expect(ls == 200)
                #expect((local["records"] as? [[String: Any]])?.first?["index"] as? Int == index)
            }
        }
    }

    /// The payload of a membership change entry (u8 kind | u64 node), as the attack sent it.
    enum ConfigChangeBytes {
        static func addVoter(_ n: UInt64) -> Data {
            var d = Data([1])
            withUnsafeBytes(of: n.littleEndian) { d.append(contentsOf: $0) }
            return d
        }
    }
}
