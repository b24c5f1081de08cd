import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// What a client WebSocket hands its reader, in the order it happened.
enum WebSocketInbound: Sendable, Equatable {
    /// A text message (fragments already joined).
    case text(String)
    /// The connection is over; nothing follows. `code`: the close code of the server's close frame (nil:
    /// none came — the connection was lost or reset, it was silent too long, or the harness closed it);
    /// `reason`: the close frame's reason, or what ended the connection.
    case closed(code: UInt16?, reason: String)
}

/// A WebSocket that could not be opened. `connect`: no TCP connection at all (nothing was sent).
struct WebSocketError: Error, CustomStringConvertible {
    var connect: Bool
    var description: String
}

/// A client WebSocket (RFC 6455) on NIO: the HTTP/1.1 upgrade with `NIOWebSocketClientUpgrader` over a
/// `ClientBootstrap`, text frames masked as every client frame must be, pings answered with pongs, the
/// server's close frame answered and its code reported, and a connection that receives nothing for
/// `silence` closed (a paused or cut-off server sends nothing, not even a FIN). The reader gets
/// `inbound`; writing is fire-and-forget (a frame written to a dead connection is lost with it).
final class WebSocketConnection: Sendable {
    let channel: any Channel
    let inbound: AsyncStream<WebSocketInbound>
    /// Set (once) when this side closes: the reason the reader is told instead of the server's echo.
    private let closing: Locked<String?>

    private init(channel: any Channel, inbound: AsyncStream<WebSocketInbound>, closing: Locked<String?>) {
        self.channel = channel
        self.inbound = inbound
        self.closing = closing
    }

