import Foundation
import HummingbirdWebSocket
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOWebSocket
import Raft
import WeftCore

/// `GET /api/v1/append-stream` upgraded to a WebSocket: many appends in flight on one connection, for
/// producers that send one small record at a time (the operator's raw log ingress; Docs/append-stream.md).
///
/// An HTTP request costs a parse, a route, a response and a round trip per record; here a client keeps
/// many requests outstanding on one socket, one read takes in every frame that arrived, and the answers
/// that completed together go back in one frame. Each request is still its own append with its own
/// answer, through the shard's leader like `POST /api/v1/shards/{shard}/append`.
///
/// Request (binary frame, one per request): `u64 id | u64 shard | records`, the records in the binary
/// append format (`u64 stream | u32 length | payload`, little-endian). Answer (in a binary frame that may
/// hold several): `u64 id | u8 status | body`; status 0 (ok): `u32 n` then n × `u64 index | u64 term |
/// u64 stream | u64 seq`; otherwise `u32 length | UTF-8 message`.
public enum AppendStream {
    public static let path = "/api/v1/append-stream"
    /// Requests one connection may have outstanding; the server stops reading past it (TCP pushes back).
    public static let inflightMax = 4096
    /// The largest frame either side sends (a request's records obey the append limits as well).
    public static let frameBytesMax = 4 << 20

    public enum Status: UInt8, Sendable {
        case ok = 0
        /// Refused (bad input, a limit, a reserved type): nothing was written (HTTP's 400).
        case invalid = 1
        /// No leader took it before the deadline: nothing was written, a retry is safe (503).
        case unavailable = 2
        /// Another membership change is pending (409).
        case changePending = 3
        /// It may or may not have been written (504): a blind retry could write it twice.
        case outcomeUnknown = 4
    }

    /// One answer as it goes on the wire.
    static func encode(id: UInt64, _ result: Result<[RecordRef], WriteError>, into out: inout ByteBuffer) {
        out.writeInteger(id, endianness: .little)
        switch result {
        case .success(let refs):
            out.writeInteger(Status.ok.rawValue)
            out.writeInteger(UInt32(refs.count), endianness: .little)
            for r in refs {
                out.writeInteger(r.index, endianness: .little)
                out.writeInteger(r.term, endianness: .little)
                out.writeInteger(r.stream.rawValue, endianness: .little)
                out.writeInteger(r.seq, endianness: .little)
            }
        case .failure(let e):
            let (status, message): (Status, String) =
                switch e {
                case .invalid(let m): (.invalid, m)
                case .unavailable(let m): (.unavailable, m)
                case .changePending(let m): (.changePending, m)
                case .outcomeUnknown(let m): (.outcomeUnknown, m)
                }
            out.writeInteger(status.rawValue)
            let bytes = Array(message.utf8.prefix(4096))
            out.writeInteger(UInt32(bytes.count), endianness: .little)
            out.writeBytes(bytes)
        }
    }

    /// A request frame: its id, shard and records (records are checked as the HTTP route checks them).
    enum Request {
        case append(id: UInt64, shard: UInt64, [Proposal])
        /// Has an id (answered with `invalid`), but its records are malformed.
        case invalid(id: UInt64, String)
    }

    /// Nil when the frame is too short to carry an id: the connection is closed (protocol error).
    static func decode(_ frame: ByteBuffer, timestampMicros: Int64) -> Request? {
        var b = frame
        guard let id = b.readInteger(endianness: .little, as: UInt64.self),
            let shard = b.readInteger(endianness: .little, as: UInt64.self)
        else { return nil }
        guard b.readableBytes > 0 else { return .invalid(id: id, "no records: a request carries 1...\(Limits.appendBatchCountMax)") }
        do {
            return .append(id: id, shard: shard, try HTTPAPI.decodeBinaryRecords(b, timestampMicros: timestampMicros))
        } catch let e as APIError {
            return .invalid(id: id, e.message)
        } catch {
            return .invalid(id: id, "\(error)")
        }
    }

    /// Answers waiting to be written; the writer takes all of them at once (one frame).
    final class Answers: Sendable {
        let state = NIOLockedValueBox<(buffer: ByteBuffer, waiter: CheckedContinuation<ByteBuffer?, Never>?, finished: Bool)>(
            (ByteBuffer(), nil, false))

