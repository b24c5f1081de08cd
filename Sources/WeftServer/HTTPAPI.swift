import Foundation
import HTTPTypes
import Hummingbird
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import Prometheus
import Raft
import Replication
import ShardState
import WeftCore

/// The client-facing HTTP API of a node (Hummingbird 2). Errors are JSON `{"error":{"code","message"}}`
/// with a 4xx status for bad requests and 503 when no leader can take a write.
public enum HTTPAPI {
    static let bodyBytesMax = 16 << 20

    struct AppendRequest: Decodable {
        struct Item: Decodable {
            var stream: UInt64?
            var type: UInt16?
            /// UTF-8 text payload, or
            var payload: String?
            /// base64 payload.
            var payload_b64: String?
        }
        var records: [Item]
    }

    struct AppendResponse: Encodable {
        var records: [RecordRef]
    }

    /// The body of `GET /api/v1/cluster/status` (also decoded by `weft status`).
    public struct StatusResponse: Codable, Sendable {
        public struct Replica: Codable, Sendable {
            public var node: UInt64
            /// "voter" or "learner", as this node's replica has applied the group.
            public var role: String
            public var match_index: UInt64
        }
        public struct Shard: Codable, Sendable {
            public var id: UInt64
            public var role: String
            public var leader: UInt64?
            public var term: UInt64
            public var commit_index: UInt64
            public var applied_index: UInt64
            public var last_index: UInt64
            /// The first index this replica's log holds, and the shard's retention mark (Docs/state.md).
            public var first_index: UInt64?
            public var retained_through: UInt64?
            public var replicas: [Replica]
            /// This replica's storage repairs (Docs/faults.md).
            public var repair: Repair?
            /// Set when this node's replica of the shard is not running (could not open, or stopped
            /// after a storage failure): why. The node serves its other shards.
            public var failure: String?
            /// What the replica did since it opened (records per fdatasync, messages per record...).
            public var stats: ReplicaStats?
        }
        public struct Repair: Codable, Sendable {
            /// Its log lost entries and is catching up; it does not vote meanwhile.
            public var recovering: Bool
            public var repairs: Int
            public var events: [String]
        }
        public var node: UInt64
        public var nodes: [WeftNode.NodeReach]
        public var shards: [Shard]
    }

    struct ReadRecord: Encodable {
        var index: UInt64
        var term: UInt64
        var stream: UInt64
        var seq: UInt64
        var type: UInt16
        var timestamp_us: Int64
        var payload_b64: String
    }

    struct ReadResponse: Encodable {
        var records: [ReadRecord]
        /// Where the next read continues (the `from` or `cursor` to pass).
        var next: UInt64
        /// The serving replica's commit index when it answered.
        var commit_index: UInt64
        /// The serving replica's applied index: the records are everything the query has up to it.
        var applied_index: UInt64
    }

    struct Reopened: Encodable {
        var shard: UInt64
        var reopened: Bool
    }

    static func shardParameter(_ context: BasicRequestContext, _ node: WeftNode) throws -> ShardID {
        guard let n = context.parameters.get("shard", as: UInt64.self), n < UInt64(node.config.shards) else {
            throw APIError(.notFound, "unknown_shard", "shard must be 0..<\(node.config.shards)")
        }
        return ShardID(n)
    }

    static func queryNumber(_ request: Request, _ name: String, default d: UInt64, min: UInt64, max: UInt64 = UInt64.max) throws -> UInt64 {
        guard let raw = request.uri.queryParameters.get(name) else { return d }
        guard let v = UInt64(raw), v >= min, v <= max else {
            throw APIError(.badRequest, "invalid_\(name)", "\(name) must be an integer in \(min)...\(max)")
        }
        return v
    }

