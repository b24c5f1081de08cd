import Foundation
import HummingbirdWSClient
import Logging
import NIOCore

/// The load generator of `weft bench log --stream`: one WebSocket per node on the append stream
/// (`/api/v1/append-stream`, Docs/append-stream.md), requests outstanding on each, latency from a
/// request's send to its answer. Request r writes shard r % shards through connection r % connections,
/// so most requests are forwarded to their leader, as over HTTP.
struct StreamLoad: Sendable {
    /// What one connection saw.
    struct Outcome: Sendable {
        var latencies: [Duration] = []
        var failures = 0
        var firstFailure: String?
    }

    /// Requests outstanding on one connection, and their send times; the sender waits (a continuation,
    /// never a blocked thread) while `limit` are outstanding.
    final class Pending: @unchecked Sendable {
        let lock = NSLock()
        var sent: [UInt64: ContinuousClock.Instant] = [:]
        var waiter: CheckedContinuation<Bool, Never>?
        var closed = false
        let limit: Int
        init(limit: Int) { self.limit = limit }

        /// Waits until fewer than `limit` are outstanding (false: the connection ended).
        func slot() async -> Bool {
            await withCheckedContinuation { c in
                lock.lock()
                if closed {
                    lock.unlock()
                    return c.resume(returning: false)
                }
                if sent.count < limit {
                    lock.unlock()
                    return c.resume(returning: true)
                }
                waiter = c
                lock.unlock()
            }
        }

        func register(_ id: UInt64, at t: ContinuousClock.Instant) { lock.withLock { sent[id] = t } }

        func answered(_ id: UInt64) -> ContinuousClock.Instant? {
            lock.lock()
            let t = sent.removeValue(forKey: id)
            let w = sent.count < limit ? waiter : nil
            if w != nil { waiter = nil }
            lock.unlock()
            w?.resume(returning: true)
            return t
        }

        func close() {
            lock.lock()
            closed = true
            let w = waiter
            waiter = nil
            lock.unlock()
            w?.resume(returning: false)
        }
    }

    let url: String
    let token: String
    let shards: Int
    let requestNumbers: [Int]
    let inflight: Int
    let body: @Sendable (Int) -> [UInt8]

    /// Runs the connection's requests; returns when each has an answer (or the connection ended).
    func run() async throws -> Outcome {
        let pending = Pending(limit: inflight)
        let clock = ContinuousClock()
        let outcome = OutcomeBox()
        let expected = requestNumbers.count
        var logger = Logger(label: "weft-bench-stream")
        logger.logLevel = .error
        try await WebSocketClient.connect(
            url: url,
            configuration: .init(maxFrameSize: 4 << 20, additionalHeaders: [.authorization: "Bearer \(token)"]),
            logger: logger
        ) { inbound, outbound, _ in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for r in requestNumbers {
                        var frame = ByteBuffer()
                        frame.writeInteger(UInt64(r), endianness: .little)
                        frame.writeInteger(UInt64(r % shards), endianness: .little)
                        frame.writeBytes(body(r))
                        guard await pending.slot() else { return }
                        pending.register(UInt64(r), at: clock.now)
                        try await outbound.write(.binary(frame))
                    }
                }
                var done = 0
                for try await message in inbound.messages(maxSize: 4 << 20) {
                    guard case .binary(var b) = message else { continue }
                    while let id = b.readInteger(endianness: .little, as: UInt64.self), let status = b.readInteger(as: UInt8.self),
                        let n = b.readInteger(endianness: .little, as: UInt32.self)
                    {
                        let now = clock.now
                        if status == 0 {
                            b.moveReaderIndex(forwardBy: Int(n) * 32)
                            if let t = pending.answered(id) { outcome.add(latency: now - t) }
                        } else {
                            let why = b.readString(length: Int(n)) ?? "?"
                            _ = pending.answered(id)
                            outcome.fail("request \(id): status \(status): \(why)")
                        }
                        done += 1
                    }
                    if done >= expected { break }
                }
                pending.close()
                group.cancelAll()
                try? await outbound.close(.normalClosure, reason: nil)
            }
        }
        pending.close()
        return outcome.value
    }

    final class OutcomeBox: @unchecked Sendable {
        let lock = NSLock()
        var outcome = Outcome()
        func add(latency: Duration) { lock.withLock { outcome.latencies.append(latency) } }
        func fail(_ why: String) {
            lock.withLock {
                outcome.failures += 1
                if outcome.firstFailure == nil { outcome.firstFailure = why }
            }
        }
        var value: Outcome { lock.withLock { outcome } }
    }
}
