import Foundation
import Raft
import SegmentFormat
import SegmentStore
import ShardState
import WeftCore

/// A shard's state at an applied index, as written to a snapshot file (Docs/state.md, "Snapshot file").
public struct StateSnapshot: Equatable, Sendable {
    /// The last log index the state includes, and that entry's term.
    public var index: LogIndex
    public var term: Term
    /// The group as applied at `index`, and the index of the configuration entry it came from.
    public var membership: Membership
    public var membershipIndex: LogIndex
    /// The highest index the shard's applied `retain` records allow replicas to drop (0: none).
    public var retainThrough: LogIndex
    /// Every stream's highest seq applied up to `index`, sorted by stream.
    public var streamSeqs: [(stream: StreamID, seq: StreamSeq)]
    /// The state machine's bytes (`ShardStateMachine.snapshot()`).
    public var state: [UInt8]
    /// The request-key window's bytes (`RequestWindow.encode()`; empty: none).
    public var requests: [UInt8]
    /// The relay marks' bytes (`RelayMarks.encode()`; empty: none).
    public var relays: [UInt8]

    public init(
        index: LogIndex, term: Term, membership: Membership, membershipIndex: LogIndex, streamSeqs: [(stream: StreamID, seq: StreamSeq)],
        state: [UInt8], requests: [UInt8] = [], relays: [UInt8] = [], retainThrough: LogIndex = 0
    ) {
        self.retainThrough = retainThrough
        self.requests = requests
        self.relays = relays
        self.index = index
        self.term = term
        self.membership = membership
        self.membershipIndex = membershipIndex
        self.streamSeqs = streamSeqs
        self.state = state
    }

    public static func == (a: StateSnapshot, b: StateSnapshot) -> Bool {
        a.index == b.index && a.term == b.term && a.membership == b.membership && a.membershipIndex == b.membershipIndex
            && a.retainThrough == b.retainThrough            && a.streamSeqs.elementsEqual(b.streamSeqs, by: { $0.stream == $1.stream && $0.seq == $1.seq }) && a.state == b.state
            && a.requests == b.requests && a.relays == b.relays
    }

    static let magic: [UInt8] = Array("WEFTSNP\0".utf8)
    static let version: UInt32 = 2

    /// The file's bytes; byte table in Docs/state.md.
    public func encode() -> [UInt8] {
        var b = Self.magic
        b.appendLE(Self.version)
        b.appendLE(index)
        b.appendLE(term)
        b.appendLE(membershipIndex)
        b.appendLE(retainThrough)
        let voters = membership.voters.sorted()
        let learners = membership.learners.sorted()
        b.appendLE(UInt32(voters.count))
        for v in voters { b.appendLE(v.rawValue) }
        b.appendLE(UInt32(learners.count))
        for l in learners { b.appendLE(l.rawValue) }
        b.appendLE(UInt64(streamSeqs.count))
        for s in streamSeqs {
            b.appendLE(s.stream.rawValue)
            b.appendLE(s.seq)
        }
        b.appendLE(UInt64(state.count))
        b += state
        b.appendLE(UInt64(requests.count))
        b += requests
        b.appendLE(UInt64(relays.count))
        b += relays
        b.appendLE(CRC32C.checksum(b))
        return b
    }

    /// Why bytes are not a snapshot: a message naming the byte offset.
    public struct DecodeError: Error, CustomStringConvertible, Equatable {
        public var offset: Int
        public var reason: String
        public var description: String { "at byte \(offset): \(reason)" }
    }