    /// `consistency=linearizable` (default) | `local`, and `min_index=N` (read at least index N).
    static func readConsistency(_ request: Request) throws -> WeftNode.ReadConsistency {
        let minIndex = try queryNumber(request, "min_index", default: 0, min: 0)
        switch request.uri.queryParameters.get("consistency") {
        case nil, "linearizable":
            // A min_index adds nothing a read index does not already give.
            return .linearizable
        case "local":
            return minIndex > 0 ? .atLeast(minIndex) : .local
        case let other?:
            throw APIError(.badRequest, "invalid_consistency", "consistency must be linearizable or local, got \(other.prefix(64))")
        }
    }

    static func readResponse(
        _ node: WeftNode, _ shard: ShardID, _ q: ReadQuery, consistency: WeftNode.ReadConsistency, nextFrom: (Record) -> UInt64, start: UInt64
    ) async throws -> Response {
        // This node's replica, unless it is cut off from its leader: then, except for `local` reads without
        // `min_index`, the other replicas first (`WeftNode.routed`; the answer's indexes are theirs). A node
        // without a replica answers 404, as before.
        let result =
            node.runner(shard) == nil ? .failure(.noReplica) : await node.readAnywhere(shard: shard, q, consistency: ReadPoint(consistency))
        switch result {
        case .success(let r):
            let body = ReadResponse(
                records: r.records.map {
                    ReadRecord(
                        index: $0.index, term: $0.term, stream: $0.stream.rawValue, seq: $0.seq, type: $0.type.rawValue,
                        timestamp_us: $0.timestampMicros, payload_b64: Data($0.payload).base64EncodedString())
                },
                next: r.records.last.map(nextFrom) ?? start, commit_index: r.commit, applied_index: r.applied)
            return try json(body)
        case .failure(.noReplica):
            throw APIError(.notFound, "no_replica", "node \(node.id) holds no replica of shard \(shard)")
        case .failure(.invalid(let why)):
            throw APIError(.badRequest, "invalid_min_index", why)
        case .failure(.read(.compacted(let first))):
            throw APIError(.gone, "compacted", "records before index \(first) were dropped by retention")
        case .failure(.read(.damaged(let why))):
            throw APIError(.serviceUnavailable, "damaged", "this replica's copy is damaged and being repaired; read another replica (\(why))")
        case .failure(.read(.unavailable(let why))):
            throw APIError(.serviceUnavailable, "unavailable", why)
        case .failure(.unavailable(let why)):
            throw APIError(.serviceUnavailable, "not_current", why)
        }
    }

