import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

/// Deferred appends made durable together (`SegmentStore.syncTogether`, Docs/storage.md "Shared
/// flushes"): several stores on one device, one fdatasync per round.
@Suite struct SharedFlushTests {
    static let options = StoreOptions(shard: ShardID(1), segmentBytesMax: 16_384, blockBytesTarget: 512, durability: .everyBatch)

    /// The simulated disk's model of a write-back, which the store's correctness rests on: pages handed
    /// to the device are durable only after a flush (another file's sync), and only inside the size the
    /// file last synced at.
    @Test func aWriteBackIsDurableOnlyAfterAFlushAndInsideTheSyncedSize() throws {
        var lostWithoutFlush = 0
        for seed: UInt64 in 0..<20 {
            var rng = SeededRNG(seed: seed)
            for flush in [false, true] {
                let disk = SimulatedDisk()
                try disk.makeDirectory("/d")
                let a = try disk.open("/d/a", create: true)
                let b = try disk.open("/d/b", create: true)
                try disk.syncDirectory("/d")
                try a.write([UInt8](repeating: 0, count: 8), at: 0)
                try a.sync()
                try a.write([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], at: 0)  // 8 bytes over synced zeros, 2 past the synced size
                try a.writeBack(offset: 0, count: 10)
                try b.write([42], at: 0)
                if flush { try b.sync() }
                disk.crash(rng: &rng)
                let after = disk.contents("/d/a") ?? []
                if flush {
                    // The 8 bytes inside the synced size are durable; the 2 past it may or may not be there.
                    #expect(Array(after.prefix(8)) == [1, 2, 3, 4, 5, 6, 7, 8], "seed \(seed)")
                } else if Array(after.prefix(8)) != [1, 2, 3, 4, 5, 6, 7, 8] {
                    lostWithoutFlush += 1
                }
            }
        }
        #expect(lostWithoutFlush > 5, "a write-back without a flush after it must be losable")
    }