    public static func decode(_ b: [UInt8]) throws(DecodeError) -> StateSnapshot {
        guard b.count >= 8 + 4 + 32 + 4 + 4 + 8 + 8 + 8 + 8 + 4 else { throw DecodeError(offset: 0, reason: "\(b.count) bytes is shorter than an empty snapshot") }
        guard Array(b[0..<8]) == magic else { throw DecodeError(offset: 0, reason: "not a snapshot (magic)") }
        let crcAt = b.count - 4
        guard b.loadLE(UInt32.self, at: crcAt) == CRC32C.checksum(b[0..<crcAt]) else {
            throw DecodeError(offset: crcAt, reason: "checksum mismatch: the file is damaged")
        }
        var at = 8
        func u32() throws(DecodeError) -> UInt32 {
            guard at + 4 <= crcAt else { throw DecodeError(offset: at, reason: "runs past the end") }
            defer { at += 4 }
            return b.loadLE(UInt32.self, at: at)
        }
        func u64() throws(DecodeError) -> UInt64 {
            guard at + 8 <= crcAt else { throw DecodeError(offset: at, reason: "runs past the end") }
            defer { at += 8 }
            return b.loadLE(UInt64.self, at: at)
        }
        let version = try u32()
        guard version == Self.version else { throw DecodeError(offset: 8, reason: "version \(version), this build reads \(Self.version)") }
        let index = try u64()
        let term = try u64()
        let membershipIndex = try u64()
        let retainThrough = try u64()
        var voters: Set<NodeID> = []
        let vc = try u32()
        guard Int(vc) * 8 <= crcAt - at else { throw DecodeError(offset: at - 4, reason: "\(vc) voters do not fit") }
        for _ in 0..<vc { voters.insert(NodeID(try u64())) }
        var learners: Set<NodeID> = []
        let lc = try u32()
        guard Int(lc) * 8 <= crcAt - at else { throw DecodeError(offset: at - 4, reason: "\(lc) learners do not fit") }
        for _ in 0..<lc { learners.insert(NodeID(try u64())) }
        let sc = try u64()
        guard sc <= UInt64(crcAt - at) / 16 else { throw DecodeError(offset: at - 8, reason: "\(sc) stream marks do not fit") }
        var seqs: [(stream: StreamID, seq: StreamSeq)] = []
        seqs.reserveCapacity(Int(sc))
        for _ in 0..<sc { seqs.append((StreamID(try u64()), try u64())) }
        let n = try u64()
        guard n <= UInt64(crcAt - at) else { throw DecodeError(offset: at - 8, reason: "state of \(n) bytes, \(crcAt - at) left before the checksum") }
        let state = Array(b[at..<(at + Int(n))])
        at += Int(n)
        let rn = try u64()
        guard rn <= UInt64(crcAt - at) else { throw DecodeError(offset: at - 8, reason: "request window of \(rn) bytes, \(crcAt - at) left before the checksum") }
        let requests = Array(b[at..<(at + Int(rn))])
        at += Int(rn)
        let mn = try u64()
        guard mn == UInt64(crcAt - at) else { throw DecodeError(offset: at - 8, reason: "relay marks of \(mn) bytes, \(crcAt - at) left before the checksum") }
        return StateSnapshot(
            index: index, term: term, membership: Membership(voters: voters, learners: learners), membershipIndex: membershipIndex,
            streamSeqs: seqs, state: state, requests: requests, relays: Array(b[at..<crcAt]), retainThrough: retainThrough)
    }
}

/// The snapshot files of one replica, in `<shard dir>/snapshots/`: `<index, 20 digits>.snap`, written
/// whole to a `.tmp` file, synced, renamed, and the directory synced; the newest `keep` are kept. A file
/// that fails its checks is renamed `.damaged` (kept for inspection, never read again) and the next older
/// one is tried.
public final class SnapshotFiles {
    public let directory: String
    let disk: any Disk
    public var keep = 2

    public init(shardDirectory: String, disk: any Disk) throws {
        directory = shardDirectory + "/snapshots"
        self.disk = disk
        if !disk.exists(directory) {
            try disk.makeDirectory(directory)
            try disk.syncDirectory(shardDirectory)
        }
        // A write that did not finish before a crash.
        for n in try disk.list(directory) where n.hasSuffix(".tmp") { try disk.remove(directory + "/" + n) }
    }

    public static func name(_ index: LogIndex) -> String {
        let digits = String(index)
        return String(repeating: "0", count: max(0, 20 - digits.count)) + digits + ".snap"
    }

    /// The index a snapshot file's name stands for (nil: not a snapshot file's name).
    public static func index(ofName n: String) -> LogIndex? {
        guard n.hasSuffix(".snap"), n.utf8.count == 25, n.utf8.prefix(20).allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return LogIndex(n.prefix(20))
    }

