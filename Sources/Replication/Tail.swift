import Foundation
import SegmentStore
import WeftCore

/// A replica's committed records for subscribers in the same process (the delivery tier, relays): every
/// replica has one, followers included, so pushing does not depend on where a shard's leader is.
///
/// ```
///   apply (shard thread) ──append──▶ window: the last `windowCountMax` records (≤ `windowBytesMax`)
///                                        │ poll (subscriber's thread)
///   subscriber at index i ── i in the window? ── yes: copy from the window
///                                        └─ no: read the segment files on its own LogFileReader
/// ```
///
/// Subscribers pull (`TailSubscription.poll`) and are woken when records arrive; a slow subscriber
/// holds nothing back: once it falls out of the window it reads the files (the shard thread never reads
/// for it), and `poll` says so (`fromFiles`), so it can tell it is behind. It resumes from any index it
/// has seen: the tail only ever grows along the committed log, whatever leader or restart produced it.
///
/// `@unchecked Sendable`: every field is guarded by `lock`.
public final class ShardTail: @unchecked Sendable {
    public let shard: ShardID
    let directory: String
    let lock = NSLock()
    /// The window: records `window[start...]`, contiguous, ending at `applied`.
    var window: [Record] = []
    var start = 0
    var bytes = 0
    /// Highest index appended (the replica's applied index as the tail knows it).
    var appliedIndex: LogIndex = 0
    var subscribers: [UInt64: @Sendable () -> Void] = [:]
    /// The state machine's `relayRejected` as of the last apply (relays skip those records).
    var rejected: [LogIndex] = []
    /// Each subscriber's next index, as of its last poll: retention keeps the files from the lowest.
    var positions: [UInt64: LogIndex] = [:]
    var nextID: UInt64 = 1
    var countMax = 8192
    var bytesMax = 8 << 20

    /// The replica's applied index as the tail knows it.
    public var applied: LogIndex { lock.withLock { appliedIndex } }
    /// The window's bounds: at most this many records and payload bytes (at least one record).
    public var windowCountMax: Int {
        get { lock.withLock { countMax } }
        set { lock.withLock { countMax = max(1, newValue) } }
    }
    public var windowBytesMax: Int {
        get { lock.withLock { bytesMax } }
        set { lock.withLock { bytesMax = max(0, newValue) } }
    }
    /// Subscribers at most; past it `subscribe` fails.
    public static let subscribersMax = 4096

    public init(shard: ShardID, directory: String) {
        self.shard = shard
        self.directory = directory
    }

    /// The indexes apply rejected that relays must skip (the machine's whole list, after each apply).
    /// A replica that reset its state replays from the start while the tail keeps serving the records it
    /// has up to `appliedIndex`: their rejections stay known until the replay has them again (the log's
    /// committed prefix is the same records).
    func noteRejected(_ all: [LogIndex]) {
        lock.withLock {
            guard all.count != rejected.count || all.last != rejected.last else { return }
            if all.count >= rejected.count, rejected.isEmpty || all[rejected.count - 1] == rejected.last {
                rejected = all
                return
            }
            rejected = Array(Set(all).union(rejected.lazy.filter { $0 <= self.appliedIndex })).sorted()
        }
    }


