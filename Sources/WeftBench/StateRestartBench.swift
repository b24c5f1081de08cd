import Foundation
import Raft
import Replication
import SegmentStore
import ShardState
import WeftCore

/// `weft bench state-restart`: issue 10's restart target at size, on one replica of one shard. It writes
/// `records` log entries through Raft (a one-voter group, so every layer of the replica runs: proposals,
/// segment appends, apply), each a profile update of one of `users` users (one key and one stream per
/// user, as the messaging layer will have an inbox per user), with a snapshot `tail` entries before the
/// end. Then it reopens the replica and times the restart: the open (log recovery, snapshot load and
/// decode, Raft), then until the replica has applied its whole log again (the `tail` entries after the
/// snapshot), first with the files in the page cache, then after dropping it (when the process may).
/// Prints its figures; asserts nothing.
public struct StateRestartBench {
    public var directory: String
    public var records: Int
    public var users: Int
    public var tail: Int
    public var valueBytes: Int
    /// Only the restarts, of a shard an earlier run wrote.
    public var reopenOnly = false

    public init(directory: String, records: Int, users: Int, tail: Int, valueBytes: Int = 48, reopenOnly: Bool = false) {
        self.reopenOnly = reopenOnly
        self.directory = directory
        self.records = records
        self.users = users
        self.tail = tail
        self.valueBytes = valueBytes
    }

    public struct BenchError: Error, CustomStringConvertible {
        public var description: String
    }

    func open(_ print: @escaping (String) -> Void, storeOpened: (Duration) -> Void = { _ in }) throws -> ShardReplica {
        let disk = PosixDisk()
        let t = ContinuousClock.now
        // The newest snapshot is read and decoded while the log opens (as a node does).
        let prefetch = SnapshotPrefetch.start(shardDirectory: directory, machine: KeyValueMachine.self)
        let store = try SegmentStore(directory: directory, options: StoreOptions(durability: .never), disk: disk)
        storeOpened(ContinuousClock.now - t)
        let replica = try ShardReplica(
            shard: ShardID(0), id: NodeID(1), store: store, hardState: HardStateFile(path: directory + "/raft.state", disk: disk),
            membershipFile: MembershipFile(directory: directory, disk: disk), bootstrap: Membership(voters: [NodeID(1)]),
            config: RaftConfig(id: NodeID(1), seed: 1), machine: KeyValueMachine.self, prefetch: prefetch)
        // One snapshot, `tail` entries before the end (the next would be twice as far).
        replica.snapshotEveryRecords = UInt64(max(1, records - tail))
        replica.log = { print("  replica: \($0)") }
        return replica
    }

    /// Campaigns and drives the replica until it has applied everything in its log.
    func catchUp(_ r: ShardReplica) throws {
        r.campaign()
        var rounds = 0
        repeat {
            _ = try r.process()
            rounds += 1
            if rounds > 10_000_000 { throw BenchError(description: "the replica never applied its log") }
        } while r.raft.role != .leader || r.lastApplied < r.raft.lastIndex
    }

    static func rssMiB() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
        else { return 0 }
        return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
    }

    static func dropPageCache() -> Bool {
        sync()
        guard let f = FileHandle(forWritingAtPath: "/proc/sys/vm/drop_caches") else { return false }
        defer { try? f.close() }
        return (try? f.write(contentsOf: Data("3\n".utf8))) != nil
    }

    public func run(print: @escaping (String) -> Void) throws {
        let disk = PosixDisk()
        let clock = ContinuousClock()
        if reopenOnly {
            var hash: UInt64?
            try restarts(print, clock: clock) { h in
                defer { hash = h }
                return hash.map { $0 == h } ?? true
            }
            return
        }
        if disk.exists(directory), let names = try? disk.list(directory), !names.isEmpty {
            throw BenchError(description: "\(directory) is not empty; give a fresh directory")
        }
        try disk.makeDirectory(directory)
        print("weft bench state-restart: \(records) records, \(users) users (one key and one stream each), snapshot \(tail) records before the end, in \(directory)")
        let r = try open(print)
        try catchUp(r)
        var rng = SystemRandomNumberGenerator()
        let filler = Array("status: on the train, back at 8; avatar v".utf8)
        let t0 = clock.now
        var written = 0
        var batchesInFlight = 0
        while written < records {
            let n = min(1024, records - written)
            var ps: [Proposal] = []
            ps.reserveCapacity(n)
            for k in 0..<n {
                let u = (written + k) % users
                var value = Array("user \(u) #\(written + k) ".utf8)
                while value.count < valueBytes { value += filler.prefix(valueBytes - value.count) }
                value[value.count - 1] = UInt8(ascii: "a") + UInt8(rng.next() % 26)
                ps.append(Proposal(stream: StreamID(UInt64(u) + 1), payload: KeyValueMachine.put(Array("u\(u)".utf8), value)))
            }
            batchesInFlight += 1
            r.propose(ps) { _ in batchesInFlight -= 1 }
            while batchesInFlight > 0 { _ = try r.process() }
            written += n
        }
        let writeSeconds = Double((clock.now - t0).components.attoseconds) / 1e18 + Double((clock.now - t0).components.seconds)
        let last = r.raft.lastIndex
        let hash = r.machine.stateHash
        print("wrote \(written) records in \(String(format: "%.1f", writeSeconds)) s (\(Int(Double(written) / writeSeconds)) records/s through Raft, apply and the store); log ends at \(last); RSS \(Self.rssMiB()) MiB")
        // The snapshot job ran inline; give it the end of the write.
        let snapIndex = r.lastSnapshotIndex
        r.close()
        var logBytes: UInt64 = 0
        for n in try disk.list(directory) where n.hasSuffix(".seg") { logBytes += (try? FileManager.default.attributesOfItem(atPath: directory + "/" + n)[.size] as? UInt64 ?? 0) ?? 0 }
        var snapBytes: UInt64 = 0
        for n in (try? disk.list(directory + "/snapshots")) ?? [] { snapBytes = max(snapBytes, (try? FileManager.default.attributesOfItem(atPath: directory + "/snapshots/" + n)[.size] as? UInt64 ?? 0) ?? 0) }
        print("segments: \(logBytes >> 20) MiB; snapshot at index \(snapIndex): \(snapBytes >> 20) MiB")
        guard snapIndex > 0 else { throw BenchError(description: "no snapshot was written") }

        try restarts(print, clock: clock) { $0 == hash }
    }

    /// A warm and a cold restart; `same` checks the state hash after each.
    func restarts(_ print: @escaping (String) -> Void, clock: ContinuousClock, same: (UInt64) -> Bool) throws {
        var r: ShardReplica
        for cold in [false, true] {
            if cold && !Self.dropPageCache() {
                print("cold restart skipped: cannot write /proc/sys/vm/drop_caches (run as root)")
                break
            }
            let t1 = clock.now
            var storeOpen = Duration.zero
            r = try open(print) { storeOpen = $0 }
            let opened = clock.now - t1
            let restoredAt = r.lastApplied
            try catchUp(r)
            let caught = clock.now - t1
            guard same(r.machine.stateHash) else {
                throw BenchError(description: "after the restart the state differs (applied \(r.lastApplied))")
            }
            print(
                "\(cold ? "cold" : "warm") restart: open \(ms(opened)) ms (segment store \(ms(storeOpen)) ms; state restored at \(restoredAt)), applied all \(r.lastApplied) entries after \(ms(caught)) ms; same state hash; RSS \(Self.rssMiB()) MiB"
            )
            r.close()
        }
    }

    func ms(_ d: Duration) -> String {
        String(format: "%.0f", Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15)
    }
}