    /// Stores whose files were synced at their current length share one fdatasync per round; the others'
    /// data is durable after it (a power loss right after loses nothing).
    @Test func storesShareOneFdatasyncPerRound() throws {
        let disk = SimulatedDisk()
        disk.atomicSectorWrites = true  // the fence's 36-byte write is not torn (Docs/faults.md)
        let dirs = ["/sim/a", "/sim/b", "/sim/c"]
        var stores = try dirs.map { try SegmentStore(directory: $0, options: Self.options, disk: disk) }
        var models = [LogModel](repeating: LogModel(), count: dirs.count)
        var rng = SeededRNG(seed: 11)
        // First appends grow each file (zeros written ahead): each needs, and gets, its own fdatasync.
        for k in stores.indices {
            let batch = models[k].makeBatch(count: 3, rng: &rng)
            try stores[k].append(batch, deferSync: true)
            models[k].apply(batch)
        }
        var syncs = disk.syncs
        SegmentStore.syncTogether(stores)
        #expect(disk.syncs - syncs == 3)
        #expect(disk.writeBacks == 0)
        for s in stores { #expect(try s.finishDeferredSync() == false) }
        // Then, inside the zeros written ahead: one fdatasync and two write-backs per round.
        for round in 0..<10 {
            for k in stores.indices {
                let batch = models[k].makeBatch(count: rng.int(1...4), rng: &rng)
                try stores[k].append(batch, deferSync: true)
                models[k].apply(batch)
                #expect(stores[k].syncPending)
            }
            syncs = disk.syncs
            let writeBacks = disk.writeBacks
            SegmentStore.syncTogether(stores)
            #expect(disk.syncs - syncs == 1, "round \(round)")
            #expect(disk.writeBacks - writeBacks == 2, "round \(round)")
            let shared = try stores.map { try $0.finishDeferredSync() }
            #expect(shared.filter { $0 }.count == 2, "round \(round)")
            #expect(stores.allSatisfy { !$0.syncPending })
        }
        disk.crash(rng: &rng)
        for s in stores { s.close() }
        stores = try dirs.map { try SegmentStore(directory: $0, options: Self.options, disk: disk) }
        for k in stores.indices {
            #expect(try stores[k].read(from: 1, to: .max) == models[k].records)
            #expect(stores[k].damage.isEmpty)
            #expect(stores[k].findings.damagedFrom == nil && !stores[k].findings.tailUnverified)
        }
    }

    /// Seeded rounds of deferred appends on three stores sharing a disk, with failed writes, write-backs
    /// and fdatasyncs, and power losses before the shared flush, between it and the finish, or after.
    /// After each loss: every store's log is a prefix of what was attempted and holds everything
    /// acknowledged (finished without error), with no damage reported.
    @Test(arguments: 0..<60 as Range<UInt64>)
    func acknowledgedAppendsSurvivePowerLoss(seed: UInt64) throws {
        _ = try Self.powerLossWorkload(seed: seed)
    }

    /// The workload shares flushes (write-backs happen) and loses power, over a few seeds.
    @Test func powerLossWorkloadShares() throws {
        var writeBacks = 0
        var crashes = 0
        for seed: UInt64 in 200..<206 {
            let r = try Self.powerLossWorkload(seed: seed)
            writeBacks += r.writeBacks
            crashes += r.crashes
        }
        #expect(writeBacks >= 20)
        #expect(crashes >= 10)
    }

    static func powerLossWorkload(seed: UInt64) throws -> (writeBacks: Int, crashes: Int) {
        var crashes = 0
        var rng = SeededRNG(seed: seed &+ 0x5A5E_D000)
        var options = Self.options
        options.segmentBytesMax = [2_048, 4_096, 16_384][rng.int(0..<3)]
        options.preallocateBytes = [0, 700, 1 << 20][rng.int(0..<3)]
        let disk = SimulatedDisk()
        let dirs = ["/sim/a", "/sim/b", "/sim/c"]
        var stores = try dirs.map { try SegmentStore(directory: $0, options: options, disk: disk) }
        var models = [LogModel](repeating: LogModel(), count: dirs.count)
        var allowed = [[Record]](repeating: [], count: dirs.count)
        var failed = [Bool](repeating: false, count: dirs.count)
        for step in 0..<50 {
            let context = "seed \(seed) step \(step)"
            // Between rounds (before any fault is armed), a store may cut its tail or seal its segment (both
            // reset what a file may share: the next append to it must sync itself).
            for k in stores.indices where !failed[k] && models[k].lastIndex > 0 && rng.oneIn(8) {
                do {
                    if rng.oneIn(2) {
                        let cut = LogIndex(rng.int(max(1, Int(models[k].lastIndex) - 8)...Int(models[k].lastIndex)))
                        try stores[k].truncateSuffix(from: cut)
                        models[k].truncate(from: cut)
                    } else {
                        try stores[k].sealActive()
                    }
                    allowed[k] = models[k].records
                } catch {
                    failed[k] = true
                }
            }
            switch rng.int(0..<10) {
            case 0: disk.failWriteBacks = true
            case 1: disk.failSyncNumber = disk.syncs + rng.int(1...3)
            case 2:
                disk.failWriteNumber = disk.writes + rng.int(1...4)
                disk.shortWritePrefix = rng.int(0...300)
            default: break
            }
            let crashAt = rng.int(0..<8)  // 0: before the flush, 1: before the finish, 2: after it, else none
            var appended: [Int: [Record]] = [:]
            for k in stores.indices where !failed[k] && !rng.oneIn(4) {
                let batch = models[k].makeBatch(count: rng.int(1...6), rng: &rng)
                allowed[k] = models[k].records + batch
                do {
                    try stores[k].append(batch, deferSync: true)
                    appended[k] = batch
                } catch {
                    failed[k] = true
                }
            }
            if crashAt != 0 {
                SegmentStore.syncTogether(stores)
                if crashAt != 1 {
                    for (k, batch) in appended {
                        do {
                            try stores[k].finishDeferredSync()
                            models[k].apply(batch)  // acknowledged
                        } catch {
                            failed[k] = true
                        }
                    }
                }
            }
            disk.failWriteBacks = false
            disk.failSyncNumber = nil
            disk.failWriteNumber = nil
            guard crashAt <= 2 || failed.contains(true) || rng.oneIn(6) else { continue }
            disk.crash(rng: &rng)
            crashes += 1
            for s in stores { s.close() }
            stores = try dirs.map { try SegmentStore(directory: $0, options: options, disk: disk) }
            for k in stores.indices {
                let got = try stores[k].read(from: 1, to: .max)
                #expect(got.count >= models[k].records.count, "\(context) store \(k): acknowledged records lost (\(got.count) of \(models[k].records.count))")
                #expect(Array(allowed[k].prefix(got.count)) == got, "\(context) store \(k): not a prefix of what was attempted")
                #expect(stores[k].damage.isEmpty, "\(context) store \(k): \(stores[k].damage)")
                #expect(stores[k].findings.damagedFrom == nil, "\(context) store \(k): \(stores[k].findings.notes)")
                models[k].reset(to: got, lastIndex: stores[k].lastIndex)
                allowed[k] = got
                failed[k] = false
            }
        }
        return (disk.writeBacks, crashes)
    }

    /// A failed write-back fails its store (the kernel may have marked the pages clean, so a later
    /// fdatasync could succeed without them); a failed shared fdatasync fails its own store, and the
    /// others, whose write-backs did succeed, sync themselves.
    @Test func failuresFailTheirStoreOnly() throws {
        var rng = SeededRNG(seed: 3)
        for failSync in [false, true] {
            let disk = SimulatedDisk()
            let dirs = ["/sim/a", "/sim/b", "/sim/c"]
            let stores = try dirs.map { try SegmentStore(directory: $0, options: Self.options, disk: disk) }
            var models = [LogModel](repeating: LogModel(), count: dirs.count)
            for k in stores.indices {
                let batch = models[k].makeBatch(count: 2, rng: &rng)
                try stores[k].append(batch)
                models[k].apply(batch)
            }
            var acknowledged = models
            for k in stores.indices {
                let batch = models[k].makeBatch(count: 2, rng: &rng)
                try stores[k].append(batch, deferSync: true)
                models[k].apply(batch)
            }
            if failSync { disk.failSyncNumber = disk.syncs + 1 } else { disk.failWriteBacks = true }
            SegmentStore.syncTogether(stores)
            disk.failWriteBacks = false
            let syncs = disk.syncs
            var finished: [Bool] = []
            for (k, s) in stores.enumerated() {
                let ok = (try? s.finishDeferredSync()) != nil
                finished.append(ok)
                if ok { acknowledged[k] = models[k] }
            }
            if failSync {
                // The last store's fdatasync carried the flush and failed: it is failed, the others synced.
                #expect(finished == [true, true, false])
                #expect(disk.syncs - syncs == 2)
            } else {
                // Both write-backs failed: those stores are failed; the third synced itself in the round.
                #expect(finished == [false, false, true])
                #expect(disk.syncs == syncs)
            }
            disk.crash(rng: &rng)
            for k in stores.indices {
                stores[k].close()
                let reopened = try SegmentStore(directory: dirs[k], options: Self.options, disk: disk)
                let got = try reopened.read(from: 1, to: .max)
                #expect(got.count >= acknowledged[k].records.count && Array(models[k].records.prefix(got.count)) == got, "store \(k)")
            }
        }
    }

    /// Stores on a filesystem where flushes cannot be shared (`Disk.flushDomain` nil) each sync
    /// themselves; so do stores on different devices.
    @Test func storesWithoutASharedDeviceSyncThemselves() throws {
        var rng = SeededRNG(seed: 8)
        let disk = SimulatedDisk()
        disk.sharedFlushDevice = nil
        let stores = try ["/sim/a", "/sim/b"].map { try SegmentStore(directory: $0, options: Self.options, disk: disk) }
        var models = [LogModel](repeating: LogModel(), count: 2)
        for round in 0..<3 {
            for k in stores.indices {
                let batch = models[k].makeBatch(count: 2, rng: &rng)
                try stores[k].append(batch, deferSync: true)
                models[k].apply(batch)
            }
            let syncs = disk.syncs
            SegmentStore.syncTogether(stores)
            #expect(disk.syncs == syncs, "round \(round)")
            for s in stores { #expect(try s.finishDeferredSync() == false) }
            #expect(disk.syncs - syncs == 2, "round \(round)")
        }
        #expect(disk.writeBacks == 0)
    }
}