    static func router(node: WeftNode, registry: PrometheusCollectorRegistry, api: MessagingAPI) -> Router<BasicRequestContext> {
        let router = Router()
        router.middlewares.add(JSONErrorMiddleware())
        api.add(to: router)
        router.get(RouterPath(DeliverySocket.path)) { _, _ -> Response in
            throw APIError(.badRequest, "websocket_required", "\(DeliverySocket.path) is a WebSocket: send an upgrade request (Docs/delivery.md)")
        }
        // Operator routes: their own group, so the check is tied to the matched route, not to how a
        // request spells its path.
        let op = router.group().add(middleware: OperatorAuthMiddleware(token: node.config.operatorToken))
        let appended = Counter(label: "weft_append_records_total")
        let appendTimer = Metrics.Timer(label: "weft_append_duration_seconds")

        op.get("/api/v1/cluster/status") { _, _ -> Response in
            let (nodes, shards) = await node.status()
            let body = StatusResponse(
                node: node.id.rawValue, nodes: nodes,
                shards: shards.map { s in
                    StatusResponse.Shard(
                        id: s.shard.rawValue, role: s.role, leader: s.leader?.rawValue, term: s.term, commit_index: s.commitIndex,
                        applied_index: s.appliedIndex, last_index: s.lastIndex, first_index: s.firstIndex, retained_through: s.retainThrough,
                        replicas: s.voters.map { StatusResponse.Replica(node: $0.rawValue, role: "voter", match_index: s.matchIndexes[$0] ?? 0) }
                            + s.learners.map { StatusResponse.Replica(node: $0.rawValue, role: "learner", match_index: s.matchIndexes[$0] ?? 0) },
                        repair: StatusResponse.Repair(recovering: s.recovering, repairs: s.repairs, events: s.repairEvents),
                        failure: s.failure, stats: s.failure == nil ? s.stats : nil)
                })
            return try json(body)
        }

        op.post("/api/v1/shards/{shard}/append") { request, context -> Response in
            guard let shardNo = context.parameters.get("shard", as: UInt64.self), shardNo < UInt64(node.config.shards) else {
                throw APIError(.notFound, "unknown_shard", "shard must be 0..<\(node.config.shards)")
            }
            let buffer = try await request.body.collect(upTo: bodyBytesMax)
            let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
            var proposals: [Proposal] = []
            if request.headers[.contentType] == binaryRecordsType {
                proposals = try decodeBinaryRecords(buffer, timestampMicros: now)
            } else {
                proposals = try decodeJSONRecords(buffer, timestampMicros: now)
            }
            let start = ContinuousClock.now
            if let key = try idempotencyKey(request) {
                // Written once whatever the retries (Docs/state.md, "Idempotent writes").
                do {
                    let written = try await node.appendKeyed(shard: ShardID(shardNo), key: key, proposals)
                    var response = appendResponse(written.refs)
                    if written.replayed { response.headers[replayedHeader] = "true" } else { appended.increment(by: written.refs.count) }
                    return response
                } catch let e as WriteError {
                    throw apiError(e)
                }
            }
            do {
                let refs = try await node.append(shard: ShardID(shardNo), proposals)
                appended.increment(by: refs.count)
                let d = ContinuousClock.now - start
                appendTimer.recordNanoseconds(d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000)
                return appendResponse(refs)
            } catch let e as WriteError {
                throw apiError(e)
            }
        }

        // The append stream is a WebSocket (AppendStream): a plain GET that reached the router was not an
        // upgrade (or its token was wrong: the operator middleware answered 401 first).
        op.get(RouterPath(stringLiteral: AppendStream.path)) { _, _ -> Response in
            throw APIError(.badRequest, "websocket_required", "\(AppendStream.path) is a WebSocket: send an upgrade request (Docs/append-stream.md)")
        }

        // Committed records of the shard, in log order: ?from=INDEX&limit=N. Read on this node's replica
        // (on the others while it is cut off from its leader, unless `consistency=local` without `min_index`).
        op.get("/api/v1/shards/{shard}/log") { request, context -> Response in
            let shard = try shardParameter(context, node)
            let from = try queryNumber(request, "from", default: 1, min: 1)
            let limit = try queryNumber(request, "limit", default: 100, min: 1, max: 10_000)
            return try await readResponse(
                node, shard, .log(from: from, limit: Int(limit)), consistency: try readConsistency(request), nextFrom: { $0.index + 1 }, start: from)
        }

        // Committed records of one stream, by cursor (the next seq to read): ?cursor=SEQ&limit=N.
        op.get("/api/v1/shards/{shard}/streams/{stream}") { request, context -> Response in
            let shard = try shardParameter(context, node)
            guard let stream = context.parameters.get("stream", as: UInt64.self), stream > 0 else {
                throw APIError(.badRequest, "invalid_stream", "stream must be a positive integer")
            }
            let cursor = try queryNumber(request, "cursor", default: 1, min: 1)
            let limit = try queryNumber(request, "limit", default: 100, min: 1, max: 10_000)
            return try await readResponse(
                node, shard, .stream(StreamID(stream), fromSeq: cursor, limit: Int(limit)), consistency: try readConsistency(request),
                nextFrom: { $0.seq + 1 }, start: cursor)
        }

        // A replica of this node that stopped after a storage failure, opened again once the cause is fixed.
        op.post("/api/v1/admin/shards/{shard}/reopen") { _, context -> Response in
            let shard = try shardParameter(context, node)
            do throws(WeftNode.ReopenError) {
                try node.reopenReplica(shard)
            } catch {
                switch error {
                case .running:
                    throw APIError(.conflict, "replica_running", "node \(node.id)'s replica of shard \(shard) is running")
                case .notStopped:
                    throw APIError(.conflict, "not_stopped", "node \(node.id) holds no stopped replica of shard \(shard)")
                case .open(let why):
                    throw APIError(.serviceUnavailable, "open_failed", "node \(node.id)'s replica of shard \(shard) still cannot open: \(why)")
                }
            }
            return try json(Reopened(shard: shard.rawValue, reopened: true))
        }

        // Membership of one shard, one server at a time: {"add_voter": N} | {"add_learner": N} | {"remove_voter": N}.
        op.post("/api/v1/admin/shards/{shard}/membership") { request, context -> Response in
            guard let shardNo = context.parameters.get("shard", as: UInt64.self), shardNo < UInt64(node.config.shards) else {
                throw APIError(.notFound, "unknown_shard", "shard must be 0..<\(node.config.shards)")
            }
            let buffer = try await request.body.collect(upTo: 4096)
            let obj = (try? JSONSerialization.jsonObject(with: Data(buffer.readableBytesView))) as? [String: Any] ?? [:]
            let change: ConfigChange
            if obj.count == 1, let n = obj["add_voter"] as? Int, n > 0 {
                change = .addVoter(NodeID(UInt64(n)))
            } else if obj.count == 1, let n = obj["add_learner"] as? Int, n > 0 {
                change = .addLearner(NodeID(UInt64(n)))
            } else if obj.count == 1, let n = obj["remove_voter"] as? Int, n > 0 {
                change = .removeVoter(NodeID(UInt64(n)))
            } else {
                throw APIError(.badRequest, "invalid_change", "body must be one of {\"add_voter\":N}, {\"add_learner\":N}, {\"remove_voter\":N}")
            }
            let target: NodeID =
                switch change {
                case .addVoter(let n), .addLearner(let n), .removeVoter(let n): n
                }
            guard node.config.node(target) != nil else {
                throw APIError(.badRequest, "unknown_node", "node \(target) is not in \(node.config.configPath)")
            }
            do {
                let index = try await node.changeMembership(shard: ShardID(shardNo), change)
                return try json(["index": index])
            } catch let e as WriteError {
                throw apiError(e)
            }
        }

        let replicaCounters = ReplicaCounters(registry: registry)
        router.get("/metrics") { _, _ -> Response in
            // At most once a second (the route is open to anyone: a scrape storm must not turn into
            // a status request to every replica per scrape).
            if replicaCounters.due() {
                replicaCounters.update(await node.status().shards)
                // Relay lag per (source, destination): what the source leader on this node has not relayed.
                for (source, lanes) in node.relayStatus {
                    for l in lanes {
                        let labels = [("source", String(source.rawValue)), ("destination", String(l.destination.rawValue))]
                        registry.makeGauge(
                            descriptor: MetricNameDescriptor(metricName: "weft_relay_lag", unitName: "records", helpText: "Committed source records not yet relayed"),
                            labels: labels
                        ).set(Double(l.lagRecords))
                        registry.makeGauge(
                            descriptor: MetricNameDescriptor(metricName: "weft_relay_lag", unitName: "seconds", helpText: "Age of the oldest record not yet relayed"),
                            labels: labels
                        ).set(l.lagSeconds)
                    }
                }
            }
            var out: [UInt8] = []
            registry.emit(into: &out)
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: out)))
        }
        return router
    }

    /// A write's failure as the client sees it: `unavailable` (503, nothing written: retry), `invalid`
    /// (400), `change_pending` (409), `outcome_unknown` (504: it may have been written; a blind retry
    /// could write it twice).
    static func apiError(_ e: WriteError) -> APIError {
        switch e {
        case .invalid(let m): APIError(.badRequest, "invalid", m)
        case .unavailable(let m): APIError(.serviceUnavailable, "unavailable", m)
        case .changePending(let m): APIError(.conflict, "change_pending", m)
        case .outcomeUnknown(let m): APIError(.gatewayTimeout, "outcome_unknown", m)
        case .partiallyWritten(let m): APIError(.conflict, "partially_written", m)
        case .refused(let code, let m): APIError(.conflict, code, m)
        }
    }

    /// `Content-Type` of the binary append body: records back to back, each
    /// `u64 stream | u32 length | payload` (little-endian). For high-rate producers: no JSON to parse.
    public static let binaryRecordsType = "application/x-weft-records"

    static func decodeBinaryRecords(_ buffer: ByteBuffer, timestampMicros: Int64) throws -> [Proposal] {
        var b = buffer
        var out: [Proposal] = []
        while b.readableBytes > 0 {
            guard let stream = b.readInteger(endianness: .little, as: UInt64.self),
                let len = b.readInteger(endianness: .little, as: UInt32.self)
            else {
                throw APIError(.badRequest, "invalid_records", "record \(out.count): truncated header at byte \(b.readerIndex)")
            }
            guard Int(len) <= Limits.recordPayloadBytesMax else {
                throw APIError(.contentTooLarge, "payload_too_large", "record \(out.count): \(len) bytes, limit \(Limits.recordPayloadBytesMax)")
            }
            guard let payload = b.readBytes(length: Int(len)) else {
                throw APIError(.badRequest, "invalid_records", "record \(out.count): payload runs past the body at byte \(b.readerIndex)")
            }
            out.append(Proposal(stream: StreamID(stream), type: .data, timestampMicros: timestampMicros, payload: payload))
            guard out.count <= Limits.appendBatchCountMax else {
                throw APIError(.badRequest, "invalid_batch", "at most \(Limits.appendBatchCountMax) records per request")
            }
        }
        guard !out.isEmpty else { throw APIError(.badRequest, "invalid_batch", "no records") }
        return out
    }

    static func decodeJSONRecords(_ buffer: ByteBuffer, timestampMicros now: Int64) throws -> [Proposal] {
        let req: AppendRequest
        do {
            req = try JSONDecoder().decode(AppendRequest.self, from: Data(buffer.readableBytesView))
        } catch {
            throw APIError(.badRequest, "invalid_json", "body must be {\"records\":[{\"stream\":N,\"payload\":\"...\"}]}: \(error)")
        }
        guard !req.records.isEmpty, req.records.count <= Limits.appendBatchCountMax else {
            throw APIError(.badRequest, "invalid_batch", "1...\(Limits.appendBatchCountMax) records per request")
        }
        var proposals: [Proposal] = []
        for (k, item) in req.records.enumerated() {
            let payload: [UInt8]
            if let text = item.payload, item.payload_b64 == nil {
                payload = Array(text.utf8)
            } else if let b64 = item.payload_b64, item.payload == nil, let d = Data(base64Encoded: b64) {
                payload = Array(d)
            } else {
                throw APIError(.badRequest, "invalid_payload", "records[\(k)]: give exactly one of payload (text) or payload_b64")
            }
            guard payload.count <= Limits.recordPayloadBytesMax else {
                throw APIError(.contentTooLarge, "payload_too_large", "records[\(k)]: \(payload.count) bytes, limit \(Limits.recordPayloadBytesMax)")
            }
            let type = RecordType(item.type ?? RecordType.data.rawValue)
            guard type.isClientWritable else {
                throw APIError(
                    .badRequest, "reserved_type",
                    "records[\(k)]: type \(type.rawValue) is reserved for the system; clients may write type 1 (data), 6 (fanout) or \(RecordType.clientRange.lowerBound)...\(RecordType.clientRange.upperBound)")
            }
            proposals.append(Proposal(stream: StreamID(item.stream ?? 0), type: type, timestampMicros: now, payload: payload))
        }
        return proposals
    }

    /// The body of an append's answer, `{"records":[{"index","seq","stream","term"}...]}`: the bytes
    /// `JSONEncoder` with sorted keys writes for `AppendResponse`, written directly (every write answers
    /// with one; the encoder cost more than the rest of the response).
    static func appendResponseBody(_ refs: [RecordRef]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(14 + refs.count * 72)
        out += Array("{\"records\":[".utf8)
        for (k, r) in refs.enumerated() {
            if k > 0 { out.append(UInt8(ascii: ",")) }
            out += Array("{\"index\":\(r.index),\"seq\":\(r.seq),\"stream\":\(r.stream.rawValue),\"term\":\(r.term)}".utf8)
        }
        out += Array("]}".utf8)
        return out
    }

    static let idempotencyKeyHeader = HTTPField.Name("Idempotency-Key")!
    static let replayedHeader = HTTPField.Name("Idempotent-Replayed")!

    /// The request's `Idempotency-Key` (1...64 visible ASCII characters), nil without one.
    static func idempotencyKey(_ request: Request) throws -> [UInt8]? {
        guard let raw = request.headers[idempotencyKeyHeader] else { return nil }
        let bytes = Array(raw.utf8)
        guard (1...RequestWindow.keyBytesMax).contains(bytes.count), bytes.allSatisfy({ $0 >= 0x21 && $0 <= 0x7E }) else {
            throw APIError(.badRequest, "invalid_idempotency_key", "Idempotency-Key must be 1...\(RequestWindow.keyBytesMax) visible ASCII characters")
        }
        return bytes
    }

    static func appendResponse(_ refs: [RecordRef]) -> Response {
        Response(
            status: .ok, headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: appendResponseBody(refs))))
    }

    static func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        let data = try enc.encode(value)
        return Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }
}

