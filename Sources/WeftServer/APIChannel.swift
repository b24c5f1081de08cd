import Hummingbird
import HummingbirdCore
import HummingbirdWebSocket
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOWebSocket
@_spi(WSInternal) import WSCore

/// The API port's connections: HTTP/1.1 to the router, or upgraded to one of the two WebSockets.
///
/// `hummingbird-websocket`'s channel runs every upgraded connection in a Swift task (and its handler adds
/// three more: inbound, auto-ping, writer) for the connection's life: ~31 KiB of task stacks per idle
/// device session (Docs/benchmarks.md, "Idle sessions"). Delivery sessions are many and mostly idle, so
/// `/api/v1/ws` is upgraded here to a plain channel handler (`DeliveryHandler`) that owns no task; the
/// HTTP routes and the operator's append stream go on through Hummingbird and swift-websocket as before.
/// The upgrade itself is NIO's (`NIOTypedWebSocketServerUpgrader` in NIO's upgradable HTTP pipeline).
struct APIChannel: ServerChildChannel, HTTPChannelHandler {
    enum Upgraded: Sendable {
        /// A delivery session: its handler is in the pipeline; nothing to run.
        case delivery
        case appendStream(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>)
        case http(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
        /// An upgrade asked for and refused (a path without a WebSocket, or the append stream without
        /// the operator token).
        case refused(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
    }

    struct Value: ServerChildChannelValue {
        let upgraded: EventLoopFuture<Upgraded>
        let channel: any Channel
    }

    struct WebSocketContext: WSCore.WebSocketContext {
        let logger: Logger
    }

    let responder: Responder
    let node: WeftNode
    let api: MessagingAPI
    let operatorToken: [UInt8]

    static func path(_ uri: String) -> Substring { uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "" }

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            let attempted = NIOLoopBoundBox(false, eventLoop: channel.eventLoop)
            let (token, api, tier) = (operatorToken, api, node.delivery)
            // Two WebSocket upgraders, chosen by path: a session's frames are 16 KiB and refused by the
            // frame decoder itself (1009) past that, before they are buffered; the operator's append
            // stream takes 4 MiB frames, and only with the operator token.
            let delivery = NIOTypedWebSocketServerUpgrader<Upgraded>(
                maxFrameSize: DeliverySocket.frameBytesMax,
                shouldUpgrade: { channel, _ in
                    attempted.value = true
                    return channel.eventLoop.makeSucceededFuture(HTTPHeaders())
                },
                upgradePipelineHandler: { channel, _ in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            NIOWebSocketFrameAggregator(
                                minNonFinalFragmentSize: 1, maxAccumulatedFrameCount: 64, maxAccumulatedFrameSize: DeliverySocket.frameBytesMax))
                        try channel.pipeline.syncOperations.addHandler(DeliveryHandler(api: api, tier: tier, loop: channel.eventLoop))
                        return .delivery
                    }
                })
            let appendStream = NIOTypedWebSocketServerUpgrader<Upgraded>(
                maxFrameSize: AppendStream.frameBytesMax,
                shouldUpgrade: { channel, head in
                    attempted.value = true
                    guard let header = head.headers.first(name: "authorization"), header.hasPrefix("Bearer "),
                        OperatorAuthMiddleware<BasicRequestContext>.constantTimeEqual(Array(header.utf8.dropFirst(7)), token)
                    else { return channel.eventLoop.makeSucceededFuture(nil) }
                    return channel.eventLoop.makeSucceededFuture(HTTPHeaders())
                },
                upgradePipelineHandler: { channel, _ in
                    channel.eventLoop.makeCompletedFuture {
                        .appendStream(
                            try NIOAsyncChannel<WebSocketFrame, WebSocketFrame>(
                                wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true)))
                    }
                })
            let upgrader = ByPath(delivery: delivery, appendStream: appendStream, refuse: { attempted.value = true })
            let upgrades = NIOTypedHTTPServerUpgradeConfiguration<Upgraded>(
                upgraders: [upgrader],
                notUpgradingCompletionHandler: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(HTTP1ToHTTPServerCodec(secure: false))
                        try channel.pipeline.syncOperations.addHandler(HTTPConnectionStateHandler(idleTimeout: nil, logger: logger))
                        let http = try NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>(
                            wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
                        return attempted.value ? .refused(http) : .http(http)
                    }
                })
            var pipeline = NIOUpgradableHTTPServerPipelineConfiguration<Upgraded>(upgradeConfiguration: upgrades)
            // As Hummingbird's own channels: it pipelines and validates itself.
            pipeline.enablePipelining = false
            pipeline.enableErrorHandling = false
            pipeline.enableResponseHeaderValidation = false
            // Hummingbird's limits on request heads.
            let limits = HTTP1Channel.Configuration().httpDecoder
            pipeline.decoderConfiguration.maxHeaderFieldSize = limits.maxHeaderFieldSize
            pipeline.decoderConfiguration.maxHeaderListSize = limits.maxHeaderListSize
            pipeline.decoderConfiguration.maxHeaderFieldCount = limits.maxHeaderFieldCount
            let upgraded = try channel.pipeline.syncOperations.configureUpgradableHTTPServerPipeline(configuration: pipeline)
            return Value(upgraded: upgraded, channel: channel)
        }
    }

    func handle(value: Value, logger: Logger) async {
        do {
            switch try await value.upgraded.get() {
            case .delivery:
                return
            case .appendStream(let channel):
                let node = self.node
                _ = try await WebSocketHandler.handle(
                    type: .server,
                    configuration: .init(extensions: [], autoPing: .enabled(timePeriod: .seconds(30)), validateUTF8: false, maxFrameSize: AppendStream.frameBytesMax),
                    asyncChannel: channel, context: WebSocketContext(logger: logger)
                ) { inbound, outbound, _ in
                    try await AppendStream.serve(inbound, outbound, node: node, logger: logger)
                }
            case .http(let channel):
                await handleHTTP(asyncChannel: channel, logger: logger)
            case .refused(let channel):
                try await channel.executeThenClose { _, outbound in
                    let body = #"{"error":{"code":"upgrade_refused","message":"this path does not upgrade to a WebSocket, or the operator token is missing (Docs/api.md)"}}"#
                    var buffer = value.channel.allocator.buffer(capacity: body.utf8.count)
                    buffer.writeString(body)
                    let head = HTTPResponse(
                        status: .badRequest, headerFields: [.connection: "close", .contentType: "application/json", .contentLength: "\(buffer.readableBytes)"])
                    try await outbound.write(contentsOf: [.head(head), .body(buffer), .end(nil)])
                }
            }
        } catch {
            logger.debug("connection ended: \(error)")
        }
    }
}