    /// Connects, upgrades `path` to a WebSocket, and returns once the upgrade is done; throws when there
    /// is no connection within `timeout` (`connect` set), or no upgrade (an HTTP answer other than 101, the
    /// connection lost, or nothing within `timeout`).
    static func connect(
        group: any EventLoopGroup, host: String, port: Int, path: String, silence: TimeAmount, timeout: TimeAmount, maxFrameBytes: Int = 1 << 20
    ) async throws -> WebSocketConnection {
        let loop = group.next()
        let upgraded = loop.makePromise(of: Void.self)
        let (inbound, continuation) = AsyncStream<WebSocketInbound>.makeStream()
        let closing = Locked<String?>(nil)
        let requestName = "weft-faults-ws-request"
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                let upgrader = NIOWebSocketClientUpgrader(maxFrameSize: maxFrameBytes, automaticErrorHandling: true) { channel, _ in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: silence))
                        try channel.pipeline.syncOperations.addHandler(
                            NIOWebSocketFrameAggregator(minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 256, maxAccumulatedFrameSize: maxFrameBytes))
                        try channel.pipeline.syncOperations.addHandler(FrameHandler(continuation, closing: closing, silence: silence))
                        upgraded.succeed()
                    }
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers(
                        withClientUpgrade: (
                            upgraders: [upgrader],
                            completionHandler: { context in context.pipeline.removeHandler(name: requestName, promise: nil) }
                        ))
                    try channel.pipeline.syncOperations.addHandler(UpgradeRequest(host: host, port: port, path: path, upgraded: upgraded), name: requestName)
                }
            }
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: host, port: port).get()
        } catch {
            continuation.finish()
            upgraded.fail(WebSocketError(connect: true, description: "connect: \(error)"))
            throw WebSocketError(connect: true, description: "connect: \(error)")
        }
        let deadline = loop.scheduleTask(in: timeout) {
            upgraded.fail(WebSocketError(connect: false, description: "no WebSocket upgrade within \(timeout.nanoseconds / 1_000_000) ms"))
        }
        do {
            try await upgraded.futureResult.get()
            deadline.cancel()
        } catch {
            deadline.cancel()
            channel.close(promise: nil)
            continuation.finish()
            throw error as? WebSocketError ?? WebSocketError(connect: false, description: "\(error)")
        }
        return WebSocketConnection(channel: channel, inbound: inbound, closing: closing)
    }

    /// A text frame (masked with a fresh key).
    func send(_ text: String) {
        let frame = WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: channel.allocator.buffer(string: text))
        channel.writeAndFlush(frame, promise: nil)
    }

    /// Closes from this side: a close frame with `code`, then the connection (at once once the frame is
    /// written, after a second at most). The reader's `.closed` carries `reason`, not the server's echo.
    func close(code: UInt16 = 1000, _ reason: String) {
        let first = closing.withLock { value -> Bool in
            guard value == nil else { return false }
            value = reason
            return true
        }
        guard first else { return }
        let channel = self.channel
        var data = channel.allocator.buffer(capacity: 2)
        data.writeInteger(code)
        let frame = WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: .random(), data: data)
        channel.writeAndFlush(frame).whenComplete { _ in channel.close(promise: nil) }
        channel.eventLoop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
    }

    /// Sends the upgrade request (`GET path`, to which `NIOHTTPClientUpgradeHandler` adds the upgrade
    /// headers) once connected, and fails the upgrade when the server answers anything but 101 or the
    /// connection ends first. Removed from the pipeline when the upgrade succeeds.
    final class UpgradeRequest: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = HTTPClientResponsePart
        typealias OutboundOut = HTTPClientRequestPart
        let host: String
        let port: Int
        let path: String
        let upgraded: EventLoopPromise<Void>
        var status: UInt?
        var body: [UInt8] = []

        init(host: String, port: Int, path: String, upgraded: EventLoopPromise<Void>) {
            self.host = host
            self.port = port
            self.path = path
            self.upgraded = upgraded
        }

        func channelActive(context: ChannelHandlerContext) {
            var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path)
            head.headers.add(name: "Host", value: "\(host):\(port)")
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            context.fireChannelActive()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            // Only an answer that is not an upgrade gets here.
            switch unwrapInboundIn(data) {
            case .head(let h): status = h.status.code
            case .body(var b): if body.count < 300 { body += b.readBytes(length: min(b.readableBytes, 300 - body.count)) ?? [] }
            case .end:
                upgraded.fail(WebSocketError(connect: false, description: "answered \(status ?? 0) \(String(decoding: body, as: UTF8.self))"))
                context.close(promise: nil)
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            upgraded.fail(WebSocketError(connect: false, description: "before the upgrade: \(error)"))
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            upgraded.fail(WebSocketError(connect: false, description: "connection closed before the upgrade\(status.map { " (answered \($0))" } ?? "")"))
            context.fireChannelInactive()
        }
    }

    /// After the upgrade: text frames to the reader, pings answered, the close handshake, silence.
    final class FrameHandler: ChannelInboundHandler {
        typealias InboundIn = WebSocketFrame
        typealias OutboundOut = WebSocketFrame
        let continuation: AsyncStream<WebSocketInbound>.Continuation
        let closing: Locked<String?>
        let silence: TimeAmount
        var finished = false

        init(_ continuation: AsyncStream<WebSocketInbound>.Continuation, closing: Locked<String?>, silence: TimeAmount) {
            self.continuation = continuation
            self.closing = closing
            self.silence = silence
        }

        /// The last thing the reader gets: this side's reason when it closed first, else `code`/`reason`.
        func finish(code: UInt16?, reason: String) {
            guard !finished else { return }
            finished = true
            if let mine = closing.withLock({ $0 }) {
                continuation.yield(.closed(code: nil, reason: mine))
            } else {
                continuation.yield(.closed(code: code, reason: reason))
            }
            continuation.finish()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let frame = unwrapInboundIn(data)
            switch frame.opcode {
            case .text:
                var d = frame.unmaskedData
                continuation.yield(.text(d.readString(length: d.readableBytes) ?? ""))
            case .ping:
                let pong = WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.unmaskedData)
                context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
            case .connectionClose:
                var d = frame.unmaskedData
                let code = d.readInteger(as: UInt16.self)
                let reason = d.readString(length: d.readableBytes) ?? ""
                finish(code: code, reason: reason)
                // Answer the close (echoing its code) unless this side sent one first, then hang up.
                guard closing.withLock({ $0 }) == nil else {
                    context.close(promise: nil)
                    return
                }
                var echo = context.channel.allocator.buffer(capacity: 2)
                echo.writeInteger(code ?? 1000)
                let answer = WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: .random(), data: echo)
                context.writeAndFlush(wrapOutboundOut(answer)).whenComplete { [channel = context.channel] _ in channel.close(promise: nil) }
            default:
                // Binary frames are not in the protocol; pongs need no answer.
                break
            }
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
                finish(code: nil, reason: "silent for \(silence.nanoseconds / 1_000_000_000) s")
                context.close(promise: nil)
                return
            }
            context.fireUserInboundEventTriggered(event)
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            finish(code: nil, reason: "\(error)")
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            finish(code: nil, reason: "connection closed")
            context.fireChannelInactive()
        }
    }
}
