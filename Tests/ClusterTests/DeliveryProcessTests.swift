import Foundation
import HummingbirdWSClient
import Logging
import NIOCore
import Testing

/// Issue 12 (first part): WebSocket sessions on real processes — resume from a cursor, then live events,
/// each inbox event once and in order across the switch.
extension Clusters {
    @Suite(.serialized) struct DeliveryProcessTests {
        var logger: Logger {
            var l = Logger(label: "test-delivery")
            l.logLevel = .critical
            return l
        }

        final class Frames: @unchecked Sendable {
            let lock = NSLock()
            var all: [[String: Any]] = []
            func add(_ f: [String: Any]) { lock.withLock { all.append(f) } }
            var snapshot: [[String: Any]] { lock.withLock { all } }
        }

        /// Opens a session on `node`, resumes from `cursor`, and collects frames until `done` says so or
        /// `seconds` pass; `during` runs once the session is ready.
        func session(
            _ c: ClusterProcess, node: Int, token: String, cursor: String, seconds: Double = 15, sendAfterReady: [String] = [],
            during: @escaping @Sendable () async -> Void = {}, done: @escaping @Sendable ([[String: Any]]) -> Bool
        ) async throws -> [[String: Any]] {
            let frames = Frames()
            let url = "ws://127.0.0.1:\(c.apiPorts[node]!)/api/v1/ws"
            try await WebSocketClient.connect(url: url, logger: logger) { inbound, outbound, _ in
                try await outbound.write(.text(#"{"type":"auth","token":"\#(token)"}"#))
                try await outbound.write(.text(#"{"type":"resume","cursor":"\#(cursor)"}"#))
                let timer = Task {
                    try? await Task.sleep(for: .seconds(seconds))
                    try? await outbound.close(.normalClosure, reason: "test timeout")
                }
                var started = false
                var closing = false
                for try await message in inbound.messages(maxSize: 1 << 20) {
                    guard case .text(let t) = message, let f = try? JSONSerialization.jsonObject(with: Data(t.utf8)) as? [String: Any] else { continue }
                    frames.add(f)
                    if f["type"] as? String == "ready", !started {
                        started = true
                        for text in sendAfterReady { try await outbound.write(.text(text)) }
                        Task { await during() }
                    }
                    // Done: close, and keep reading until the server's close ends the stream (a client
                    // that stops reading cannot finish the close handshake).
                    if !closing, done(frames.snapshot) {
                        closing = true
                        try? await outbound.close(.normalClosure, reason: nil)
                    }
                }
                timer.cancel()
            }
            return frames.snapshot
        }

        /// alice (signed up on node 1) and bob (node 2), contacts: their ids and tokens.
        static func contacts(_ c: ClusterProcess) async throws -> (UInt64, String, UInt64, String) {
            let alice = try #require(await c.register("alice"))
            let bob = try #require(await c.register("bob", via: 2))
            let a = try #require(await c.login("alice"))
            let b = try #require(await c.login("bob", via: 2))
            #expect(await c.befriend((alice, a), (bob, b)))
            return (alice, a, bob, b)
        }

        static func cursors(_ frames: [[String: Any]]) -> [UInt64] {
            frames.compactMap { ($0["event"] as? [String: Any])?["cursor"] as? String }.compactMap(UInt64.init)
        }

        @Test(.timeLimit(.minutes(3))) func aSessionResumesThenGetsLiveEventsOnceInOrder() async throws {
            let c = try ClusterProcess(name: "ws", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, a, bob, b) = try await Self.contacts(c)
            for k in 0..<3 {
                _ = await c.eventually {
                    let r = await c.call(1 + k % 3, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "before \(k)"])
                    return r.status == 200 ? true : nil
                }
            }
            // Bob's inbox: request, accepted, 3 messages (after the relays): 5 events; then 3 more live.
            _ = await c.eventually { await c.syncAll(2, token: b).flatMap { $0.count >= 5 ? true : nil } }
            let sendMore: @Sendable () async -> Void = {
                for k in 0..<3 {
                    _ = await c.eventually {
                        let r = await c.call(3, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "live \(k)"])
                        return r.status == 200 ? true : nil
                    }
                }
            }
            let frames = try await session(c, node: 2, token: b, cursor: "0", during: sendMore) { Self.cursors($0).count >= 8 }
            let cursors = Self.cursors(frames)
            #expect(cursors == Array(1...8), "each event once, in order: \(cursors)")
            let contents = frames.compactMap { (($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String }
            #expect(contents == ["before 0", "before 1", "before 2", "live 0", "live 1", "live 2"])
            #expect(frames.contains { $0["type"] as? String == "ready" })

            // Another device resumes from cursor 6 on another node: only 7 and 8.
            let later = try await session(c, node: 3, token: b, cursor: "6", seconds: 5) { Self.cursors($0).count >= 2 }
            #expect(Self.cursors(later) == [7, 8])

            // Without a valid token the session is closed (no events).
            let refused = try await session(c, node: 1, token: "not-a-token", cursor: "0", seconds: 3) { _ in false }
            #expect(Self.cursors(refused).isEmpty)
        }

        /// Messages sent over the socket: the same validation and idempotency as POST /api/v1/messages.
        @Test(.timeLimit(.minutes(3))) func messagesSentOverTheSocketAreAnsweredAndWrittenOnce() async throws {
            let c = try ClusterProcess(name: "wssend", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (alice, a, bob, b) = try await Self.contacts(c)
            let msg = #"{"receiver_id":\#(bob),"message_type":"text","content":"over the socket","client_msg_id":"s1"}"#
            let frames = try await session(
                c, node: 3, token: a, cursor: "0",
                sendAfterReady: [
                    #"{"type":"send","request_id":"r1","message":\#(msg)}"#, #"{"type":"send","request_id":"r2","message":\#(msg)}"#,
                    #"{"type":"send","request_id":"r3","message":{"receiver_id":\#(bob),"message_type":"sticker","content":"x"}}"#,
                ]
            ) { fs in fs.filter { $0["type"] as? String == "sent" || $0["type"] as? String == "error" }.count >= 3 }
            let sent = frames.filter { $0["type"] as? String == "sent" }
            #expect(sent.count == 2)
            let ids = Set(sent.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value })
            #expect(ids.count == 1, "the same client_msg_id is one message")
            #expect(sent.contains { $0["replayed"] as? Bool == true })
            let error = frames.first { $0["type"] as? String == "error" }
            #expect(error?["request_id"] as? String == "r3" && error?["code"] as? String == "invalid_message_type")
            let history = await c.history(2, token: b, peer: alice)
            #expect(history?.count == 1 && history?.first?["content"] as? String == "over the socket")
        }

        /// The node holding a device's session is SIGKILLed; the device resumes from its last cursor on
        /// another node and, with the events of both sessions together, has every event once, in order.
        @Test(.timeLimit(.minutes(3))) func aDeviceResumesOnAnotherNodeAfterAKill() async throws {
            let c = try ClusterProcess(name: "wskill", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, a, bob, b) = try await Self.contacts(c)
            let send: @Sendable (Int, [Int]) async -> Void = { k, nodes in
                _ = await c.eventually {
                    for n in nodes {
                        let r = await c.call(n, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "m\(k)", "client_msg_id": "k\(k)"])
                        if r.status == 200 { return true }
                    }
                    return nil
                }
            }
            // First session on node 2: the request, the accept and four messages (cursors 1...6).
            let first = try await session(c, node: 2, token: b, cursor: "0", during: { for k in 0..<4 { await send(k, [1, 3]) } }) {
                Self.cursors($0).count >= 6
            }
            let seen = Self.cursors(first)
            #expect(seen == Array(1...6))
            c.kill9(2)
            // Messages while the device is away, then a resume on node 3 from the last cursor it saw.
            for k in 4..<7 { await send(k, [1, 3]) }
            let second = try await session(c, node: 3, token: b, cursor: "\(seen.last ?? 0)", during: { for k in 7..<9 { await send(k, [1, 3]) } }) {
                Self.cursors($0).count >= 5
            }
            let all = seen + Self.cursors(second)
            #expect(all == Array(1...11), "every event once, in order, across the kill: \(all)")
            let contents = (first + second).compactMap { (($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String }
            #expect(contents == (0..<9).map { "m\($0)" })
        }
    }
}
