import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

/// Issue 9: the active segment is written ahead with zeros (`StoreOptions.preallocateBytes`) so an
/// append's fdatasync does not also write the inode. The zeros must never hide data, never be served,
/// never survive a seal, and never look like damage.
@Suite struct PreallocationTests {
    final class Logged: @unchecked Sendable {
        var lines: [String] = []
    }

    func options(_ prealloc: UInt64) -> StoreOptions {
        var o = StoreOptions(shard: ShardID(3), segmentBytesMax: 12 << 10, blockBytesTarget: 512)
        o.preallocateBytes = prealloc
        return o
    }

    /// `batches` batches of `count` records appended to `store` and to `model`.
    func fill(_ store: SegmentStore, _ model: inout LogModel, _ rng: inout SeededRNG, batches: Int, count: Int) throws {
        for _ in 0..<batches {
            let batch = model.makeBatch(count: count, rng: &rng)
            try store.append(batch)
            model.apply(batch)
        }
    }

    /// Writing the zeros ahead fails after writing part of them (a short write): the append still
    /// succeeds, and the seal cuts the file back to the data, so the sealed segment matches its index.
    @Test func zerosAheadCutShortAreStillCutAtSeal() throws {
        let disk = SimulatedDisk()
        var rng = SeededRNG(seed: 21)
        let store = try SegmentStore(directory: simDirectory, options: options(4096), disk: disk)
        var model = LogModel()
        try fill(store, &model, &rng, batches: 1, count: 3)
        // The next append grows past the zeros: its data write succeeds, the zeros' write is cut short.
        var batch = model.makeBatch(count: 1, rng: &rng)
        batch[0].payload = rng.bytes(5000)  // incompressible
        disk.failWriteNumber = disk.writes + 2
        disk.shortWritePrefix = 100
        try store.append(batch)
        model.apply(batch)
        disk.failWriteNumber = nil
        try store.sealActive()
        store.close()
        let reopened = try SegmentStore(directory: simDirectory, options: options(4096), disk: disk)
        #expect(reopened.damage.isEmpty, "\(reopened.damage)")
        #expect(try reopened.read(from: 1, to: .max) == model.records)
    }

    @Test func zerosAheadAreCutAtSealAndAtOpenWithoutAWarning() throws {
        let disk = SimulatedDisk()
        var rng = SeededRNG(seed: 91)
        let logged = Logged()
        var store = try SegmentStore(directory: simDirectory, options: options(4 << 10), disk: disk) { logged.lines.append($0) }
        var model = LogModel()
        try fill(store, &model, &rng, batches: 5, count: 4)
        let active = try #require(try disk.list(simDirectory).filter { $0.hasSuffix(".seg") }.sorted().last)
        let bytes = try #require(disk.contents(simDirectory + "/" + active))
        let files = try segmentFiles(disk)
        let dataEnd = try #require(files.last.flatMap { f in f.blocks.last.map { Int($0.offset) + $0.bytes.count } })
        // Written ahead: the file is longer than its data, and all of the rest is zeros.
        #expect(bytes.count > dataEnd)
        #expect(bytes[dataEnd...].allSatisfy { $0 == 0 })

        // A power loss right now: the synced zeros are there at reopen; they are cut, nothing is lost,
        // and nothing is reported as a torn write.
        disk.crash(rng: &rng)
        store = try SegmentStore(directory: simDirectory, options: options(4 << 10), disk: disk) { logged.lines.append($0) }
        #expect(store.lastIndex == model.lastIndex)
        #expect(try store.read(from: 1, to: model.lastIndex, limit: 10_000) == model.records)
        #expect(!logged.lines.contains { $0.contains("torn") }, "\(logged.lines)")

        // Roll a few segments: every sealed file ends exactly with its last block.
        try fill(store, &model, &rng, batches: 120, count: 6)
        let all = try segmentFiles(disk)
        #expect(all.count >= 3)
        for f in all.dropLast() {
            let end = try #require(f.blocks.last.map { Int($0.offset) + $0.bytes.count })
            #expect(f.bytes.count == end, "\(f.name) was sealed with bytes past its data")
        }
        #expect(try store.read(from: 1, to: model.lastIndex, limit: 100_000) == model.records)
        store.close()
        // A clean close cuts them as well.
        let closed = try segmentFiles(disk)
        let last = try #require(closed.last)
        #expect(last.bytes.count == (last.blocks.last.map { Int($0.offset) + $0.bytes.count } ?? Layout.segmentHeaderBytes))
    }

    @Test func garbageAfterTheDataIsStillATornWrite() throws {
        let disk = SimulatedDisk()
        var rng = SeededRNG(seed: 92)
        var store = try SegmentStore(directory: simDirectory, options: options(4 << 10), disk: disk)
        var model = LogModel()
        try fill(store, &model, &rng, batches: 3, count: 3)
        store.close()
        let name = try #require(try disk.list(simDirectory).first { $0.hasSuffix(".seg") })
        var bytes = try #require(disk.contents(simDirectory + "/" + name))
        bytes += [0, 0, 0, 0, 7, 0, 0, 0] + [UInt8](repeating: 0, count: 100)
        disk.setContents(simDirectory + "/" + name, bytes)
        let logged = Logged()
        store = try SegmentStore(directory: simDirectory, options: options(4 << 10), disk: disk) { logged.lines.append($0) }
        #expect(store.lastIndex == model.lastIndex)
        #expect(logged.lines.contains { $0.contains("torn write") }, "\(logged.lines)")
    }

    @Test func weftDumpCountsZerosAtTheTailAsFreeSpaceNotDamage() throws {
        let disk = SimulatedDisk()
        var rng = SeededRNG(seed: 93)
        let store = try SegmentStore(directory: simDirectory, options: options(4 << 10), disk: disk)
        var model = LogModel()
        try fill(store, &model, &rng, batches: 3, count: 3)
        let name = try #require(try disk.list(simDirectory).first { $0.hasSuffix(".seg") })
        let bytes = try #require(disk.contents(simDirectory + "/" + name))
        let end = try #require(try segmentFiles(disk).last?.blocks.last.map { Int($0.offset) + $0.bytes.count })
        #expect(bytes.count > end)
        func dump(_ b: [UInt8]) throws -> (DumpSummary, [DumpEvent]) {
            var summary = DumpSummary()
            var events: [DumpEvent] = []
            try SegmentDumper.dump(MemoryByteSource(name: name, bytes: b), index: nil, filter: DumpFilter(), summary: &summary) { events.append($0) }
            return (summary, events)
        }
        let (clean, _) = try dump(bytes)
        #expect(clean.problems == 0)
        #expect(clean.preallocatedBytes == UInt64(bytes.count - end))
        #expect(clean.records == model.records.count)
        // One byte that is not zero in that space: damage, reported.
        var bad = bytes
        bad[bad.count - 1] = 1
        let (damaged, _) = try dump(bad)
        #expect(damaged.problems == 1)
        #expect(damaged.preallocatedBytes == 0)
    }
}
