import Foundation
import HummingbirdWSClient
import Logging
import NIOCore
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Issue 9: the append stream (`/api/v1/append-stream`, a WebSocket with many appends in flight) on a
/// real 3-node cluster: every request answered once, by id, with where its record landed; bad frames
/// answered with a reason or the connection closed with one; no token, no upgrade.
extension Clusters {
    @Suite(.serialized) struct AppendStreamTests {
        struct Answer {
            var status: UInt8
            var refs: [(index: UInt64, term: UInt64, stream: UInt64, seq: UInt64)]
            var message: String
        }

        static func frame(id: UInt64, shard: UInt64, _ records: [(UInt64, String)]) -> ByteBuffer {
            var b = ByteBuffer()
            b.writeInteger(id, endianness: .little)
            b.writeInteger(shard, endianness: .little)
            for (stream, text) in records {
                b.writeInteger(stream, endianness: .little)
                b.writeInteger(UInt32(text.utf8.count), endianness: .little)
                b.writeString(text)
            }
            return b
        }

        static func parse(_ message: ByteBuffer, into answers: inout [UInt64: [Answer]]) {
            var b = message
            while let id = b.readInteger(endianness: .little, as: UInt64.self), let status = b.readInteger(as: UInt8.self),
                let n = b.readInteger(endianness: .little, as: UInt32.self)
            {
                var a = Answer(status: status, refs: [], message: "")
                if status == 0 {
                    for _ in 0..<n {
                        guard let i = b.readInteger(endianness: .little, as: UInt64.self), let t = b.readInteger(endianness: .little, as: UInt64.self),
                            let s = b.readInteger(endianness: .little, as: UInt64.self), let q = b.readInteger(endianness: .little, as: UInt64.self)
                        else { return }
                        a.refs.append((i, t, s, q))
                    }
                } else {
                    a.message = b.readString(length: Int(n)) ?? ""
                }
                answers[id, default: []].append(a)
            }
        }

        final class Box<T>: @unchecked Sendable {
            let lock = NSLock()
            var value: T
            init(_ v: T) { value = v }
            func with<R>(_ f: (inout T) -> R) -> R { lock.withLock { f(&value) } }
        }

        var logger: Logger {
            var l = Logger(label: "test-append-stream")
            l.logLevel = .critical
            return l
        }