    /// Indexes of the snapshot files, newest first.
    public func indexes() throws -> [LogIndex] {
        try disk.list(directory).compactMap(Self.index(ofName:)).sorted(by: >)
    }

    /// Adds the (checked) snapshot file at `path`, a snapshot at `index` that a catch-up shipped, synced
    /// and renamed in; then the older ones go (a snapshot is the state at a committed index, the same in
    /// every replica's history, so newer ones stay valid).
    public func adopt(_ path: String, index: LogIndex) throws {
        let f = try disk.open(path, create: false)
        try f.sync()
        f.close()
        try disk.rename(path, to: directory + "/" + Self.name(index))
        try disk.syncDirectory(directory)
    }

    /// Removes the snapshots older than `index` that no transfer is shipping (after a catch-up installed
    /// the log the snapshot at `index` came with).
    public func prune(olderThan index: LogIndex) throws {
        try pinLock.withLock {
            for old in try indexes() where old < index && pinned[old] == nil { try disk.remove(directory + "/" + Self.name(old)) }
        }
    }

    /// Snapshots a catch-up is shipping: never removed while pinned (the shipper reads them later).
    let pinLock = NSLock()
    var pinned: [LogIndex: Int] = [:]
    public func pin(_ index: LogIndex) { pinLock.withLock { pinned[index, default: 0] += 1 } }
    public func unpin(_ index: LogIndex) {
        pinLock.withLock {
            if let n = pinned[index] { pinned[index] = n > 1 ? n - 1 : nil }
        }
    }
    /// Indexes whose file was read back whole once (files never change after their rename).
    var verified: Set<LogIndex> = []
    /// Reads and checks the file once per index (a catch-up that ships it again does not read it again).
    public func verify(_ index: LogIndex) throws {
        if pinLock.withLock({ verified.contains(index) }) { return }
        _ = try load(index)
        pinLock.withLock { _ = verified.insert(index) }
    }

    /// Reads and checks one snapshot file.
    public func load(_ index: LogIndex) throws -> StateSnapshot {
        try Self.read(directory + "/" + Self.name(index), index: index, disk: disk)
    }

    /// Reads and checks the snapshot file at `path`, which must hold `index`; errors name the path.
    public static func read(_ path: String, index: LogIndex, disk: any Disk) throws -> StateSnapshot {
        let f = try disk.open(path, create: false)
        defer { f.close() }
        let size = try f.size()
        guard size <= UInt64(Int.max) else { throw StateSnapshot.DecodeError(offset: 0, reason: "\(path) is too large") }
        let bytes = try f.read(at: 0, count: Int(size))
        let s: StateSnapshot
        do {
            s = try StateSnapshot.decode(bytes)
        } catch {
            throw StateSnapshot.DecodeError(offset: error.offset, reason: "\(path): \(error.reason)")
        }
        guard s.index == index else { throw StateSnapshot.DecodeError(offset: 12, reason: "\(path) holds index \(s.index), not \(index)") }
        return s
    }

    /// The newest snapshot that reads back whole and that `usable` accepts; what was wrong with the newer
    /// ones goes to `problems` (damaged files are renamed `.damaged`).
    /// `preloaded`: the newest file's snapshot already read (`SnapshotPrefetch`), used instead of reading
    /// that file again.
    public func newest(preloaded: StateSnapshot? = nil, usable: (StateSnapshot) -> String?, problems: inout [String]) -> StateSnapshot? {
        let all: [LogIndex]
        do {
            all = try indexes()
        } catch {
            problems.append("cannot list \(directory): \(error)")
            return nil
        }
        for index in all {
            do {
                let s = try preloaded.flatMap { $0.index == index ? $0 : nil } ?? load(index)
                if let why = usable(s) {
                    problems.append("snapshot at index \(index) not used: \(why)")
                    continue
                }
                return s
            } catch let e as StateSnapshot.DecodeError {
                // Its bytes are wrong: set it aside for inspection, never read it again.
                problems.append("snapshot at index \(index) is unreadable (\(e)); trying an older one")
                let path = directory + "/" + Self.name(index)
                try? disk.rename(path, to: path + ".damaged")
                try? disk.syncDirectory(directory)
            } catch {
                // An I/O error (too many open files, a failing disk): not proof of damage; leave the file.
                problems.append("snapshot at index \(index) could not be read (\(error)); trying an older one")
            }
        }
        return nil
    }

