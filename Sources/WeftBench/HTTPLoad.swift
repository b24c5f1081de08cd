import NIOCore
import NIOHTTP1
import NIOPosix

/// A lean keep-alive HTTP/1.1 client for load generation: one connection, one request at a time on it
/// (open several for concurrency). URLSession's per-request overhead would make the client the bottleneck.
final class HTTPLoadConnection: @unchecked Sendable {
    let channel: any Channel
    let handler: ResponseHandler
    let host: String

    /// `@unchecked Sendable`: `pending` is only touched on the channel's event loop.
    final class ResponseHandler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPClientResponsePart
        var pending: EventLoopPromise<UInt>?
        var status: UInt = 0

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): status = h.status.code
            case .body: break
            case .end:
                let p = pending
                pending = nil
                p?.succeed(status)
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            let p = pending
            pending = nil
            p?.fail(error)
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            let p = pending
            pending = nil
            p?.fail(ChannelError.ioOnClosedChannel)
        }
    }

    init(channel: any Channel, handler: ResponseHandler, host: String) {
        self.channel = channel
        self.handler = handler
        self.host = host
    }

    static func connect(host: String, port: Int, group: any EventLoopGroup) async throws -> HTTPLoadConnection {
        let handler = ResponseHandler()
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port).get()
        return HTTPLoadConnection(channel: channel, handler: handler, host: "\(host):\(port)")
    }

    /// POSTs `body` and returns the response status.
    func post(path: String, body: [UInt8], contentType: String, token: String) async throws -> UInt {
        let loop = channel.eventLoop
        let promise = loop.makePromise(of: UInt.self)
        let channel = self.channel
        let handler = self.handler
        let host = self.host
        loop.execute {
            handler.pending = promise
            var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: path)
            head.headers.add(name: "Host", value: host)
            head.headers.add(name: "Content-Type", value: contentType)
            head.headers.add(name: "Authorization", value: "Bearer \(token)")
            head.headers.add(name: "Content-Length", value: String(body.count))
            channel.write(HTTPClientRequestPart.head(head), promise: nil)
            channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil)
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        }
        return try await promise.futureResult.get()
    }

    func close() async { try? await channel.close() }
}