/// `{"error":{"code","message"}}`.
struct ErrorBody: Encodable {
    struct Inner: Encodable {
        var code: String
        var message: String
        /// `cursor_expired` only: the cursor to go on from.
        var cursor: String?
    }
    var error: Inner
}

/// An error with its HTTP status and a stable code for clients.
struct APIError: Error {
    var status: HTTPResponse.Status
    var code: String
    var message: String
    /// Seconds, for `Retry-After` (429).
    var retryAfter: Int? = nil
    /// A cursor the client can go on from (`cursor_expired`), as `error.cursor` in the body.
    var cursor: String? = nil
    init(_ status: HTTPResponse.Status, _ code: String, _ message: String) {
        self.status = status
        self.code = code
        self.message = message
    }
}

/// Operator routes (raw shard appends and reads, admin, cluster status) need
/// `Authorization: Bearer <api.operator_token>`; 401 otherwise. `/metrics` stays open (Prometheus).
/// The messaging API (later) authenticates users with their own tokens, never this one.
struct OperatorAuthMiddleware<Context: RequestContext>: RouterMiddleware {
    let token: [UInt8]
    init(token: String) { self.token = Array(token.utf8) }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer ") else {
            throw APIError(.unauthorized, "unauthorized", "this route needs Authorization: Bearer <operator token> ([api] operator_token)")
        }
        guard Self.constantTimeEqual(Array(header.utf8.dropFirst(7)), token) else {
            throw APIError(.unauthorized, "unauthorized", "wrong operator token")
        }
        return try await next(request, context)
    }

    /// Compares without an early exit, so the time taken says nothing about where the first difference is.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var diff: UInt8 = 0
        for k in 0..<b.count {
            diff |= (k < a.count ? a[k] : 0) ^ b[k]
        }
        // The loop runs over the configured token's length only: its time says nothing about the
        // presented one.
        return diff == 0 && a.count == b.count
    }
}