    /// Whether apply rejected the record at `index` (relays derive nothing from it).
    public func wasRejected(_ index: LogIndex) -> Bool {
        lock.withLock {
            guard let last = rejected.last, index <= last else { return false }
            var lo = 0
            var hi = rejected.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if rejected[mid] < index { lo = mid + 1 } else { hi = mid }
            }
            return lo < rejected.count && rejected[lo] == index
        }
    }

    /// The shard thread, after apply: records in log order. Records at or below `applied` are skipped (a
    /// replica that cut its log replays it from index 1; the tail has them already).
    func append(_ records: [Record]) {
        lock.lock()
        var added = false
        for r in records where r.index > appliedIndex {
            if r.index != appliedIndex + 1 || (start < window.count && window[window.count - 1].index + 1 != r.index) {
                // A hole (the replica started from a snapshot past the window): start the window afresh.
                window = []
                start = 0
                bytes = 0
            }
            window.append(r)
            bytes += r.payload.count
            appliedIndex = r.index
            added = true
        }
        while window.count - start > countMax || (bytes > bytesMax && window.count - start > 1) {
            bytes -= window[start].payload.count
            start += 1
        }
        if start > 1024 && start * 2 > window.count {
            window.removeFirst(start)
            start = 0
        }
        let wake = added ? Array(subscribers.values) : []
        lock.unlock()
        for w in wake { w() }
    }

    /// The replica restored its state at `index` (a snapshot): the tail starts there if it had less.
    func startAt(_ index: LogIndex) {
        lock.lock()
        if index > appliedIndex {
            appliedIndex = index
            window = []
            start = 0
            bytes = 0
        }
        lock.unlock()
    }

    public struct SubscribeError: Error, CustomStringConvertible {
        public var description: String
    }

    /// A subscription from `index` (the first record it returns); `wake` runs (on the shard's thread,
    /// so it must only signal) when records are appended.
    public func subscribe(from index: LogIndex, wake: @escaping @Sendable () -> Void) throws -> TailSubscription {
        lock.lock()
        defer { lock.unlock() }
        guard subscribers.count < Self.subscribersMax else {
            throw SubscribeError(description: "shard \(shard) has \(Self.subscribersMax) tail subscribers already")
        }
        let id = nextID
        nextID += 1
        subscribers[id] = wake
        positions[id] = max(1, index)
        return TailSubscription(tail: self, id: id, from: max(1, index))
    }

    func unsubscribe(_ id: UInt64) {
        lock.lock()
        subscribers[id] = nil
        positions[id] = nil
        lock.unlock()
    }

    func moved(_ id: UInt64, to next: LogIndex) {
        lock.lock()
        if positions[id] != nil { positions[id] = next }
        lock.unlock()
    }

    /// The lowest index a subscriber will read next (nil: no subscriber): retention never drops it.
    public var lowestPosition: LogIndex? { lock.withLock { positions.values.min() } }

    /// Records from `index` in the window (up to `limit`), and the applied index; nil when `index` is
    /// below the window (the caller reads the files).
    func fromWindow(_ index: LogIndex, limit: Int) -> (records: [Record], applied: LogIndex)? {
        lock.lock()
        defer { lock.unlock() }
        if index > appliedIndex { return ([], appliedIndex) }
        guard start < window.count, index >= window[start].index else { return nil }
        let k = start + Int(index - window[start].index)
        let end = min(window.count, k + limit)
        return (Array(window[k..<end]), appliedIndex)
    }
}

/// One subscriber's position in a `ShardTail`. Used from one thread at a time (the subscriber's).
public final class TailSubscription {
    let tail: ShardTail
    let id: UInt64
    /// The next index `poll` returns.
    public private(set) var next: LogIndex
    var files: LogFileReader?

    init(tail: ShardTail, id: UInt64, from: LogIndex) {
        self.tail = tail
        self.id = id
        next = from
    }

    deinit { tail.unsubscribe(id) }

    public struct Batch {
        public var records: [Record]
        /// Read from the segment files: the subscriber is behind the in-memory window.
        public var fromFiles: Bool
        /// How far the replica has applied (records past `next` still to come: `applied - next + 1`).
        public var applied: LogIndex
    }

    /// A `poll` failure that polling again cannot cure: the files no longer hold the subscriber's position
    /// (a catch-up installed another replica's log, which starts past a snapshot). The first index they
    /// hold; nil for any other failure. A subscriber that can live with the gap `skip`s to it.
    public static func firstHeld(after error: any Error) -> LogIndex? { (error as? LogFileReader.Failure)?.firstIndex }

    /// Moves the subscription forward to `index` (nothing before it will be returned).
    public func skip(to index: LogIndex) {
        guard index > next else { return }
        next = index
        files = nil
        tail.moved(id, to: next)
    }

    /// The next committed records (up to `limit`; none when the subscriber is caught up). Throws when the
    /// files do not hold what the replica applied (damage being repaired): poll again later.
    public func poll(limit: Int = 1000) throws -> Batch {
        let limit = max(1, limit)
        if let (records, applied) = tail.fromWindow(next, limit: limit) {
            files = nil
            if let last = records.last {
                next = last.index + 1
                tail.moved(id, to: next)
            }
            return Batch(records: records, fromFiles: false, applied: applied)
        }
        let applied = tail.applied
        if files == nil || files?.next != next {
            files = LogFileReader(directory: tail.directory, disk: PosixDisk(), from: next)
        }
        guard let reader = files else { return Batch(records: [], fromFiles: true, applied: applied) }
        let records: [Record]
        do {
            records = try reader.read(upTo: applied, limit: limit)
        } catch {
            // The files changed under the reader (a repair cut, a catch-up replaced them): find the
            // position afresh next time.
            files = nil
            throw error
        }
        if let last = records.last {
            next = last.index + 1
            tail.moved(id, to: next)
        }
        return Batch(records: records, fromFiles: true, applied: applied)
    }
}
