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
}
