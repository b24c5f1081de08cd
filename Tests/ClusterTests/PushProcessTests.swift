import Foundation
import Testing

/// Issue 12, offline push: a webhook receiver started by the test (a small Python HTTP server that
/// records every POST, checks its signature, and refuses the first ones with 503), a real 3-node
/// cluster with `[push]` pointing at it.
extension Clusters {
    @Suite(.serialized) struct PushProcessTests {
        /// The receiver: answers 503 to the first `fail` POSTs, then 200; appends one JSON line per POST
        /// (the body, whether its HMAC signature matched, the status it answered) to `log`.
        static let receiver = #"""
            import hashlib, hmac, json, sys
            from http.server import BaseHTTPRequestHandler, HTTPServer
            port_file, log, secret, fail = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
            count = [0]
            class H(BaseHTTPRequestHandler):
                def do_POST(self):
                    body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                    want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
                    count[0] += 1
                    status = 503 if count[0] <= fail else 200
                    with open(log, "a") as f:
                        f.write(json.dumps({"status": status, "sig_ok": hmac.compare_digest(want, self.headers.get("X-Weft-Signature", "")),
                                            "path": self.path, "body": json.loads(body)}) + "\n")
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                def log_message(self, *a): pass
            s = HTTPServer(("127.0.0.1", 0), H)
            with open(port_file + ".tmp", "w") as f: f.write(str(s.server_port))
            import os; os.rename(port_file + ".tmp", port_file)
            s.serve_forever()
            """#

        struct Receiver {
            let process: Process
            let log: String
            let port: Int

            /// The POSTs answered 200, in order.
            var accepted: [[String: Any]] {
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                return text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
                    .filter { $0["status"] as? Int == 200 }
            }
            var all: [[String: Any]] {
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                return text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            }
            /// Every event received in accepted POSTs (with repeats).
            var events: [[String: Any]] { accepted.flatMap { (($0["body"] as? [String: Any])?["events"] as? [[String: Any]]) ?? [] } }
        }

        static let secret = "push-secret-0123456789"

        static func startReceiver(failFirst: Int) throws -> Receiver {
            let dir = NSTemporaryDirectory() + "weft-push-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let script = dir + "/receiver.py"
            try receiver.write(toFile: script, atomically: true, encoding: .utf8)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["python3", script, dir + "/port", dir + "/log.jsonl", secret, String(failFirst)]
            // Never the test's own stdout: a receiver left running would hold that pipe open, and
            // `swift test` waits for its end (CI ran out of time on that once).
            _ = FileManager.default.createFile(atPath: dir + "/receiver.out", contents: nil)
            let out = FileHandle(forWritingAtPath: dir + "/receiver.out") ?? FileHandle.nullDevice
            p.standardOutput = out
            p.standardError = out
            try p.run()
            let end = Date().addingTimeInterval(10)
            while Date() < end {
                if let t = try? String(contentsOfFile: dir + "/port", encoding: .utf8), let port = Int(t) {
                    return Receiver(process: p, log: dir + "/log.jsonl", port: port)
                }
                Thread.sleep(forTimeInterval: 0.05)
            }
            Self.stop(p)
            throw CancellationError()
        }

        /// SIGKILL: a child spawned from the test process's threads inherits their signal mask, in which
        /// SIGTERM is blocked (`terminate()` would leave it running).
        static func stop(_ p: Process) {
            kill(p.processIdentifier, SIGKILL)
            _ = p.waitForExit(seconds: 10)
        }

        /// Bob has no device connected: a contact request and messages reach the webhook (after the
        /// receiver refused the first POSTs: retried), signed, without text until bob opts in; events a
        /// device acknowledged are not pushed; after every node is SIGKILLed and restarted, nothing
        /// notified before is sent again and new events are.
        @Test(.timeLimit(.minutes(4))) func offlineEventsReachTheWebhookOnceAcrossARestart() async throws {
            let rx = try Self.startReceiver(failFirst: 2)
            defer { Self.stop(rx.process) }
            let c = try ClusterProcess(
                name: "push", nodes: 3, shards: 2,
                tables: """
                    [push]
                    webhook_url = "http://127.0.0.1:\(rx.port)/hooks/weft"
                    delay_ms = 2000
                    secret = "\(Self.secret)"
                    retry_max_ms = 1000
                    """)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (alice, a, bob, b) = try await DeliveryProcessTests.contacts(c)
            let send: @Sendable (String) async -> Bool = { text in
                await c.eventually {
                    let r = await c.call(1, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": text, "client_msg_id": text])
                    return r.status == 200 ? true : nil
                } ?? false
            }
            for k in 1...3 { #expect(await send("m\(k)")) }
            // Bob's inbox: 1 contact request, 2 accepted, 3-5 the messages. Alice is owed nothing (her
            // events are her own doing or an acceptance).
            let first = await c.eventually(seconds: 30) { () -> [String]? in
                let ids = Set(rx.events.compactMap { $0["event_id"] as? String })
                return ids.count >= 4 ? ids.sorted() : nil
            }
            #expect(first == ["\(bob):1", "\(bob):3", "\(bob):4", "\(bob):5"], "the request and three messages: \(first ?? [])")
            #expect(rx.all.filter { $0["status"] as? Int == 503 }.count == 2, "the refused POSTs were retried")
            #expect(rx.all.allSatisfy { $0["sig_ok"] as? Bool == true && $0["path"] as? String == "/hooks/weft" })
            #expect(rx.events.allSatisfy { $0["text"] == nil }, "no text before bob opts in")
            #expect(rx.accepted.allSatisfy { ($0["body"] as? [String: Any])?["user_id"] as? Int == Int(bob) })
            let message = rx.events.first { $0["type"] as? String == "message" }
            #expect(message?["peer_id"] as? Int == Int(alice) && message?["conversation_id"] as? String == "d\(min(alice, bob))-\(max(alice, bob))")

            // Bob opts in: the next message's notification carries its text.
            let opt = await c.call(2, "PATCH", "/api/v1/users/me", token: b, json: ["push_preview": true])
            #expect(opt.status == 200 && opt["push_preview"] as? Bool == true)
            #expect(await send("m4"))
            let m4 = await c.eventually(seconds: 20) { rx.events.first { $0["event_id"] as? String == "\(bob):6" } }
            #expect(m4?["text"] as? String == "m4")

            // A device that acknowledges what it gets: m5 is not pushed.
            let delivered = try await DeliveryProcessTests().session(
                c, node: 3, token: b, cursor: "6", seconds: 20, ack: true,
                during: { _ = await send("m5") }
            ) { DeliveryProcessTests.cursors($0).contains(7) }
            #expect(DeliveryProcessTests.cursors(delivered) == [7])
            // Long enough for the push worker to have sent it were it owed (delay 2 s, passes every 250 ms).
            try await Task.sleep(for: .seconds(5))
            #expect(!rx.events.contains { $0["event_id"] as? String == "\(bob):7" }, "an acknowledged event is not pushed")

            // Every node SIGKILLed and restarted: what was notified is not sent again; m6 is.
            let before = rx.events.count
            for n in 1...3 { c.kill9(n) }
            try c.startAll()
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            #expect(await send("m6"))
            let m6 = await c.eventually(seconds: 30) { rx.events.first { $0["event_id"] as? String == "\(bob):8" } }
            #expect(m6?["text"] as? String == "m6")
            try await Task.sleep(for: .seconds(3))
            let ids = rx.events.compactMap { $0["event_id"] as? String }
            #expect(ids.count == Set(ids).count, "each event notified once across the restart: \(ids) (\(before) before the restart)")
        }
    }
}