/// Turns every error, including the router's own (404, 405, body too large), into the JSON error shape.
struct JSONErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let e as APIError {
            var r = Self.body(e.status, e.code, e.message, cursor: e.cursor)
            if let s = e.retryAfter { r.headers[.retryAfter] = "\(s)" }
            return r
        } catch let e as NIOTooManyBytesError {
            // A body past the route's limit (`collect(upTo:)`): the client's fault, not the server's.
            return Self.body(.contentTooLarge, "body_too_large", "the request body is larger than \(e.maxBytes.map { "\($0)" } ?? "the limit") bytes")
        } catch let e as HTTPError {
            let code = e.status == .notFound ? "not_found" : e.status == .contentTooLarge ? "body_too_large" : "http_\(e.status.code)"
            return Self.body(e.status, code, e.body ?? e.status.reasonPhrase)
        } catch {
            return Self.body(.internalServerError, "internal", "\(error)")
        }
    }

    static func body(_ status: HTTPResponse.Status, _ code: String, _ message: String, cursor: String? = nil) -> Response {
        let enc = JSONEncoder()
        // Sorted: the same error is the same bytes (a wrong password and an unknown user look alike).
        enc.outputFormatting = [.sortedKeys]
        let data = (try? enc.encode(ErrorBody(error: .init(code: code, message: message, cursor: cursor)))) ?? Data()
        return Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }
}