        func add(id: UInt64, _ result: Result<[RecordRef], WriteError>) {
            let wake = state.withLockedValue { s -> (CheckedContinuation<ByteBuffer?, Never>, ByteBuffer)? in
                AppendStream.encode(id: id, result, into: &s.buffer)
                guard let w = s.waiter else { return nil }
                s.waiter = nil
                defer { s.buffer = ByteBuffer() }
                return (w, s.buffer)
            }
            if let (w, b) = wake { w.resume(returning: b) }
        }

        /// Everything added since the last call, waiting for some if there is none; nil once finished
        /// and drained.
        func next() async -> ByteBuffer? {
            await withCheckedContinuation { c in
                let ready = state.withLockedValue { s -> ByteBuffer?? in
                    if s.buffer.readableBytes > 0 {
                        defer { s.buffer = ByteBuffer() }
                        return .some(s.buffer)
                    }
                    if s.finished { return .some(nil) }
                    s.waiter = c
                    return nil
                }
                if let ready { c.resume(returning: ready) }
            }
        }

        func finish() {
            let w = state.withLockedValue { s -> CheckedContinuation<ByteBuffer?, Never>? in
                s.finished = true
                defer { s.waiter = nil }
                return s.buffer.readableBytes > 0 ? nil : s.waiter
            }
            w?.resume(returning: nil)
        }
    }

    /// Counts requests in flight; `acquire` waits while `inflightMax` are.
    final class Slots: Sendable {
        let state = NIOLockedValueBox<(used: Int, waiter: CheckedContinuation<Void, Never>?)>((0, nil))
        let max: Int
        init(max: Int) { self.max = max }

        func acquire() async {
            await withCheckedContinuation { c in
                let now = state.withLockedValue { s -> Bool in
                    if s.used < max {
                        s.used += 1
                        return true
                    }
                    s.waiter = c
                    return false
                }
                if now { c.resume() }
            }
        }

        func release() {
            let w = state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                if let w = s.waiter {
                    // The slot passes straight to the waiter.
                    s.waiter = nil
                    return w
                }
                s.used -= 1
                return nil
            }
            w?.resume()
        }

        var inUse: Int { state.withLockedValue { $0.used } }
    }

    /// Serves one connection until the client closes it (then the requests in flight are answered) or
    /// breaks the protocol (a text frame, a frame too short for an id: closed with a reason).
    static func serve(_ inbound: WebSocketInboundStream, _ outbound: WebSocketOutboundWriter, node: WeftNode, logger: Logger) async throws {
        let answers = Answers()
        let slots = Slots(max: inflightMax)
        var closeWith: (WebSocketErrorCode, String)?
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                while let batch = await answers.next() {
                    try await outbound.write(.binary(batch))
                }
            }
            await withDiscardingTaskGroup { requests in
                do {
                    for try await message in inbound.messages(maxSize: frameBytesMax) {
                        guard case .binary(let frame) = message else {
                            closeWith = (.unacceptableData, "text frames are not part of the append stream: send binary request frames (Docs/append-stream.md)")
                            break
                        }
                        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
                        guard let request = decode(frame, timestampMicros: now) else {
                            closeWith = (.protocolError, "a request frame starts with u64 id and u64 shard (\(frame.readableBytes) bytes received)")
                            break
                        }
                        switch request {
                        case .invalid(let id, let why):
                            answers.add(id: id, .failure(.invalid(why)))
                        case .append(let id, let shard, let proposals):
                            guard shard < UInt64(node.config.shards) else {
                                answers.add(id: id, .failure(.invalid("unknown shard \(shard): shards are 0..<\(node.config.shards)")))
                                continue
                            }
                            await slots.acquire()
                            requests.addTask {
                                defer { slots.release() }
                                do {
                                    answers.add(id: id, .success(try await node.append(shard: ShardID(shard), proposals)))
                                } catch let e as WriteError {
                                    answers.add(id: id, .failure(e))
                                } catch {
                                    answers.add(id: id, .failure(.outcomeUnknown("\(error)")))
                                }
                            }
                        }
                    }
                } catch {
                    logger.debug("append stream: \(error)")
                }
            }
            // Every request has been answered (the discarding group waited for them): flush, then close.
            answers.finish()
            try await group.waitForAll()
        }
        if let (code, reason) = closeWith {
            try? await outbound.close(code, reason: reason)
        }
    }
}
