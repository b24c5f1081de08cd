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

/// Which `Authorization` header a request carries: the cluster's operator token (every request of the
/// workload, the nemesis and the checker), none, or a given header value (hostile clients).
enum Authorization: Sendable {
    case operatorToken
    case none
    case header(String)
}

/// A one-request HTTP/1.1 client on SwiftNIO: a fresh connection per request (a partition must not leave
/// requests queued on a dead keep-alive connection), with a hard deadline that closes it.
struct HTTPClient: Sendable {
    let group: any EventLoopGroup
    /// `api.operator_token` of the cluster under test, sent as `Authorization: Bearer <token>`.
    let token: String

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
            // A server that answers before reading a whole (too large) body and closes: its answer counts.
            if status != 0 { finish(.response(status: status, body: body)) }
            finish(.failed("\(error)"))
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) {
            if status != 0 { finish(.response(status: status, body: body)) }
            finish(.failed("connection closed"))
        }
    }

    func request(
        _ method: HTTPMethod, host: String, port: Int, path: String, body: [UInt8] = [], contentType: String = "application/json",
        auth: Authorization = .operatorToken, headers: [(String, String)] = [], timeout: Duration
    ) async -> HTTPOutcome {
        await request(method, host: host, port: port, path: path, chunks: [body], contentType: contentType, auth: auth, headers: headers, timeout: timeout)
    }

    /// The body as `chunks`, written one after the other, each once the previous one has left: a large
    /// body built of a few shared chunks (the hostile client's 17 MiB ones) never sits in memory whole.
    func request(
        _ method: HTTPMethod, host: String, port: Int, path: String, chunks: [[UInt8]], contentType: String = "application/json",
        auth: Authorization = .operatorToken, headers: [(String, String)] = [], timeout: Duration
    ) async -> HTTPOutcome {
        let length = chunks.reduce(0) { $0 + $1.count }
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
        let authorization: String? =
            switch auth {
            case .operatorToken: "Bearer \(token)"
            case .none: nil
            case .header(let h): h
            }
        connect.whenSuccess { ch in
            var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
            head.headers.add(name: "Host", value: "\(host):\(port)")
            head.headers.add(name: "Connection", value: "close")
            if let authorization { head.headers.add(name: "Authorization", value: authorization) }
            for (name, value) in headers { head.headers.add(name: name, value: value) }
            if method == .POST {
                head.headers.add(name: "Content-Type", value: contentType)
                head.headers.add(name: "Content-Length", value: String(length))
            }
            ch.write(HTTPClientRequestPart.head(head), promise: nil)
            let parts = method == .POST ? chunks.filter { !$0.isEmpty } : []
            @Sendable func write(_ k: Int) {
                guard k < parts.count else {
                    ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                    return
                }
                ch.writeAndFlush(HTTPClientRequestPart.body(.byteBuffer(ch.allocator.buffer(bytes: parts[k])))).whenComplete { r in
                    if case .success = r { write(k + 1) }
                }
            }
            write(0)
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