/// The replicas' counters (`ReplicaStats`) as Prometheus counters, labelled by shard, brought up to date
/// at each scrape (a replica that reopened starts again from zero: the counter goes on from there).
final class ReplicaCounters: Sendable {
    let registry: PrometheusCollectorRegistry
    let last = NIOLockedValueBox<[String: UInt64]>([:])

    /// When the counters were last brought up to date.
    let lastUpdate = NIOLockedValueBox<ContinuousClock.Instant?>(nil)

    init(registry: PrometheusCollectorRegistry) { self.registry = registry }

    /// True (and the clock restarts) when the last update is a second old or more.
    func due() -> Bool {
        lastUpdate.withLockedValue { last in
            let now = ContinuousClock.now
            if let l = last, now - l < .seconds(1) { return false }
            last = now
            return true
        }
    }

    static let fields: [(name: String, help: String, value: @Sendable (ReplicaStats) -> UInt64)] = [
        ("weft_replica_wakeups", "Shard thread wake-ups with inputs", { $0.wakeups }),
        ("weft_replica_inputs", "Inputs handled by the shard thread", { $0.inputs }),
        ("weft_replica_requests", "Client requests proposed as leader", { $0.requests }),
        ("weft_replica_records_proposed", "Records proposed as leader", { $0.recordsProposed }),
        ("weft_replica_store_appends", "Store appends (one pwrite; under every_batch one fdatasync, or a share of the driver lane's flush)", { $0.storeAppends }),
        ("weft_replica_records_appended", "Records appended to the store", { $0.recordsAppended }),
        ("weft_replica_shared_syncs", "Store appends made durable by the lane's shared flush, not an fdatasync of their own", { $0.sharedSyncs }),
        ("weft_replica_messages_sent", "Raft messages sent", { $0.messagesSent }),
        ("weft_replica_appends_sent", "Raft append messages sent", { $0.appendsSent }),
        ("weft_replica_messages_received", "Raft messages received", { $0.messagesReceived }),
        ("weft_replica_records_committed", "Committed records applied", { $0.recordsCommitted }),
    ]

    func update(_ shards: [ShardStatus]) {
        for s in shards where s.failure == nil {
            for f in Self.fields {
                let key = "\(f.name)/\(s.shard.rawValue)"
                let now = f.value(s.stats)
                let delta = last.withLockedValue { l -> UInt64 in
                    let before = l[key] ?? 0
                    l[key] = now
                    return now >= before ? now - before : now
                }
                guard delta > 0 else { continue }
                registry.makeCounter(
                    descriptor: MetricNameDescriptor(metricName: f.name, unitName: "total", helpText: f.help),
                    labels: [("shard", String(s.shard.rawValue))])
                    .increment(by: Int64(clamping: delta))
            }
        }
    }
}