/// The one "websocket" upgrader NIO allows per connection, choosing the real one by the request's path
/// (each has its own frame size limit); other paths are not upgraded.
struct ByPath: NIOTypedHTTPServerProtocolUpgrader {
    typealias UpgradeResult = APIChannel.Upgraded
    let delivery: NIOTypedWebSocketServerUpgrader<UpgradeResult>
    let appendStream: NIOTypedWebSocketServerUpgrader<UpgradeResult>
    /// Called when an upgrade is refused for its path.
    let refuse: @Sendable () -> Void

    var supportedProtocol: String { delivery.supportedProtocol }
    var requiredUpgradeHeaders: [String] { delivery.requiredUpgradeHeaders }

    func upgrader(_ head: HTTPRequestHead) -> NIOTypedWebSocketServerUpgrader<UpgradeResult>? {
        switch APIChannel.path(head.uri) {
        case Substring(DeliverySocket.path): delivery
        case Substring(AppendStream.path): appendStream
        default: nil
        }
    }

    func buildUpgradeResponse(channel: any Channel, upgradeRequest: HTTPRequestHead, initialResponseHeaders: HTTPHeaders) -> EventLoopFuture<HTTPHeaders> {
        guard let u = upgrader(upgradeRequest) else {
            refuse()
            return channel.eventLoop.makeFailedFuture(NIOWebSocketUpgradeError.unsupportedWebSocketTarget)
        }
        return u.buildUpgradeResponse(channel: channel, upgradeRequest: upgradeRequest, initialResponseHeaders: initialResponseHeaders)
    }

    func upgrade(channel: any Channel, upgradeRequest: HTTPRequestHead) -> EventLoopFuture<UpgradeResult> {
        guard let u = upgrader(upgradeRequest) else { return channel.eventLoop.makeFailedFuture(NIOWebSocketUpgradeError.unsupportedWebSocketTarget) }
        return u.upgrade(channel: channel, upgradeRequest: upgradeRequest)
    }
}
