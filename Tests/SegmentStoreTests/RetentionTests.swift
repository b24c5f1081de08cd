import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@Suite struct RetentionTests {
    @Test func dropSegmentsRemovesOnlyWholeOldSegments() throws {
        let disk = SimulatedDisk()
        var (store, model) = try filledStore(disk: disk, seed: 300, batches: 100)
        let files = try segmentFiles(disk)
        try #require(files.count > 5)
        #expect(store.firstIndex == 1)

        // Through an index in the middle of segment 3: segments 0...2 go, segment 3 stays.
        let mid = files[3].base + 2
        #expect(try store.dropSegments(through: mid) == 3)
        #expect(store.firstIndex == files[3].base)
        #expect(store.segmentCount == files.count - 3)
        let names = try disk.list(simDirectory)
        for f in files.prefix(3) {
            #expect(!names.contains(f.name))
            #expect(!names.contains(f.indexName))
        }
        #expect(names.contains(files[3].name))
        model.drop(below: files[3].base)
        try checkFully(store, model, "after dropping 3 segments")
        #expect(storeError { _ = try store.read(from: 1, to: 10) } == .outOfRange(requested: 1, first: files[3].base, last: model.lastIndex))
        #expect(store.lastIndex == model.lastIndex)

        // Through the segment's last index exactly: it goes too.
        let end = files[4].base - 1
        #expect(try store.dropSegments(through: end) == 1)
        #expect(store.firstIndex == files[4].base)
        model.drop(below: files[4].base)

        // Through everything: the active segment is never dropped.
        let dropped = try store.dropSegments(through: .max)
        #expect(dropped == files.count - 5)
        #expect(store.segmentCount == 1)
        #expect(store.firstIndex == files.last!.base)
        model.drop(below: files.last!.base)
        try checkFully(store, model, "after dropping all but the active segment")
        for s in 1...50 { #expect(store.lastSeq(of: StreamID(UInt64(s))) == model.lastSeq(StreamID(UInt64(s)))) }
        #expect(try store.dropSegments(through: .max) == 0)

        // Appends continue, and a reopen agrees.
        var rng = SeededRNG(seed: 301)
        for _ in 0..<10 {
            let batch = model.makeBatch(count: rng.int(1...12), rng: &rng)
            try store.append(batch)
            model.apply(batch)
        }
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(store.firstIndex == files.last!.base)
        try checkFully(store, model, "after reopen")
    }

    @Test func dropThroughBelowFirstSegmentDoesNothing() throws {
        let disk = SimulatedDisk()
        let (store, model) = try filledStore(disk: disk, seed: 302, batches: 40)
        let files = try segmentFiles(disk)
        try #require(files.count > 2)
        #expect(try store.dropSegments(through: 0) == 0)
        #expect(try store.dropSegments(through: files[1].base - 2) == 0)
        #expect(store.segmentCount == files.count)
        try checkFully(store, model, "nothing dropped")
    }
}
