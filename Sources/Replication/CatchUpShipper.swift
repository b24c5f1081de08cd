import Foundation
import Logging
import Raft
import SegmentStore
import WeftCore

/// Ships sealed segment files to followers that need them (catch-up), off the shard threads and with
/// flow control: per transfer at most `windowBytes` are sent and not yet acknowledged by the follower,
/// so what a catch-up puts in the peer queues (ahead of the shards' Raft traffic) is bounded, whatever
/// the size of the log; at most `transfersMax` transfers run at once on a node. Files are read a chunk at
/// a time (sealed segments are immutable), never whole.
///
/// One transfer per (shard, follower): a new one replaces the old. A transfer ends when every chunk is
/// acknowledged (then the `snapshot` message goes, after the files), when the follower acknowledges
/// nothing for `ackTimeoutSeconds` (failed: the leader probes again), or when it is replaced or the
/// shipper stops.
///
/// `@unchecked Sendable`: all state is guarded by `condition`.
public final class CatchUpShipper: @unchecked Sendable {
    public enum Event: Sendable, Equatable {
        /// The follower acknowledged a chunk.
        case progress
        /// Every file acknowledged and the snapshot message sent.
        case done
        case failed(String)
    }

    struct Key: Hashable {
        var shard: ShardID
        var to: NodeID
    }

    /// Guarded by the shipper's condition (`@unchecked Sendable`: read and written only under it).
    final class Transfer: @unchecked Sendable {
        let id: UInt64
        var sent: UInt64 = 0
        /// Bytes acknowledged per file name.
        var acked: [String: UInt64] = [:]
        var ackedTotal: UInt64 = 0
        var cancelled = false
        var failed: String?
        var lastProgress = ContinuousClock.now
        init(id: UInt64) { self.id = id }
    }

    /// Sends one chunk: (shard, to, transfer, file name, offset, file size, bytes).
    let sendChunk: @Sendable (ShardID, NodeID, UInt64, String, UInt64, UInt64, [UInt8]) -> Void
    /// Sends the `snapshot` Raft message once the files are acknowledged.
    let sendMessage: @Sendable (ShardID, Message) -> Void
    /// News for the shard's leader: progress restarts its catch-up timeout; failure makes it probe again.
    let report: @Sendable (ShardID, NodeID, UInt64, Event) -> Void
    let logger: Logger

    public let chunkBytes: Int
    public let windowBytes: UInt64
    public let ackTimeoutSeconds: Double
    public let transfersMax: Int

    let condition = NSCondition()
    var transfers: [Key: Transfer] = [:]
    var stopped = false

    public init(
        chunkBytes: Int = 1 << 20, windowBytes: UInt64 = 4 << 20, ackTimeoutSeconds: Double = 10, transfersMax: Int = 4,
        logger: Logger,
        sendChunk: @escaping @Sendable (ShardID, NodeID, UInt64, String, UInt64, UInt64, [UInt8]) -> Void,
        sendMessage: @escaping @Sendable (ShardID, Message) -> Void,
        report: @escaping @Sendable (ShardID, NodeID, UInt64, Event) -> Void
    ) {
        precondition(chunkBytes > 0 && windowBytes >= UInt64(chunkBytes), "the window holds at least one chunk")
        self.chunkBytes = chunkBytes
        self.windowBytes = windowBytes
        self.ackTimeoutSeconds = ackTimeoutSeconds
        self.transfersMax = transfersMax
        self.logger = logger
        self.sendChunk = sendChunk
        self.sendMessage = sendMessage
        self.report = report
    }

    /// Starts transfer `transfer` of `files` to `to`, replacing any transfer to `to` of this shard. Refused
    /// (reported failed at once) when `transfersMax` others are running.
    public func start(shard: ShardID, to: NodeID, transfer: UInt64, files: [(name: String, path: String)], snapshot: Message) {
        let key = Key(shard: shard, to: to)
        let t = Transfer(id: transfer)
        let refused: String? = condition.withLock {
            if stopped { return "the node is stopping" }
            if let old = transfers[key] {
                old.cancelled = true
                transfers[key] = nil
            }
            guard transfers.count < transfersMax else { return "\(transfersMax) catch-up transfers are already running" }
            transfers[key] = t
            condition.broadcast()
            return nil
        }
        if let refused {
            report(shard, to, transfer, .failed(refused))
            return
        }
        let files = files.map { ($0.name, $0.path) }
        NamedThread.start("cu-\(shard)-\(to)") { [self] in self.run(key, t, files, snapshot) }
    }

