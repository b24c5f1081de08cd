import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@Suite struct CrashTests {
    /// Seeded appends and truncations under `.everyBatch`, with short writes, failed syncs and power losses
    /// at random points. After every reopen: each acknowledged batch is there, and the log is a prefix of
    /// what was attempted.
    @Test(arguments: 0..<100 as Range<UInt64>)
    func acknowledgedBatchesSurviveCrashes(seed: UInt64) throws {
        _ = try Self.crashWorkload(seed: seed)
    }

    /// The workload is only worth something if its faults fire and its crashes lose unsynced data.
    @Test func crashWorkloadExercisesFaults() throws {
        var failures = 0
        var crashes = 0
        var writesLost = 0
        for seed: UInt64 in 1000..<1006 {
            let r = try Self.crashWorkload(seed: seed)
            failures += r.failures
            crashes += r.crashes
            writesLost += r.tornRecoveries
        }
        #expect(failures >= 10)
        #expect(crashes >= 10)
        #expect(writesLost >= 1)
    }

    /// Returns how many operations failed, how many crashes happened, and how many reopens found fewer
    /// records than were attempted.
    static func crashWorkload(seed: UInt64) throws -> (failures: Int, crashes: Int, tornRecoveries: Int) {
        var rng = SeededRNG(seed: seed &+ 0xC0FF_EE00)
        var options = StoreOptions(
            shard: ShardID(1), segmentBytesMax: [2_048, 4_096][rng.int(0..<2)], blockBytesTarget: [256, 512][rng.int(0..<2)],
            durability: .everyBatch)
        // Zeros written ahead of the data (torn overwrites of them included) or none.
        options.preallocateBytes = [0, 300, 1 << 20][rng.int(0..<3)]
        let disk = SimulatedDisk()
        var store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        var model = LogModel()
        model.streamCount = 20
        /// The log must be a prefix of this...
        var allowed = [Record]()
        /// ...at least this long (in indexes).
        var required: LogIndex = 0
        var failures = 0
        var crashes = 0
        var torn = 0

        for step in 0..<40 {
            let context = "seed \(seed) step \(step)"
            switch rng.int(0..<12) {
            case 0, 1:
                disk.failWriteNumber = disk.writes + rng.int(1...4)
                disk.shortWritePrefix = rng.int(0...700)
            case 2:
                disk.failSyncs = true
            default:
                break
            }
            var failed = false
            if model.lastIndex > 0 && rng.oneIn(6) {
                let cut = LogIndex(rng.int(max(1, Int(model.lastIndex) - 20)...Int(model.lastIndex)))
                do {
                    try store.truncateSuffix(from: cut)
                    model.truncate(from: cut)
                    allowed = model.records
                    required = model.lastIndex
                } catch let e as StoreError {
                    #expect(e.isDisk, "\(context): truncate threw \(e)")
                    failed = true
                    // Nothing below the cut may be lost; the truncation itself may or may not have happened.
                    required = min(required, cut - 1)
                }
            } else {
                let batch = model.makeBatch(count: rng.int(1...15), rng: &rng)
                do {
                    try store.append(batch)
                    model.apply(batch)
                    allowed = model.records
                    required = model.lastIndex
                } catch let e as StoreError {
                    #expect(e.isDisk, "\(context): append threw \(e)")
                    failed = true
                    allowed = model.records + batch
                }
            }
            disk.failWriteNumber = nil
            disk.failSyncs = false

            if failed {
                failures += 1
                var rng2 = rng
                let next = model.makeBatch(count: 1, rng: &rng2)
                #expect(storeError { try store.append(next) }?.isFailed == true, "\(context): failed store accepted an append")
                #expect(storeError { try store.sync() }?.isFailed == true, "\(context)")
            }
            guard failed || rng.oneIn(5) else { continue }
            if !failed || !rng.oneIn(4) {
                disk.crash(rng: &rng)
                crashes += 1
            }
            store.close()
            do {
                store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
            } catch {
                Issue.record("\(context): reopen failed: \(error)")
                return (failures, crashes, torn)
            }
            let got = try store.read(from: 1, to: .max)
            #expect(store.lastIndex == (got.last?.index ?? 0), "\(context)")
            guard store.lastIndex >= required else {
                Issue.record("\(context): acknowledged records lost: log ends at \(store.lastIndex), acknowledged through \(required)")
                return (failures, crashes, torn)
            }
            guard got.count <= allowed.count, Array(allowed.prefix(got.count)) == got else {
                Issue.record("\(context): log of \(got.count) records is not a prefix of the \(allowed.count) attempted")
                return (failures, crashes, torn)
            }
            if got.count < allowed.count { torn += 1 }
            if !failed { #expect(got == allowed, "\(context): a crash with everything synced lost records") }
            #expect(store.damage.isEmpty, "\(context): \(store.damage)")
            model.reset(to: got, lastIndex: store.lastIndex)
            allowed = got
            required = min(required, store.lastIndex)
            guard check(store, model, context, rng: &rng, queries: 2) else { return (failures, crashes, torn) }
        }
        return (failures, crashes, torn)
    }

    @Test(arguments: ["short write", "failed sync"])
    func failedStoreRefusesWritesUntilReopened(fault: String) throws {
        let disk = SimulatedDisk()
        var (store, model) = try filledStore(disk: disk, seed: 600, batches: 20)
        var rng = SeededRNG(seed: 601)
        let batch = model.makeBatch(count: 5, rng: &rng)
        if fault == "failed sync" {
            disk.failSyncs = true
        } else {
            disk.failWriteNumber = disk.writes + 1
            disk.shortWritePrefix = 17
        }
        #expect(storeError { try store.append(batch) }?.isDisk == true)
        disk.failSyncs = false
        disk.failWriteNumber = nil

        // The disk works again, but the store does not know what reached it: it refuses every write.
        #expect(storeError { try store.append(batch) }?.isFailed == true)
        #expect(storeError { try store.sync() }?.isFailed == true)
        #expect(storeError { try store.truncateSuffix(from: 1) }?.isFailed == true)
        #expect(storeError { _ = try store.dropSegments(through: 1) }?.isFailed == true)
        #expect(store.lastIndex == model.lastIndex)
        // Reads of what was acknowledged still work.
        try checkFully(store, model, "failed store")

        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        let got = try store.read(from: 1, to: .max)
        #expect(got == model.records || got == model.records + batch, "\(got.count) records after reopen")
        model.reset(to: got, lastIndex: store.lastIndex)
        let more = model.makeBatch(count: 5, rng: &rng)
        try store.append(more)
        model.apply(more)
        try checkFully(store, model, "reopened")
    }

    /// A roll that crashes before the new segment's header is durable leaves no trace; one whose header
    /// is torn is removed on reopen.
    @Test func tornSegmentHeaderIsRemoved() throws {
        let disk = SimulatedDisk()
        let (store, model) = try filledStore(disk: disk, seed: 602, batches: 30)
        store.close()
        var files = try snapshot(disk)
        let next = model.lastIndex + 1
        let name = String(repeating: "0", count: 20 - String(next).count) + String(next) + ".seg"
        for length in [0, 7, 30, 63, 64] {
            let header = SegmentHeader(shard: smallOptions.shard, baseIndex: next).encode()
            var bytes = Array(header.prefix(length))
            if length == 64 { bytes[40] ^= 1 }  // whole but damaged
            files[name] = bytes
            let d = try simulatedDisk(with: files)
            let s = try SegmentStore(directory: simDirectory, options: smallOptions, disk: d)
            #expect(!d.exists(simDirectory + "/" + name), "\(length)-byte header")
            try checkFully(s, model, "\(length)-byte header")
            var m = model
            var rng = SeededRNG(seed: 603)
            let batch = m.makeBatch(count: 3, rng: &rng)
            try s.append(batch)
            m.apply(batch)
            try checkFully(s, m, "\(length)-byte header, appended")
        }
    }
}
