import Foundation
import Testing
import WeftTesting

/// Issue 12, offline push: a webhook receiver started by the test (`Tools/webhook-receiver.py`: https
/// with a self-signed certificate, records every POST, checks its signature, refuses the first ones
/// with 503), a real 3-node cluster with `[push]` pointing at it and trusting its certificate.
extension Clusters {
    @Suite(.serialized) struct PushProcessTests {
        static let secret = "push-secret-0123456789"

        /// Bob has no device connected: a contact request and messages reach the https webhook (after
        /// the receiver refused the first POSTs: retried), signed, without text until bob opts in; events a
        /// device acknowledged (over its WebSocket, or by the cursor of an HTTP sync) are not pushed; after every node is SIGKILLed and restarted, nothing
        /// notified before is sent again and new events are.
        @Test(.timeLimit(.minutes(4))) func offlineEventsReachTheWebhookOnceAcrossARestart() async throws {
            let rx = try WebhookReceiver(secret: Self.secret, failFirst: 2, tls: true)
            defer { rx.stop() }
            let ca = try #require(rx.certificate)
            let c = try ClusterProcess(
                name: "push", nodes: 3, shards: 2,
                tables: """
                    [push]
                    webhook_url = "https://localhost:\(rx.port)/hooks/weft"
                    ca_file = "\(ca)"
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
            // A device that syncs over HTTP: the cursor of its next sync acknowledges what it fetched, so
            // m5b is not pushed either.
            #expect(await send("m5b"))
            let fetched = await c.eventually(seconds: 10) { () -> Bool? in
                let r = await c.call(2, "GET", "/api/v1/sync?cursor=7", token: b)
                return (r["events"] as? [[String: Any]] ?? []).contains { $0["cursor"] as? String == "8" } ? true : nil
            }
            #expect(fetched == true)
            #expect(await c.call(2, "GET", "/api/v1/sync?cursor=8", token: b).status == 200)
            // Long enough for the push worker to have sent them were they owed (delay 2 s, passes every 250 ms).
            try await Task.sleep(for: .seconds(5))
            #expect(!rx.events.contains { $0["event_id"] as? String == "\(bob):7" }, "an acknowledged event is not pushed")
            #expect(!rx.events.contains { $0["event_id"] as? String == "\(bob):8" }, "an event a sync's cursor acknowledged is not pushed")

            // Every node SIGKILLed and restarted: what was notified is not sent again; m6 is.
            let before = rx.events.count
            for n in 1...3 { c.kill9(n) }
            try c.startAll()
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            #expect(await send("m6"))
            let m6 = await c.eventually(seconds: 30) { rx.events.first { $0["event_id"] as? String == "\(bob):9" } }
            #expect(m6?["text"] as? String == "m6")
            try await Task.sleep(for: .seconds(3))
            let ids = rx.events.compactMap { $0["event_id"] as? String }
            #expect(ids.count == Set(ids).count, "each event notified once across the restart: \(ids) (\(before) before the restart)")
        }
    }
}
