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
    /// Request bytes one connection may have taken in and not answered yet (past it: as `inflightMax`).
    public static let requestBytesMax = 32 << 20

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
                case .partiallyWritten(let m): (.invalid, m)
                case .refused(_, let m): (.invalid, m)
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

    /// Answers waiting to be written. The writer takes as many as fit in one frame (`frameBytesMax`);
    /// each carries the weight of its request, released to `Slots` once the answer is written.
    final class Answers: Sendable {
        struct Batch {
            var frame: ByteBuffer
            var count: Int
            var bytes: Int
        }
        struct State {
            var pending: [(answer: ByteBuffer, bytes: Int)] = []
            var head = 0
            var waiter: CheckedContinuation<Batch?, Never>?
            /// Requests started (`expect`) whose answer has not been added yet.
            var outstanding = 0
            /// The reader stopped: once every outstanding answer is added and written, the writer ends.
            var finished = false
            /// The writer failed: answers are dropped, the reader stops.
            var failed = false
        }
        let state = NIOLockedValueBox(State())

        /// A request was started whose answer `add(..., expected: true)` brings later.
        func expect() {
            state.withLockedValue { $0.outstanding += 1 }
        }

        /// `expected`: the answer of a request announced with `expect`.
        func add(id: UInt64, _ result: Result<[RecordRef], WriteError>, requestBytes: Int, expected: Bool = false) {
            var b = ByteBuffer()
            AppendStream.encode(id: id, result, into: &b)
            let wake = state.withLockedValue { s -> (CheckedContinuation<Batch?, Never>, Batch?)? in
                if expected { s.outstanding -= 1 }
                if !s.failed { s.pending.append((b, requestBytes)) }
                guard let w = s.waiter else { return nil }
                if s.head < s.pending.count {
                    s.waiter = nil
                    return (w, Self.take(&s))
                }
                if s.finished && s.outstanding == 0 {
                    s.waiter = nil
                    return (w, nil)
                }
                return nil
            }
            if let (w, batch) = wake { w.resume(returning: batch) }
        }

        /// Answers from the head that fit in one frame (at least one).
        static func take(_ s: inout State) -> Batch {
            var batch = Batch(frame: ByteBuffer(), count: 0, bytes: 0)
            while s.head < s.pending.count {
                let (a, bytes) = s.pending[s.head]
                if batch.count > 0 && batch.frame.readableBytes + a.readableBytes > frameBytesMax { break }
                var a2 = a
                batch.frame.writeBuffer(&a2)
                batch.count += 1
                batch.bytes += bytes
                s.head += 1
            }
            if s.head == s.pending.count {
                s.pending.removeAll(keepingCapacity: true)
                s.head = 0
            } else if s.head > 1024 {
                s.pending.removeFirst(s.head)
                s.head = 0
            }
            return batch
        }

        /// The next frame of answers, waiting for some if there is none; nil once finished and drained.
        func next() async -> Batch? {
            await withCheckedContinuation { c in
                let ready = state.withLockedValue { s -> Batch?? in
                    if s.head < s.pending.count { return .some(Self.take(&s)) }
                    if s.failed || (s.finished && s.outstanding == 0) { return .some(nil) }
                    s.waiter = c
                    return nil
                }
                if let ready { c.resume(returning: ready) }
            }
        }

        /// The reader stopped; the writer ends once every outstanding answer is written.
        func finish() {
            let w = state.withLockedValue { s -> CheckedContinuation<Batch?, Never>? in
                s.finished = true
                guard s.outstanding == 0, s.head == s.pending.count else { return nil }
                defer { s.waiter = nil }
                return s.waiter
            }
            w?.resume(returning: nil)
        }

        func fail() {
            let w = state.withLockedValue { s -> CheckedContinuation<Batch?, Never>? in
                s.failed = true
                s.pending = []
                s.head = 0
                defer { s.waiter = nil }
                return s.waiter
            }
            w?.resume(returning: nil)
        }

        var failed: Bool { state.withLockedValue { $0.failed } }
    }

    /// What one connection has taken in and not yet answered on the wire: requests (at most
    /// `inflightMax`) and their bytes (at most `requestBytesMax`, or one request of any allowed size).
    /// `acquire` waits past either limit; the server then stops reading the socket.
    final class Slots: Sendable {
        struct State {
            var used = 0
            var bytes = 0
            var waiter: (need: Int, c: CheckedContinuation<Bool, Never>)?
            var closed = false
        }
        let state = NIOLockedValueBox(State())
        let max: Int
        let bytesMax: Int
        init(max: Int, bytesMax: Int) {
            self.max = max
            self.bytesMax = bytesMax
        }

        static func fits(_ s: State, _ need: Int, max: Int, bytesMax: Int) -> Bool {
            s.used == 0 || (s.used < max && s.bytes + need <= bytesMax)
        }

        /// Takes a slot now if one is free: true, false once closed, nil if the caller must wait.
        func tryAcquire(bytes need: Int) -> Bool? {
            state.withLockedValue { s -> Bool? in
                if s.closed { return false }
                guard Self.fits(s, need, max: max, bytesMax: bytesMax) else { return nil }
                s.used += 1
                s.bytes += need
                return true
            }
        }

        /// False once closed (the connection's writer failed). Suspends only when no slot is free.
        func acquire(bytes need: Int) async -> Bool {
            if let now = tryAcquire(bytes: need) { return now }
            return await withCheckedContinuation { c in
                let now = state.withLockedValue { s -> Bool? in
                    if s.closed { return false }
                    if Self.fits(s, need, max: max, bytesMax: bytesMax) {
                        s.used += 1
                        s.bytes += need
                        return true
                    }
                    s.waiter = (need, c)
                    return nil
                }
                if let now { c.resume(returning: now) }
            }
        }

        func release(count: Int, bytes: Int) {
            let w = state.withLockedValue { s -> CheckedContinuation<Bool, Never>? in
                s.used -= count
                s.bytes -= bytes
                guard let w = s.waiter, Self.fits(s, w.need, max: max, bytesMax: bytesMax) else { return nil }
                s.waiter = nil
                s.used += 1
                s.bytes += w.need
                return w.c
            }
            w?.resume(returning: true)
        }

        func close() {
            let w = state.withLockedValue { s -> CheckedContinuation<Bool, Never>? in
                s.closed = true
                defer { s.waiter = nil }
                return s.waiter?.c
            }
            w?.resume(returning: false)
        }

        var inUse: Int { state.withLockedValue { $0.used } }
    }

    /// Serves one connection until the client closes it or breaks the protocol (a text frame, a frame
    /// too short for an id: closed with a reason), or its answers cannot be written.
    static func serve(_ inbound: WebSocketInboundStream, _ outbound: WebSocketOutboundWriter, node: WeftNode, logger: Logger) async throws {
        let answers = Answers()
        let slots = Slots(max: inflightMax, bytesMax: requestBytesMax)
        var closeWith: (WebSocketErrorCode, String)?
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                do {
                    while let batch = await answers.next() {
                        try await outbound.write(.binary(batch.frame))
                        slots.release(count: batch.count, bytes: batch.bytes)
                    }
                } catch {
                    // The connection is gone: stop reading, drop what is left.
                    answers.fail()
                    slots.close()
                }
            }
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
                    // Every request holds a slot until its answer is written, refusals included.
                    let weight = frame.readableBytes
                    guard await slots.acquire(bytes: weight), !answers.failed else { break }
                    switch request {
                    case .invalid(let id, let why):
                        answers.add(id: id, .failure(.invalid(why)), requestBytes: weight)
                    case .append(let id, let shard, let proposals):
                        guard shard < UInt64(node.config.shards) else {
                            answers.add(
                                id: id, .failure(.invalid("unknown shard \(shard): shards are 0..<\(node.config.shards)")), requestBytes: weight)
                            continue
                        }
                        // No task per request: the answer comes back through the callback.
                        answers.expect()
                        node.append(shard: ShardID(shard), proposals) { result in
                            answers.add(id: id, result, requestBytes: weight, expected: true)
                        }
                    }
                }
            } catch {
                logger.debug("append stream: \(error)")
            }
            // The writer ends once every request's answer is written (each append ends by its deadline).
            answers.finish()
            try await group.waitForAll()
        }
        if let (code, reason) = closeWith {
            try? await outbound.close(code, reason: reason)
        }
    }
}
