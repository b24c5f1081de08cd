import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// What one HTTP exchange ended with. A transport error or a timeout leaves the outcome of a write
/// unknown; the workload records it as such and never retries that payload.
enum HTTPOutcome: Sendable {
    case response(status: UInt, body: [UInt8])
    case failed(String)
}

/// A one-request HTTP/1.1 client on SwiftNIO: a fresh connection per request (a partition must not leave
/// requests queued on a dead keep-alive connection), with a hard deadline that closes it.
struct HTTPClient: Sendable {
    let group: any EventLoopGroup

    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<HTTPOutcome>
        var status: UInt = 0
        var body: [UInt8] = []
        var done = false
        init(_ p: EventLoopPromise<HTTPOutcome>) { promise = p }

        func finish(_ o: HTTPOutcome) {
            if done { return }
            done = true
            promise.succeed(o)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): status = h.status.code
            case .body(var b): body += b.readBytes(length: b.readableBytes) ?? []
            case .end:
                finish(.response(status: status, body: body))
                context.close(promise: nil)
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            finish(.failed("\(error)"))
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) { finish(.failed("connection closed")) }
    }

    func request(
        _ method: HTTPMethod, host: String, port: Int, path: String, body: [UInt8] = [], timeout: Duration
    ) async -> HTTPOutcome {
        let loop = group.next()
        let promise = loop.makePromise(of: HTTPOutcome.self)
        let collector = Collector(promise)
        let ms = Int64(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        let deadline = loop.scheduleTask(in: .milliseconds(ms)) { collector.finish(.failed("timed out after \(ms) ms")) }
        let connect = ClientBootstrap(group: loop)
            .connectTimeout(.milliseconds(min(ms, 2000)))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(host: host, port: port)
        connect.whenFailure { e in loop.execute { collector.finish(.failed("connect: \(e)")) } }
        connect.whenSuccess { ch in
            var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
            head.headers.add(name: "Host", value: "\(host):\(port)")
            head.headers.add(name: "Connection", value: "close")
            if method == .POST {
                head.headers.add(name: "Content-Type", value: "application/json")
                head.headers.add(name: "Content-Length", value: String(body.count))
            }
            ch.write(HTTPClientRequestPart.head(head), promise: nil)
            if method == .POST { ch.write(HTTPClientRequestPart.body(.byteBuffer(ch.allocator.buffer(bytes: body))), promise: nil) }
            ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            promise.futureResult.whenComplete { _ in ch.close(promise: nil) }
        }
        let out = (try? await promise.futureResult.get()) ?? .failed("no result")
        deadline.cancel()
        return out
    }

    /// GET returning decoded JSON (nil on any failure).
    func json(host: String, port: Int, path: String, timeout: Duration = .seconds(2)) async -> [String: Any]? {
        guard case .response(200, let body) = await request(.GET, host: host, port: port, path: path, timeout: timeout) else { return nil }
        return (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any]
    }
}
