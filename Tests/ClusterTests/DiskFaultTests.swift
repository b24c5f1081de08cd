import Foundation
import SegmentFormat
import SegmentStore
import Testing
import WeftCore

/// End to end: real `weft serve` processes whose files are damaged while they are down.
extension Clusters {
    @Suite(.serialized) struct DiskFaultTests {
        /// Writes `count` records through rotating nodes; returns payload -> index of those acknowledged.
        static func write(_ c: ClusterProcess, shard: UInt64, prefix: String, count: Int, via: [Int]? = nil) async -> [String: UInt64] {
            var acked: [String: UInt64] = [:]
            let targets = via ?? c.nodes
            for k in 0..<count {
                let p = "\(prefix)-\(k)"
                if let ref = await c.append(via: targets[k % targets.count], shard: shard, stream: 5, payload: p) { acked[p] = ref.index }
            }
            return acked
        }

        static func segments(_ dir: String) -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".seg") }.sorted()
        }

        static func size(_ path: String) -> Int {
            ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber)?.intValue ?? 0
        }

        /// Where a segment's data ends: the end of its last whole block (an active segment's file goes on
        /// with zeros written ahead of the data, `StoreOptions.preallocateBytes`).
        static func dataEnd(_ path: String) throws -> Int {
            let bytes = [UInt8](FileManager.default.contents(atPath: path) ?? Data())
            var scanner = try SegmentScanner(MemoryByteSource(name: path, bytes: bytes))
            var end = Layout.segmentHeaderBytes
            while let item = try scanner.next() {
                guard case .block(let b) = item else { break }
                end = Int(b.offset) + b.bytes.count
            }
            return end
        }

        /// Every replica holds every acknowledged write once, at the acknowledged index; the logs agree;
        /// weft-dump --verify passes on every shard directory.
        static func checkStopped(_ c: ClusterProcess, shard: UInt64, acked: [String: UInt64]) throws {
            var logs: [Int: [String]] = [:]
            for n in c.nodes {
                let store = try SegmentStore(directory: c.shardDirectory(node: n, shard: shard), options: StoreOptions(shard: ShardID(shard)))
                #expect(store.findings.damagedFrom == nil, "node \(n): \(store.findings.notes)")
                let records = try store.read(from: store.firstIndex, to: store.lastIndex)
                store.close()
                var payloads: [String] = []
                for r in records where r.type == .data {
                    let p = String(decoding: r.payload, as: UTF8.self)
                    payloads.append(p)
                    if let idx = acked[p] { #expect(idx == r.index, "node \(n): \(p) acknowledged at \(idx), stored at \(r.index)") }
                }
                let missing = acked.keys.filter { !payloads.contains($0) }
                #expect(missing.isEmpty, "node \(n) lost \(missing.count) acknowledged writes: \(missing.sorted().prefix(5))")
                #expect(Set(payloads).count == payloads.count, "node \(n) has duplicates")
                logs[n] = payloads
            }
            #expect(Set(c.nodes.map { logs[$0] ?? [] }).count == 1, "replicas diverge")
            let dump = ClusterProcess.bin.deletingLastPathComponent().appendingPathComponent("weft-dump").path
            for n in c.nodes {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: dump)
                p.arguments = ["--verify", c.shardDirectory(node: n, shard: shard)]
                p.standardOutput = FileHandle.nullDevice
                p.standardError = FileHandle.nullDevice
                try p.run()
                try #require(p.waitForExit(seconds: 60, status: true), "weft-dump --verify ended")
                #expect(p.terminationStatus == 0, "weft-dump --verify fails on node \(n)")
            }
        }

        /// Waits until every node reports the same commit index for `shard` and none is recovering.
        static func converge(_ c: ClusterProcess, shard: UInt64, seconds: Double = 30) async -> Bool {
            let end = Date().addingTimeInterval(seconds)
            while Date() < end {
                var commits: [UInt64] = []
                var recovering = false
                for n in c.nodes {
                    guard let sh = await c.status(n)?.shards.first(where: { $0.id == shard }) else { continue }
                    commits.append(sh.commit_index)
                    recovering = recovering || (sh.repair?.recovering ?? true)
                }
                if commits.count == c.nodes.count, Set(commits).count == 1, !recovering { return true }
                try? await Task.sleep(for: .milliseconds(200))
            }
            return false
        }

        /// A follower's active segment is truncated and a sealed block gets flipped bits while it is down:
        /// it comes back recovering, cuts and refetches, reports both repairs, and once the *leader* is
        /// killed it is a healthy voter again — no acknowledged write is lost.
        @Test func damagedFollowerRepairsItselfFromTheOthers() async throws {
            let c = try ClusterProcess(name: "diskfault", nodes: 3, shards: 1, segmentBytes: 4096)
            try c.startAll()
            defer { c.stopAll() }
            let shard: UInt64 = 0
            guard let leader = await c.leader(of: shard) else {
                Issue.record("no leader")
                return
            }
            var acked = await Self.write(c, shard: shard, prefix: "a", count: 250)
            #expect(acked.count > 200)
            let follower = c.nodes.first { $0 != leader }!
            c.kill9(follower)
            let dir = c.shardDirectory(node: follower, shard: shard)
            let segs = Self.segments(dir)
            #expect(segs.count >= 3, "want sealed segments, have \(segs)")
            // Flip a byte in the middle of the first sealed segment, cut the active one in half.
            let sealed = dir + "/" + segs[0]
            let h = try #require(FileHandle(forUpdatingAtPath: sealed))
            let at = UInt64(Self.size(sealed) / 2)
            h.seek(toFileOffset: at)
            let b = try #require(try h.read(upToCount: 1)?.first)
            h.seek(toFileOffset: at)
            h.write(Data([b ^ 0x5A]))
            try h.close()
            let active = dir + "/" + segs[segs.count - 1]
            #expect(truncate(active, off_t(try Self.dataEnd(active) / 2)) == 0)

            try c.start(follower)
            var events: [String] = []
            let end = Date().addingTimeInterval(30)
            while Date() < end {
                if let r = await c.status(follower)?.shards.first?.repair {
                    events = r.events
                    if !r.recovering, events.contains(where: { $0.contains("while running") }), events.last?.hasPrefix("repaired") == true { break }
                }
                try await Task.sleep(for: .milliseconds(200))
            }
            #expect(events.contains { $0.contains("records") && $0.contains("lost") }, "the truncation was not reported: \(events)")
            #expect(events.contains { $0.contains("damage found at index") }, "the flipped block was not found: \(events)")
            #expect(events.last?.hasPrefix("repaired") == true, "no completed repair: \(events)")

            // The repaired follower must now carry the shard with the third node, without the leader.
            c.kill9(leader)
            let more = await Self.write(c, shard: shard, prefix: "b", count: 40, via: c.nodes.filter { $0 != leader })
            #expect(more.count > 20, "the two remaining nodes did not take writes: \(more.count)")
            acked.merge(more) { a, _ in a }
            try c.start(leader)
            #expect(await Self.converge(c, shard: shard), "replicas did not converge")
            c.stopAll()
            try Self.checkStopped(c, shard: shard, acked: acked)
        }

        /// The schedule that lost writes in JetStream: node C falls behind, node F loses its newest records
        /// (which only F and the leader had), the leader dies. F and C together must NOT elect a leader
        /// (it would lack acknowledged writes); once the old leader is back, nothing is lost.
        @Test func damagedNodeAndLaggingNodeDoNotElectALeader() async throws {
            let c = try ClusterProcess(name: "nolostvote", nodes: 3, shards: 1)
            try c.startAll()
            defer { c.stopAll() }
            let shard: UInt64 = 0
            guard let leader = await c.leader(of: shard) else {
                Issue.record("no leader")
                return
            }
            let others = c.nodes.filter { $0 != leader }
            let (lagging, damaged) = (others[0], others[1])
            var acked = await Self.write(c, shard: shard, prefix: "a", count: 30)
            c.kill9(lagging)
            let dir = c.shardDirectory(node: damaged, shard: shard)
            let seg = dir + "/" + (Self.segments(dir).last ?? "")
            let sizeBefore = try Self.dataEnd(seg)
            let later = await Self.write(c, shard: shard, prefix: "b", count: 30, via: [leader, damaged])
            #expect(later.count == 30, "writes with one node down: \(later.count) of 30")
            acked.merge(later) { a, _ in a }
            c.kill9(damaged)
            c.kill9(leader)
            // The damaged node loses exactly what the lagging one never had.
            #expect(truncate(seg, off_t(sizeBefore)) == 0)
            try c.start(lagging)
            try c.start(damaged)
            var elected = false
            let end = Date().addingTimeInterval(6)
            while Date() < end && !elected {
                for n in [lagging, damaged] {
                    if let sh = await c.status(n)?.shards.first, sh.role == "leader" { elected = true }
                }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(!elected, "a leader was elected by a damaged node and a lagging one")
            let damagedState = await c.status(damaged)?.shards.first?.repair
            #expect(damagedState?.recovering == true, "the damaged node is not recovering: \(String(describing: damagedState))")
            try c.start(leader)
            #expect(await Self.converge(c, shard: shard), "replicas did not converge")
            c.stopAll()
            try Self.checkStopped(c, shard: shard, acked: acked)
        }
    }
}