    /// Writes `bytes` (an encoded snapshot at `index`) durably, then drops the oldest beyond `keep`.
    public func write(index: LogIndex, bytes: [UInt8]) throws {
        let path = directory + "/" + Self.name(index)
        let tmp = path + ".tmp"
        let f = try disk.open(tmp, create: true)
        do {
            try f.truncate(to: 0)
            try f.write(bytes, at: 0)
            try f.sync()
            f.close()
        } catch {
            f.close()
            try? disk.remove(tmp)
            throw error
        }
        try disk.rename(tmp, to: path)
        try disk.syncDirectory(directory)
        try pinLock.withLock {
            for old in try indexes().dropFirst(keep) where pinned[old] == nil { try disk.remove(directory + "/" + Self.name(old)) }
        }
    }
}

/// The newest snapshot of a replica read, checked and decoded on another thread while its log opens
/// (issue 10's restart target: the two are the bulk of a restart and need not wait for each other). Pure
/// work on its own file handle: the replica still decides, once its log is open, whether the snapshot
/// fits the log; if not, or if this found nothing usable, the normal path reads the files again.
/// `@unchecked Sendable`: `result` is written by the loading thread before `finished` is set under
/// `condition`, and read only after.
public final class SnapshotPrefetch: @unchecked Sendable {
    struct Loaded {
        var machineType: any ShardStateMachine.Type
        var snapshot: StateSnapshot
        var machine: any ShardStateMachine
        var seqs: BucketedMap<UInt64, UInt64>
    }
    let condition = NSCondition()
    var finished = false
    var result: Loaded?

    /// Starts reading `<shardDirectory>/snapshots/`'s newest snapshot (the real file system only).
    public static func start(shardDirectory: String, machine: any ShardStateMachine.Type) -> SnapshotPrefetch {
        let p = SnapshotPrefetch()
        DispatchQueue.global(qos: .userInitiated).async {
            let loaded = Self.load(shardDirectory, machine)
            p.condition.lock()
            p.result = loaded
            p.finished = true
            p.condition.broadcast()
            p.condition.unlock()
        }
        return p
    }

    static func load(_ shardDirectory: String, _ type: any ShardStateMachine.Type) -> Loaded? {
        let disk = PosixDisk()
        let dir = shardDirectory + "/snapshots"
        guard let newest = (try? disk.list(dir))?.compactMap(SnapshotFiles.index(ofName:)).max(),
            let s = try? SnapshotFiles.read(dir + "/" + SnapshotFiles.name(newest), index: newest, disk: disk),
            let decoded = try? decode(s, type)
        else { return nil }
        return Loaded(machineType: type, snapshot: s, machine: decoded.0, seqs: decoded.1)
    }

    /// What the replica waits for (once): the decoded newest snapshot, or nil.
    func take() -> Loaded? {
        condition.lock()
        while !finished { condition.wait() }
        let r = result
        result = nil
        condition.unlock()
        return r
    }

    /// The two big parts of a snapshot, decoded at once on two threads (a large state restores in about
    /// half the time): the machine's state, and every stream's seq.
    static func decode(_ s: StateSnapshot, _ type: any ShardStateMachine.Type) throws -> (any ShardStateMachine, BucketedMap<UInt64, UInt64>) {
        let machineSlot = ParallelSlot<Result<any ShardStateMachine, any Error>>()
        let seqsSlot = ParallelSlot<BucketedMap<UInt64, UInt64>>()
        DispatchQueue.concurrentPerform(iterations: 2) { k in
            if k == 0 {
                machineSlot.value = Result { try type.init(snapshot: s.state) }
            } else {
                var map = BucketedMap<UInt64, UInt64>()
                map.reserveCapacity(s.streamSeqs.count)
                for x in s.streamSeqs { map[x.stream.rawValue] = x.seq }
                seqsSlot.value = map
            }
        }
        guard let machine = machineSlot.value else { throw StateDecodeError("the state was not decoded") }
        return (try machine.get(), seqsSlot.value ?? BucketedMap())
    }
}
