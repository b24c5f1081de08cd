import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@Suite struct TruncateTests {
    /// Where to cut, chosen from the segment files of the store built by seed 500.
    enum Cut: String, CaseIterable {
        case activeBlockBoundary, insideActiveBlock, segmentBase, insideSealedBlockAcrossSegments, sealedBlockBoundary
        case lastRecordOnly, everything, pastTheEnd

        func index(_ segments: [SegmentFile], _ model: LogModel) -> LogIndex? {
            let last = segments[segments.count - 1]
            switch self {
            case .activeBlockBoundary: return last.blocks[last.blocks.count / 2].header.firstIndex
            case .insideActiveBlock:
                guard let b = last.blocks.first(where: { $0.header.count >= 2 })?.header else { return nil }
                return b.firstIndex + 1
            case .segmentBase: return segments[segments.count - 3].base
            case .insideSealedBlockAcrossSegments:
                guard let b = segments[1].blocks.dropFirst().first(where: { $0.header.count >= 3 })?.header else { return nil }
                return b.firstIndex + UInt64(b.count / 2)
            case .sealedBlockBoundary: return segments[1].blocks.count > 2 ? segments[1].blocks[2].header.firstIndex : nil
            case .lastRecordOnly: return model.lastIndex
            case .everything: return 1
            case .pastTheEnd: return model.lastIndex + 1
            }
        }
    }

    @Test(arguments: Cut.allCases)
    func truncateThenContinue(cut where_: Cut) throws {
        let disk = SimulatedDisk()
        var (store, model) = try filledStore(disk: disk, seed: 500, batches: 70)
        let before = try segmentFiles(disk)
        try #require(before.count > 4)
        let cut = try #require(where_.index(before, model), "the fixture has no such position")
        let oldLast = model.lastIndex
        let oldSeqs = model.lastSeqs

        try store.truncateSuffix(from: cut)
        model.truncate(from: cut)
        let context = "\(where_) at \(cut)"
        #expect(store.lastIndex == min(cut - 1, oldLast), "\(context)")
        #expect(store.lastTerm == model.lastTerm, "\(context)")
        for s in 1...50 {
            let id = StreamID(UInt64(s))
            #expect(store.lastSeq(of: id) == model.lastSeq(id), "\(context): stream \(s)")
            #expect(store.lastSeq(of: id) <= oldSeqs[id] ?? 0)
        }
        try checkFully(store, model, context)

        // The files say the same: nothing at or past the cut, no intent left, no index for the active segment.
        let names = try disk.list(simDirectory)
        #expect(!names.contains("truncate.intent"))
        let after = try segmentFiles(disk)
        for f in after { #expect(f.base < max(cut, 2) || (f.base == cut && f.blocks.isEmpty), "\(context): \(f.name) survived") }
        #expect(after.flatMap(\.blocks).last?.header.lastIndex ?? 0 == model.lastIndex, "\(context)")
        // A segment cut inside becomes the active one again: its index file goes.
        if let cutSegment = before.last(where: { $0.base < cut }), let end = cutSegment.blocks.last?.header.lastIndex, end >= cut {
            #expect(!names.contains(cutSegment.indexName), "\(context): the cut segment keeps its index file")
        }
        switch where_ {
        case .segmentBase: #expect(store.segmentCount == before.count - 3)
        case .insideSealedBlockAcrossSegments, .sealedBlockBoundary: #expect(store.segmentCount == 2)
        case .pastTheEnd: #expect(try snapshot(disk).keys.filter { $0 != "tail.fence" }.count == before.count * 2 - 1)
        default: break
        }

        // Appending continues right after the cut, with stream seqs rolled back.
        var rng = SeededRNG(seed: 501)
        for _ in 0..<25 {
            let batch = model.makeBatch(count: rng.int(1...12), rng: &rng)
            try store.append(batch)
            model.apply(batch)
        }
        try checkFully(store, model, "\(context), appended")
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        try checkFully(store, model, "\(context), reopened")
        #expect(store.damage.isEmpty)
    }

    /// Truncating, reopening, truncating again, with nothing appended between.
    @Test func truncationsAgreeWithReopen() throws {
        let disk = SimulatedDisk()
        var (store, model) = try filledStore(disk: disk, seed: 502, batches: 70)
        var rng = SeededRNG(seed: 503)
        for round in 0..<8 {
            let cut = LogIndex(rng.int(max(1, Int(model.lastIndex) - 60)...Int(model.lastIndex)))
            try store.truncateSuffix(from: cut)
            model.truncate(from: cut)
            try checkFully(store, model, "round \(round) cut \(cut)")
            store.close()
            store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            try checkFully(store, model, "round \(round) cut \(cut) reopened")
        }
    }

    @Test func truncateBelowOneIsRejected() throws {
        let (store, model) = try filledStore(disk: SimulatedDisk(), seed: 504, batches: 5)
        #expect(storeError { try store.truncateSuffix(from: 0) } == .outOfRange(requested: 0, first: 1, last: model.lastIndex))
        try checkFully(store, model, "unchanged")
    }

    /// A crash in the middle of a partial-block truncation: the intent is on disk, the segment was cut
    /// (or not, after the crash) and the kept records of the cut block were not rewritten. Reopening
    /// finishes the truncation: the records below the cut are there, none at or past it.
    @Test(arguments: [false, true], [0, 10, 33])
    func interruptedTruncationIsFinished(sealed: Bool, shortWrite: Int) throws {
        for crashSeed: UInt64 in 0..<4 {
            let disk = SimulatedDisk()
            var (store, model) = try filledStore(disk: disk, seed: 505, batches: 70)
            let segments = try segmentFiles(disk)
            let seg = sealed ? segments[1] : segments[segments.count - 1]
            let block = try #require(seg.blocks.dropFirst().first { $0.header.count >= 3 }).header
            let cut = block.firstIndex + 2
            let context = "sealed \(sealed) short write \(shortWrite) crash seed \(crashSeed)"

            // Write 1 is the fence for the shorter log, write 2 the intent; write 3 rewrites the kept
            // records of the cut block.
            disk.failWriteNumber = disk.writes + 3
            disk.shortWritePrefix = shortWrite
            let e = storeError { try store.truncateSuffix(from: cut) }
            #expect(e?.isDisk == true, "\(context): \(String(describing: e))")
            #expect(disk.exists(simDirectory + "/truncate.intent"))
            var next = SeededRNG(seed: 1)
            let refused = model.makeBatch(count: 1, rng: &next)
            #expect(storeError { try store.append(refused) }?.isFailed == true, "\(context): a failed store must refuse appends")
            store.close()
            if crashSeed > 0 {
                var rng = SeededRNG(seed: crashSeed)
                disk.crash(rng: &rng)
            }
            store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            model.truncate(from: cut)
            #expect(store.lastIndex == cut - 1, "\(context)")
            #expect(try store.read(from: block.firstIndex, to: .max) == model.read(from: block.firstIndex, to: .max), "\(context)")
            #expect(!disk.exists(simDirectory + "/truncate.intent"))
            try checkFully(store, model, context)

            var rng = SeededRNG(seed: 506)
            let batch = model.makeBatch(count: 8, rng: &rng)
            try store.append(batch)
            model.apply(batch)
            store.close()
            store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            try checkFully(store, model, "\(context), appended and reopened")
        }
    }

    /// A truncation that fails before its intent is durable never started: after a crash, or when the intent
    /// is incomplete, the log is as it was.
    @Test(arguments: [false, true])
    func truncationFailingAtItsIntent(crash: Bool) throws {
        for fault in ["short intent write", "failed sync"] {
            let disk = SimulatedDisk()
            var (store, model) = try filledStore(disk: disk, seed: 507, batches: 40)
            let last = try #require(try segmentFiles(disk).last)
            let block = try #require(last.blocks.first { $0.header.count >= 2 }).header
            if fault == "failed sync" {
                disk.failSyncs = true
            } else {
                // Write 1 is the fence for the shorter log (synced first), write 2 the intent.
                disk.failWriteNumber = disk.writes + 2
                disk.shortWritePrefix = 20
            }
            #expect(storeError { try store.truncateSuffix(from: block.firstIndex + 1) }?.isDisk == true)
            store.close()
            if crash {
                var rng = SeededRNG(seed: 508)
                disk.crash(rng: &rng)
            } else {
                disk.failSyncs = false
            }
            store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            #expect(!disk.exists(simDirectory + "/truncate.intent"))
            // A failed sync stops the truncation at its first step (the fence's sync), before the intent:
            // the log is as it was, crash or not. A fence left behind naming the shorter log is not a loss.
            try checkFully(store, model, "\(fault), crash \(crash)")
            var rng = SeededRNG(seed: 509)
            let batch = model.makeBatch(count: 3, rng: &rng)
            try store.append(batch)
            model.apply(batch)
            try checkFully(store, model, "\(fault), crash \(crash), appended")
        }
    }
}