    /// The follower `from` acknowledged `received` bytes of `name` in `transfer` (false `ok`: it could not
    /// write them, and the transfer fails).
    public func acknowledge(shard: ShardID, from: NodeID, transfer: UInt64, name: String, received: UInt64, ok: Bool) {
        let key = Key(shard: shard, to: from)
        let progressed: Bool = condition.withLock {
            guard let t = transfers[key], t.id == transfer, !t.cancelled else { return false }
            if !ok {
                t.failed = "node \(from) could not stage \(name)"
                condition.broadcast()
                return false
            }
            let before = t.acked[name] ?? 0
            guard received > before else { return false }
            t.acked[name] = received
            // Never count more than was sent (a confused or hostile peer must not underflow the window).
            t.ackedTotal = min(t.sent, t.ackedTotal + (received - before))
            t.lastProgress = .now
            condition.broadcast()
            return true
        }
        if progressed { report(shard, from, transfer, .progress) }
    }

    /// Cancels the transfers of `shard` (its replica stopped leading: its files may change).
    public func cancel(shard: ShardID) {
        condition.withLock {
            for (key, t) in transfers where key.shard == shard {
                t.cancelled = true
                transfers[key] = nil
            }
            condition.broadcast()
        }
    }

    /// Transfers running now (status, tests).
    public var running: Int { condition.withLock { transfers.count } }

    /// Cancels every transfer; new ones are refused.
    public func stop() {
        condition.withLock {
            stopped = true
            for t in transfers.values { t.cancelled = true }
            transfers = [:]
            condition.broadcast()
        }
    }

    enum Wait { case ready, cancelled, failed(String) }

    /// Waits until `condition` (checked under the lock) holds, the transfer is cancelled or failed, or the
    /// follower has acknowledged nothing for `ackTimeoutSeconds`.
    func wait(_ t: Transfer, until ready: (Transfer) -> Bool) -> Wait {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if t.cancelled { return .cancelled }
            if let why = t.failed { return .failed(why) }
            if ready(t) { return .ready }
            let idle = ContinuousClock.now - t.lastProgress
            let left = ackTimeoutSeconds - (Double(idle.components.seconds) + Double(idle.components.attoseconds) / 1e18)
            if left <= 0 { return .failed("no acknowledgement for \(ackTimeoutSeconds) s") }
            _ = condition.wait(until: Date(timeIntervalSinceNow: left))
        }
    }

    func run(_ key: Key, _ t: Transfer, _ files: [(String, String)], _ snapshot: Message) {
        let outcome = ship(key, t, files, snapshot)
        condition.withLock {
            if transfers[key] === t { transfers[key] = nil }
        }
        switch outcome {
        case .ready: report(key.shard, key.to, t.id, .done)
        case .cancelled: break
        case .failed(let why):
            logger.warning("shard \(key.shard): catch-up \(t.id) to node \(key.to) failed: \(why)")
            report(key.shard, key.to, t.id, .failed(why))
        }
    }

    func ship(_ key: Key, _ t: Transfer, _ files: [(String, String)], _ snapshot: Message) -> Wait {
        let disk = PosixDisk()
        let window = windowBytes
        for (name, path) in files {
            let file: any DiskFile
            let total: UInt64
            do {
                file = try disk.open(path, create: false)
                total = try file.size()
            } catch {
                return .failed("cannot read \(path): \(error)")
            }
            defer { file.close() }
            var offset: UInt64 = 0
            repeat {
                switch wait(t, until: { $0.sent - $0.ackedTotal + UInt64(self.chunkBytes) <= window }) {
                case .ready: break
                case let other: return other
                }
                let bytes: [UInt8]
                do {
                    bytes = try file.read(at: offset, count: Int(min(UInt64(chunkBytes), total - offset)))
                } catch {
                    return .failed("cannot read \(path) at \(offset): \(error)")
                }
                if bytes.isEmpty && total > offset { return .failed("\(path) ended at \(offset), expected \(total) bytes") }
                condition.withLock { t.sent += UInt64(bytes.count) }
                sendChunk(key.shard, key.to, t.id, name, offset, total, bytes)
                offset += UInt64(bytes.count)
            } while offset < total
        }
        switch wait(t, until: { $0.ackedTotal >= $0.sent }) {
        case .ready: break
        case let other: return other
        }
        sendMessage(key.shard, snapshot)
        return .ready
    }
}
