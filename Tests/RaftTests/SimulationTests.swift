import Foundation
import Raft
import Testing
import WeftTesting

/// Deterministic simulation: thousands of seeded schedules with message loss, duplication, reordering,
/// one- and two-way partitions, crashes that lose unsynced writes, leadership transfers and ReadIndex.
/// A failure prints its seed; `RAFT_SIM_SEED=<seed>` replays exactly that schedule.
@Suite struct SimulationTests {
    static var seeds: [UInt64] {
        let env = ProcessInfo.processInfo.environment
        if let one = env["RAFT_SIM_SEED"].flatMap(UInt64.init) { return [one] }
        let count = env["RAFT_SIM_SEEDS"].flatMap(Int.init) ?? 2_000
        return (1...UInt64(count)).map { $0 &* 0x2545_F491_4F6C_DD1D }
    }

    @Test func threeNodeSchedules() throws {
        var totals = RaftSimulation.Stats()
        var acked = 0
        for seed in Self.seeds {
            let sim = RaftSimulation(seed: seed, nodes: 3)
            do {
                try sim.run(steps: 600)
            } catch {
                Issue.record("\(error) — replay with RAFT_SIM_SEED=\(seed)")
                return
            }
            acked += sim.acknowledged.count
            totals.crashes += sim.stats.crashes
            totals.partitions += sim.stats.partitions
            totals.dropped += sim.stats.dropped
            totals.duplicated += sim.stats.duplicated
        }
        print("raft simulation: \(Self.seeds.count) seeds, \(acked) acknowledged writes, \(totals.crashes) crashes, \(totals.partitions) partitions, \(totals.dropped) dropped, \(totals.duplicated) duplicated messages")
        #expect(acked > 0)
        #expect(totals.crashes > 0 && totals.partitions > 0)
    }

    @Test func fiveNodeSchedules() throws {
        for seed in Self.seeds.prefix(max(1, Self.seeds.count / 4)) {
            let sim = RaftSimulation(seed: seed ^ 0xFEED, nodes: 5)
            do {
                try sim.run(steps: 600)
            } catch {
                Issue.record("\(error) — replay with RAFT_SIM_SEED (5 nodes, seed ^ 0xFEED = \(seed ^ 0xFEED))")
                return
            }
        }
    }

    @Test func membershipChangesWithFaults() throws {
        var changes = 0
        for seed in Self.seeds.prefix(max(1, Self.seeds.count / 4)) {
            let sim = RaftSimulation(seed: seed ^ 0xC0DE, nodes: 5, initialVoters: 3)
            sim.membershipChanges = true
            do {
                try sim.run(steps: 800)
            } catch {
                Issue.record("\(error) — replay with RAFT_SIM_SEED (membership, seed ^ 0xC0DE = \(seed ^ 0xC0DE))")
                return
            }
            changes += sim.stats.configChanges
        }
        #expect(changes > 0)
    }

    @Test func sameSeedSameSchedule() throws {
        let a = RaftSimulation(seed: 77, nodes: 3)
        try a.run(steps: 400)
        let b = RaftSimulation(seed: 77, nodes: 3)
        try b.run(steps: 400)
        #expect(a.acknowledged == b.acknowledged)
        #expect(a.now == b.now)
    }

    /// Crashes that also destroy a suffix of one node's log, acknowledged entries included (the disk
    /// faults of issue 4): with the recovery rule (no votes until caught up) nothing acknowledged is lost.
    @Test func diskFaultSchedules() throws {
        var faults = 0
        var acked = 0
        for seed in Self.seeds.prefix(1_000) {
            let sim = RaftSimulation(seed: seed ^ 0xD15C, nodes: 3)
            sim.diskFaults = true
            sim.crashRate = 0.01
            do {
                try sim.run(steps: 800)
            } catch {
                Issue.record("\(error) — replay with RAFT_SIM_SEED (disk faults, seed ^ 0xD15C = \(seed ^ 0xD15C))")
                return
            }
            faults += sim.stats.diskFaults
            acked += sim.acknowledged.count
        }
        print("raft simulation with disk faults: \(faults) logs cut back, \(acked) acknowledged writes, none lost")
        #expect(faults > 100)
    }

