import Foundation

/// The nodes under test: real `weft serve` processes, each started inside its namespace, with its log
/// appended to `<out>/nodes/n<i>.log` and its data in `<out>/data/<i>`.
final class Cluster: @unchecked Sendable {
    let nodes: [Int]
    let weft: String
    let out: String
    let configPath: String
    let shards: Int
    /// `api.operator_token`, derived from the seed (every request of the harness carries it).
    let token: String
    static let apiPort = 8100
    static let peerPort = 7100
    private let lock = NSLock()
    private var processes: [Int: Process] = [:]
    private var paused: Set<Int> = []
    /// Nodes started under a file-size limit so far (each logs to its own file).
    private var limitedStarts = 0

    /// Replicas per shard (`[cluster] replication`).
    let replication: Int

    /// The nodes a shard is placed on, by the placement Docs/replication.md states (every node listed as a
    /// founder; shard s on the `replication` nodes from founder s mod N on): the harness checks the
    /// cluster's status against it.
    func replicas(of shard: Int) -> [Int] {
        let founders = nodes.sorted()
        return (0..<replication).map { founders[(shard % founders.count + $0) % founders.count] }
    }

    /// The shards node n hosts.
    func hosted(by n: Int) -> [Int] { (0..<shards).filter { replicas(of: $0).contains(n) } }

    /// The operator token of a run: printable ASCII, no spaces, well over 16 bytes, fixed by the seed.
    static func operatorToken(seed: UInt64) -> String {
        var rng = SplitMix(seed: seed ^ 0x70C3_E11A_0B5E_D00D)
        return "wf-" + String(rng.next(), radix: 16) + "-" + String(rng.next(), radix: 16)
    }

    let segmentBytes: Int

    init(nodes: [Int], weft: String, out: String, shards: Int, replication: Int, segmentBytes: Int, token: String) throws {
        self.segmentBytes = segmentBytes
        self.nodes = nodes
        self.replication = replication
        self.token = token
        self.weft = weft
        self.out = out
        self.shards = shards
        configPath = out + "/cluster.toml"
        var toml = """
            # Written by weft-faults.
            [cluster]
            name = "weft-faults"
            shards = \(shards)
            replication = \(replication)
            secret = "weft-faults-test-network"

            [storage]
            data_dir = "data"
            fsync = "every_batch"
            segment_bytes = \(segmentBytes)

            [raft]
            election_timeout_min_ms = 300
            election_timeout_max_ms = 600
            heartbeat_interval_ms = 50

            [api]
            operator_token = "\(token)"

            # The chat workload (Chat.swift): cheap password hashes, and limits it never reaches.
            [messaging]
            bcrypt_cost = 4
            sends_per_minute = 100000
            history_reads_per_minute = 100000
            actions_per_minute = 100000
            syncs_per_minute = 100000
            logins_per_minute = 100000

            """
        for n in nodes {
            toml += """

                [[nodes]]
                id = \(n)
                peer_addr = "\(TestNetwork.address(n)):\(Self.peerPort)"
                api_addr = "\(TestNetwork.address(n)):\(Self.apiPort)"

                """
        }
        try FileManager.default.createDirectory(atPath: out + "/nodes", withIntermediateDirectories: true)
        try toml.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    func dataDirectory(_ n: Int) -> String { out + "/data/\(n)" }

    func isRunning(_ n: Int) -> Bool { lock.withLock { processes[n]?.isRunning ?? false } }
    func isPaused(_ n: Int) -> Bool { lock.withLock { paused.contains(n) } }

    /// `fileSizeLimit`: the node runs under a soft RLIMIT_FSIZE of that many bytes with SIGXFSZ ignored (a
    /// write past it fails with EFBIG, as on a full disk; the hard limit stays unlimited, so
    /// `liftFileSizeLimit` needs no CAP_SYS_RESOURCE, which root in a container may lack). It then logs
    /// to a new `n<i>.full<k>.log` (its usual log is already past the limit; the limit caps this one too).
    func start(_ n: Int, fileSizeLimit: Int? = nil) throws {
        var logPath = out + "/nodes/n\(n).log"
        if fileSizeLimit != nil {
            let k = lock.withLock { () -> Int in
                limitedStarts += 1
                return limitedStarts
            }
            logPath = out + "/nodes/n\(n).full\(k).log"
        }
        if !FileManager.default.fileExists(atPath: logPath) { _ = FileManager.default.createFile(atPath: logPath, contents: nil) }
        guard let log = FileHandle(forWritingAtPath: logPath) else { throw HarnessError("cannot open \(logPath)") }
        log.seekToEndOfFile()
        log.write(Data("\n=== weft-faults: starting node \(n) at \(Date())\(fileSizeLimit.map { " with files limited to \($0) bytes" } ?? "") ===\n".utf8))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        let serve = [weft, "serve", "--config", configPath, "--node", "\(n)"]
        if let limit = fileSizeLimit {
            p.arguments = ["netns", "exec", TestNetwork.namespace(n), "/bin/sh", "-c", "trap '' XFSZ; exec prlimit --fsize=\(limit):unlimited \"$0\" \"$@\""] + serve
        } else {
            p.arguments = ["netns", "exec", TestNetwork.namespace(n)] + serve
        }
        p.standardOutput = log
        p.standardError = log
        try p.run()
        lock.withLock {
            processes[n] = p
            paused.remove(n)
        }
    }

    /// Lifts the file-size limit of node n's process (`prlimit --pid`); true if it did.
    func liftFileSizeLimit(_ n: Int) -> Bool {
        guard let p = lock.withLock({ processes[n] }), p.isRunning else { return false }
        return (try? sh(["prlimit", "--pid", String(p.processIdentifier), "--fsize=unlimited:unlimited"]))?.status == 0
    }

    /// SIGKILL, then wait for the process to be gone.
    func kill(_ n: Int) {
        guard let p = lock.withLock({ processes[n] }), p.isRunning else { return }
        Foundation.kill(p.processIdentifier, SIGKILL)
        // Not `waitUntilExit`, which can hang on Linux when Foundation's monitor never marks the
        // process ended: poll, and count a zombie (`/proc/<pid>/stat` state Z) as gone.
        let deadline = Date().addingTimeInterval(30)
        while p.isRunning && !Self.isZombie(p.processIdentifier) && Date() < deadline { usleep(20_000) }
        lock.withLock { _ = paused.remove(n) }
    }

    func pause(_ n: Int) {
        guard let p = lock.withLock({ processes[n] }), p.isRunning else { return }
        Foundation.kill(p.processIdentifier, SIGSTOP)
        lock.withLock { _ = paused.insert(n) }
    }

    func resume(_ n: Int) {
        guard let p = lock.withLock({ processes[n] }), p.isRunning else { return }
        Foundation.kill(p.processIdentifier, SIGCONT)
        lock.withLock { _ = paused.remove(n) }
    }

    /// SIGTERM (graceful) and wait.
    func stop(_ n: Int) {
        guard let p = lock.withLock({ processes[n] }), p.isRunning else { return }
        Foundation.kill(p.processIdentifier, SIGCONT)
        p.terminate()
        let deadline = Date().addingTimeInterval(10)
        while p.isRunning && Date() < deadline { usleep(50_000) }
        if p.isRunning { kill(n) }
    }

    func stopAll() { for n in nodes { stop(n) } }

    /// Whether `pid` is gone or a zombie: the state after the last `)` of `/proc/<pid>/stat`.
    static func isZombie(_ pid: Int32) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
        guard let close = stat.lastIndex(of: ")") else { return false }
        let state = stat[stat.index(after: close)...].drop { $0 == " " }.first
        return state == "Z" || state == "X"
    }