        @Test func manyAppendsInFlightAreEachAnsweredOnceAndLandOnce() async throws {
            let c = try ClusterProcess(name: "stream", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            #expect(await c.leader(of: 0) != nil)
            #expect(await c.leader(of: 1) != nil)
            let count: UInt64 = 300
            let answers = Box<[UInt64: [Answer]]>([:])
            // Through node 2: requests for the shard it does not lead are forwarded.
            let url = "ws://127.0.0.1:\(c.apiPorts[2]!)/api/v1/append-stream"
            try await WebSocketClient.connect(
                url: url, configuration: .init(maxFrameSize: 1 << 20, additionalHeaders: [.authorization: "Bearer \(ClusterProcess.token)"]),
                logger: logger
            ) { inbound, outbound, _ in
                // All requests at once: many in flight on the one connection.
                for id in 1...count {
                    try await outbound.write(.binary(Self.frame(id: id, shard: id % 2, [(id % 5 + 1, "message \(id)")])))
                }
                // Bad input, answered by id, nothing written: no records; an unknown shard; a truncated record.
                try await outbound.write(.binary(Self.frame(id: 9001, shard: 0, [])))
                try await outbound.write(.binary(Self.frame(id: 9002, shard: 77, [(1, "x")])))
                var truncated = Self.frame(id: 9003, shard: 0, [(1, "y")])
                truncated.moveWriterIndex(to: truncated.writerIndex - 1)
                truncated.writeInteger(UInt32(1000), endianness: .little)
                try await outbound.write(.binary(truncated))
                for try await message in inbound.messages(maxSize: 1 << 20) {
                    guard case .binary(let b) = message else { continue }
                    let done = answers.with { a -> Bool in
                        Self.parse(b, into: &a)
                        return a.count >= Int(count) + 3
                    }
                    if done { break }
                }
                try await outbound.close(.normalClosure, reason: nil)
            }
            let got = answers.with { $0 }
            #expect(got.count == Int(count) + 3)
            for id in 1...count {
                let a = got[id] ?? []
                #expect(a.count == 1, "request \(id) answered \(a.count) times")
                #expect(a.first?.status == 0, "request \(id): \(a.first?.message ?? "no answer")")
                #expect(a.first?.refs.count == 1)
                #expect(a.first?.refs.first?.stream == id % 5 + 1)
            }
            for bad: UInt64 in [9001, 9002, 9003] {
                #expect(got[bad]?.first?.status == 1, "request \(bad)")
                #expect(got[bad]?.first?.message.isEmpty == false)
            }
            // Every stream's seqs are dense, each record is there once, and a read finds each message.
            for shard: UInt64 in 0...1 {
                let refs = got.filter { $0.key <= count && $0.key % 2 == shard }.flatMap { $0.value.first?.refs ?? [] }
                #expect(Set(refs.map(\.index)).count == refs.count)
                for stream in Set(refs.map(\.stream)) {
                    let seqs = refs.filter { $0.stream == stream }.map(\.seq).sorted()
                    #expect(seqs == Array(1...UInt64(seqs.count)), "shard \(shard) stream \(stream)")
                }
            }
            let url1 = try #require(URL(string: "http://127.0.0.1:\(c.apiPorts[1]!)/api/v1/shards/0/streams/1?cursor=1&limit=1000"))
            let (data, _) = try await URLSession.shared.data(for: ClusterProcess.authorized(url1))
            let obj = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
            let texts = (obj["records"] as? [[String: Any]] ?? []).compactMap { ($0["payload_b64"] as? String).flatMap { Data(base64Encoded: $0) } }
                .map { String(decoding: $0, as: UTF8.self) }
            let expected = (1...count).filter { $0 % 2 == 0 && $0 % 5 + 1 == 1 }.map { "message \($0)" }
            #expect(texts.sorted() == expected.sorted())
        }

        @Test func brokenFramesCloseTheConnectionWithAReasonAndNoTokenNoUpgrade() async throws {
            let c = try ClusterProcess(name: "streambad", nodes: 1, shards: 1)
            try c.startAll()
            defer { c.stopAll() }
            #expect(await c.leader(of: 0) == 1)
            let url = "ws://127.0.0.1:\(c.apiPorts[1]!)/api/v1/append-stream"
            let auth = "Bearer \(ClusterProcess.token)"
            // A text frame.
            let closeText = try await WebSocketClient.connect(url: url, configuration: .init(additionalHeaders: [.authorization: auth]), logger: logger) { inbound, outbound, _ in
                try await outbound.write(.text("append please"))
                for try await _ in inbound {}
            }
            #expect(closeText?.closeCode == .unacceptableData)
            #expect(closeText?.reason?.contains("binary") == true)
            // A frame too short to hold an id and a shard.
            let closeShort = try await WebSocketClient.connect(url: url, configuration: .init(additionalHeaders: [.authorization: auth]), logger: logger) { inbound, outbound, _ in
                try await outbound.write(.binary(ByteBuffer(bytes: [1, 2, 3])))
                for try await _ in inbound {}
            }
            #expect(closeShort?.closeCode == .protocolError)
            // No token, or a wrong one: no WebSocket.
            await #expect(throws: (any Error).self) {
                try await WebSocketClient.connect(url: url, logger: logger) { _, _, _ in }
            }
            await #expect(throws: (any Error).self) {
                try await WebSocketClient.connect(url: url, configuration: .init(additionalHeaders: [.authorization: "Bearer wrong-token-0123456789"]), logger: logger) { _, _, _ in }
            }
            // A plain GET with the token is told to upgrade (400, JSON), without it 401.
            let plain = try #require(URL(string: "http://127.0.0.1:\(c.apiPorts[1]!)/api/v1/append-stream"))
            let (_, r1) = try await URLSession.shared.data(for: ClusterProcess.authorized(plain))
            #expect((r1 as? HTTPURLResponse)?.statusCode == 400)
            let (_, r2) = try await URLSession.shared.data(for: URLRequest(url: plain))
            #expect((r2 as? HTTPURLResponse)?.statusCode == 401)
        }
    }
}