    /// The same faults without the rule do lose acknowledged entries (the simulation can see the bug the
    /// rule prevents: a damaged node's vote electing a leader that lacks committed entries).
    @Test func diskFaultsWithoutRecoveryLoseWrites() {
        var failures = 0
        for seed in Self.seeds.prefix(200) {
            let sim = RaftSimulation(seed: seed ^ 0xD15C, nodes: 3)
            sim.diskFaults = true
            sim.recoveryProtection = false
            sim.crashRate = 0.01
            if (try? sim.run(steps: 800)) == nil { failures += 1 }
        }
        print("raft simulation with disk faults and no recovery rule: \(failures) schedules broke an invariant")
        #expect(failures > 0)
    }

    /// Issue 10: a key-value state machine through crashes (some damaging the newest snapshot), restarts
    /// from snapshots, disk faults that cut logs below a snapshot, partitions and catch-up: replicas at the
    /// same applied index have the same state hash, and every restart's state equals what was applied.
    @Test func stateMachineSchedules() throws {
        var taken = 0
        var restored = 0
        var damaged = 0
        var acked = 0
        for seed in Self.seeds.prefix(1_000) {
            let sim = RaftSimulation(seed: seed ^ 0x57A7E, nodes: 3)
            sim.stateMachine = true
            sim.diskFaults = true
            sim.crashRate = 0.01
            do {
                try sim.run(steps: 800)
            } catch {
                Issue.record("\(error) — replay with RAFT_SIM_SEED (state machine, seed ^ 0x57A7E = \(seed ^ 0x57A7E))")
                return
            }
            taken += sim.snapshotStats.taken
            restored += sim.snapshotStats.restored
            damaged += sim.snapshotStats.damaged
            acked += sim.acknowledged.count
        }
        print("raft simulation with a state machine: \(taken) snapshots, \(restored) restarts from one, \(damaged) damaged ones skipped, \(acked) acknowledged writes")
        #expect(restored > 10 && damaged > 0)
    }

    /// Issue 10: the same with retention: nodes drop their log up to their oldest intact snapshot, and
    /// followers that need dropped entries (after a crash, a partition, a disk fault) are caught up with the
    /// leader's log and snapshot; a node whose snapshots cannot reach its log's start empties it and
    /// recovers. Same checks: equal state hashes, no acknowledged write lost or applied twice, dense seqs.
    @Test func retentionAndCatchUpBySnapshotSchedules() throws {
        var dropped = 0
        var installs = 0
        var withSnapshot = 0
        var resets = 0
        for seed in Self.seeds.prefix(600) {
            let sim = RaftSimulation(seed: seed ^ 0x4E7A1, nodes: 3)
            sim.stateMachine = true
            sim.retention = true
            sim.diskFaults = true
            sim.crashRate = 0.01
            do {
                try sim.run(steps: 800)
            } catch {
                Issue.record("\(error) — replay with seed ^ 0x4E7A1 = \(seed ^ 0x4E7A1), retention on")
                return
            }
            dropped += sim.retentionStats.dropped
            installs += sim.retentionStats.installs
            withSnapshot += sim.retentionStats.installsWithSnapshot
            resets += sim.retentionStats.resets
        }
        print("raft simulation with retention: \(dropped) prefixes dropped, \(installs) catch-ups installed (\(withSnapshot) with a snapshot), \(resets) logs emptied for want of a snapshot")
        #expect(dropped > 100 && withSnapshot > 10)
    }

    /// The same schedules with snapshots labelled one index too low: the checks catch it.
    @Test func offByOneSnapshotsAreCaught() {
        var failures = 0
        for seed in Self.seeds.prefix(200) {
            let sim = RaftSimulation(seed: seed ^ 0x57A7E, nodes: 3)
            sim.stateMachine = true
            sim.offByOneSnapshots = true
            sim.crashRate = 0.01
            if (try? sim.run(steps: 800)) == nil { failures += 1 }
        }
        print("raft simulation with off-by-one snapshots: \(failures) schedules caught")
        #expect(failures > 0)
    }
}