    func shardDirectory(_ n: Int, shard: Int) -> String { dataDirectory(n) + "/shard-\(shard)" }

    /// Bytes in the staging directory of a catch-up from files (`shard-<s>/catchup/`): above zero while the
    /// leader is shipping files to node `n` (or when a shipping was cut off).
    func stagedBytes(_ n: Int, shard: Int) -> UInt64 {
        let dir = shardDirectory(n, shard: shard) + "/catchup"
        let fm = FileManager.default
        var total: UInt64 = 0
        for name in (try? fm.contentsOfDirectory(atPath: dir)) ?? [] {
            total += ((try? fm.attributesOfItem(atPath: dir + "/" + name))?[.size] as? NSNumber)?.uint64Value ?? 0
        }
        return total
    }

    /// How many lines of node `n`'s log contain `text` (e.g. "caught up from the leader's files").
    func logLines(_ n: Int, containing text: String) -> Int {
        let log = (try? String(contentsOfFile: out + "/nodes/n\(n).log", encoding: .utf8)) ?? ""
        return log.split(separator: "\n").filter { $0.contains(text) }.count
    }

    /// Deletes the first segment file (and its index) of node `n`'s replica of `shard`, which must be
    /// stopped: the replica loses its log from index 1, cuts it to nothing and shares no entry with the
    /// leader, so the leader ships it its sealed segment files. Nil when there is no segment.
    func deleteFirstSegment(_ n: Int, shard: Int) -> String? {
        let dir = shardDirectory(n, shard: shard)
        guard let first = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter({ $0.hasSuffix(".seg") }).sorted().first
        else { return nil }
        let p = dir + "/" + first
        guard (try? FileManager.default.removeItem(atPath: p)) != nil else { return nil }
        try? FileManager.default.removeItem(atPath: p.replacingOccurrences(of: ".seg", with: ".idx"))
        return "deleted \(p) (and its index)"
    }
}

