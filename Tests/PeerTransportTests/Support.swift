import Foundation
import Logging
import NIOCore
import NIOPosix
import PeerTransport
import Testing
import WeftCore

/// Polls `condition` every 5 ms until it holds or `seconds` pass; returns whether it held.
func eventually(within seconds: Double = 10, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(5))
    }
    return condition()
}

/// A value shared between the test and NIO threads.
final class Shared<Value: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<R>(_ body: (inout Value) -> R) -> R {
        self.lock.lock()
        defer { self.lock.unlock() }
        return body(&self.value)
    }
    var get: Value { self.withLock { $0 } }
}

struct ReceivedFrame: Sendable, Equatable {
    var from: NodeID
    var shard: UInt64
    var payload: [UInt8]
}

/// Records every frame handed to `onFrame`.
final class Inbox: Sendable {
    let frames = Shared<[ReceivedFrame]>([])
    var onFrame: @Sendable (NodeID, UInt64, [UInt8]) -> Void {
        { from, shard, payload in self.frames.withLock { $0.append(ReceivedFrame(from: from, shard: shard, payload: payload)) } }
    }
    var all: [ReceivedFrame] { self.frames.get }
    func from(_ node: NodeID) -> [ReceivedFrame] { self.all.filter { $0.from == node } }
}

/// Captures log events so tests can check that a closed connection says why.
struct CapturingLogHandler: LogHandler {
    let events: Shared<[String]>
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .debug
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let merged = self.metadata.merging(event.metadata ?? [:]) { $1 }
        let line = "\(event.level) \(event.message) \(merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))"
        if ProcessInfo.processInfo.environment["WEFT_TEST_LOG"] != nil { print(line) }
        self.events.withLock { $0.append(line) }
    }
}

func makeLogger(_ events: Shared<[String]> = Shared([])) -> Logger {
    Logger(label: "peer-transport-test") { _ in CapturingLogHandler(events: events) }
}

/// Ports that were free a moment ago (bound together, then released), so transports can be configured
/// with each other's addresses before any of them starts.
func reservePorts(_ count: Int, group: any EventLoopGroup) async throws -> [Int] {
    var channels: [any Channel] = []
    for _ in 0..<count {
        channels.append(
            try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .bind(host: "127.0.0.1", port: 0).get())
    }
    let ports = channels.compactMap { $0.localAddress?.port }
    for channel in channels { try await channel.close() }
    #expect(ports.count == count)
    return ports
}

/// A node under test: its transport, its inbox and its log.
struct TestNode {
    var id: NodeID
    var transport: PeerTransport
    var inbox: Inbox
    var log: Shared<[String]>
    /// The peers `onSuspect` named, in order.
    var suspects: Shared<[NodeID]>
}

let testSecret = Array("weft test cluster secret".utf8)

func makeNode(
    id: NodeID, port: Int, peers: [NodeID: Int], secret: [UInt8] = testSecret, cluster: String = "test",
    group: any EventLoopGroup, configuration: PeerTransportConfiguration = PeerTransportConfiguration()
) -> TestNode {
    let inbox = Inbox()
    let log = Shared<[String]>([])
    let suspects = Shared<[NodeID]>([])
    let transport = PeerTransport(
        self: id, clusterName: cluster, secret: secret, listen: PeerAddress(host: "127.0.0.1", port: port),
        peers: peers.mapValues { PeerAddress(host: "127.0.0.1", port: $0) }, group: group, logger: makeLogger(log),
        configuration: configuration, onSuspect: { peer in suspects.withLock { $0.append(peer) } }, onFrame: inbox.onFrame)
    return TestNode(id: id, transport: transport, inbox: inbox, log: log, suspects: suspects)
}

/// Payload `[sender, seq (u32 LE)]`, so receivers can check origin and order.
func payload(from sender: NodeID, seq: Int) -> [UInt8] {
    [UInt8(truncatingIfNeeded: sender.rawValue)] + withUnsafeBytes(of: UInt32(seq).littleEndian) { Array($0) }
}

func seq(of payload: [UInt8]) -> Int? {
    guard payload.count == 5 else { return nil }
    return Int(payload[1]) | Int(payload[2]) << 8 | Int(payload[3]) << 16 | Int(payload[4]) << 24
}

/// A raw TCP client that records what it receives; used to play a hostile or broken peer.
final class RawClient: Sendable {
    let channel: any Channel
    let received: Shared<[UInt8]>

    private final class Recorder: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let received: Shared<[UInt8]>
        init(_ received: Shared<[UInt8]>) { self.received = received }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = self.unwrapInboundIn(data)
            self.received.withLock { $0 += buffer.readableBytesView }
        }
    }

    init(port: Int, group: any EventLoopGroup) async throws {
        let received = Shared<[UInt8]>([])
        self.received = received
        self.channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Recorder(received))
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
    }

    func send(_ bytes: [UInt8]) async throws {
        try await self.channel.writeAndFlush(ByteBuffer(bytes: bytes))
    }

    func send(_ frame: PeerFrame) async throws {
        var buffer = ByteBuffer()
        frame.encode(into: &buffer)
        try await self.channel.writeAndFlush(buffer)
    }

    /// Frame types in what the server sent so far (parsing whole frames only).
    var receivedTypes: [UInt8] {
        let bytes = self.received.get
        var types: [UInt8] = []
        var offset = 0
        while offset + 5 <= bytes.count {
            let length = Int(bytes[offset]) | Int(bytes[offset + 1]) << 8 | Int(bytes[offset + 2]) << 16 | Int(bytes[offset + 3]) << 24
            guard offset + 5 + length <= bytes.count else { break }
            types.append(bytes[offset + 4])
            offset += 5 + length
        }
        return types
    }

    var isOpen: Bool { self.channel.isActive }
}
