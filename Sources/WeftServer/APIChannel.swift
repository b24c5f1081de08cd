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
            let upgrader = NIOTypedWebSocketServerUpgrader<Upgraded>(
                maxFrameSize: AppendStream.frameBytesMax,
                shouldUpgrade: { channel, head in
                    attempted.value = true
                    let path = Self.path(head.uri)
                    // The delivery socket upgrades for anyone (the session's first frame authenticates);
                    // the append stream only with the operator token.
                    if path == DeliverySocket.path { return channel.eventLoop.makeSucceededFuture(HTTPHeaders()) }
                    if path == AppendStream.path, let header = head.headers.first(name: "authorization"), header.hasPrefix("Bearer "),
                        OperatorAuthMiddleware<BasicRequestContext>.constantTimeEqual(Array(header.utf8.dropFirst(7)), token)
                    {
                        return channel.eventLoop.makeSucceededFuture(HTTPHeaders())
                    }
                    return channel.eventLoop.makeSucceededFuture(nil)
                },
                upgradePipelineHandler: { channel, head in
                    channel.eventLoop.makeCompletedFuture {
                        if Self.path(head.uri) == DeliverySocket.path {
                            try channel.pipeline.syncOperations.addHandler(
                                NIOWebSocketFrameAggregator(
                                    minNonFinalFragmentSize: 1, maxAccumulatedFrameCount: 64, maxAccumulatedFrameSize: DeliverySocket.frameBytesMax))
                            try channel.pipeline.syncOperations.addHandler(DeliveryHandler(api: api, tier: tier, loop: channel.eventLoop))
                            return .delivery
                        }
                        return .appendStream(
                            try NIOAsyncChannel<WebSocketFrame, WebSocketFrame>(
                                wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true)))
                    }
                })
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