/// Damage done to a stopped node's files (`Docs/reliability.md`).
enum DiskFault: String, CaseIterable, Sendable {
    case truncateActive = "truncate-active-segment"
    case flipSealed = "flip-bits-in-sealed-block"
    case deleteIndex = "delete-index-file"
    case deleteSegment = "delete-segment-file"
    /// The fence gone *and* the active segment truncated: the loss can no longer be seen in the data.
    case deleteFenceAndTruncate = "delete-fence-and-truncate"
}

extension Cluster {
    /// Applies `fault` to a random shard of node `n` (which must be stopped); returns what was done, or
    /// nil when that node has no file the fault needs (no sealed segment yet, say).
    func damage(_ n: Int, _ fault: DiskFault, rng: inout SplitMix) -> String? {
        let fm = FileManager.default
        let shardDirs = ((try? fm.contentsOfDirectory(atPath: dataDirectory(n))) ?? []).filter { $0.hasPrefix("shard-") }.sorted()
        guard !shardDirs.isEmpty else { return nil }
        let dir = dataDirectory(n) + "/" + shardDirs[Int(rng.next() % UInt64(shardDirs.count))]
        let names = ((try? fm.contentsOfDirectory(atPath: dir)) ?? []).sorted()
        let segs = names.filter { $0.hasSuffix(".seg") }
        let idxs = names.filter { $0.hasSuffix(".idx") }
        guard let active = segs.last else { return nil }
        let sealed = segs.dropLast()
        func size(_ p: String) -> UInt64 { ((try? fm.attributesOfItem(atPath: p))?[.size] as? NSNumber)?.uint64Value ?? 0 }
        /// Where the data of an active segment ends: past its last byte that is not zero (the file goes
        /// on with zeros written ahead of the data; cutting those would lose nothing).
        func dataSize(_ p: String) -> UInt64 {
            guard let h = FileHandle(forReadingAtPath: p) else { return 0 }
            defer { try? h.close() }
            var end = size(p)
            while end > 0 {
                let start = end >= 65_536 ? end - 65_536 : 0
                h.seek(toFileOffset: start)
                guard let chunk = try? h.read(upToCount: Int(end - start)), !chunk.isEmpty else { return end }
                if let k = chunk.lastIndex(where: { $0 != 0 }) { return start + UInt64(chunk.distance(from: chunk.startIndex, to: k)) + 1 }
                end = start
            }
            return 0
        }
        switch fault {
        case .truncateActive:
            let p = dir + "/" + active
            let s = dataSize(p)
            guard s > 0 else { return nil }
            let at = rng.next() % s
            guard truncate(p, Int(at)) == 0 else { return nil }
            return "truncated \(p) from \(s) to \(at) bytes"
        case .flipSealed:
            guard !sealed.isEmpty else { return nil }
            let p = dir + "/" + sealed[Int(rng.next() % UInt64(sealed.count))]
            let s = size(p)
            guard s > 80, let h = FileHandle(forUpdatingAtPath: p) else { return nil }
            defer { try? h.close() }
            let at = 64 + rng.next() % (s - 64)
            h.seek(toFileOffset: at)
            guard let old = try? h.read(upToCount: 1), let b = old.first else { return nil }
            let bits = UInt8(truncatingIfNeeded: 1 + rng.next() % 255)
            h.seek(toFileOffset: at)
            h.write(Data([b ^ bits]))
            return "flipped bits 0x\(String(bits, radix: 16)) at \(p):\(at)"
        case .deleteIndex:
            guard !idxs.isEmpty else { return nil }
            let p = dir + "/" + idxs[Int(rng.next() % UInt64(idxs.count))]
            guard (try? fm.removeItem(atPath: p)) != nil else { return nil }
            return "deleted \(p)"
        case .deleteFenceAndTruncate:
            let fence = dir + "/tail.fence"
            let p = dir + "/" + active
            let s = dataSize(p)
            guard fm.fileExists(atPath: fence), s > 0, (try? fm.removeItem(atPath: fence)) != nil else { return nil }
            let at = rng.next() % s
            guard truncate(p, Int(at)) == 0 else { return nil }
            return "deleted \(fence) and truncated \(p) from \(s) to \(at) bytes"
        case .deleteSegment:
            let victim = segs[Int(rng.next() % UInt64(segs.count))]
            let p = dir + "/" + victim
            guard (try? fm.removeItem(atPath: p)) != nil else { return nil }
            try? fm.removeItem(atPath: p.replacingOccurrences(of: ".seg", with: ".idx"))
            return "deleted \(p) (and its index)"
        }
    }
}

/// The schedule's random numbers (seeded: the same seed gives the same choices).
struct SplitMix: Sendable {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func pick<T>(_ xs: [T]) -> T { xs[Int(next() % UInt64(xs.count))] }
    mutating func millis(_ r: ClosedRange<Int>) -> Duration { .milliseconds(r.lowerBound + Int(next() % UInt64(r.count))) }
    mutating func chance(_ p: Double) -> Bool { Double(next() % 1_000_000) / 1_000_000 < p }
}
