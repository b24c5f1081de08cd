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

    /// A log set aside (Replication: no snapshot reaches its start) moves whole, even when the process
    /// stops half way: the next open finishes the move and finds an empty log; nothing is deleted.
    @Test func anInterruptedSetAsideIsFinishedAtOpen() throws {
        let disk = SimulatedDisk()
        let (store, _) = try filledStore(disk: disk, seed: 310, batches: 60)
        store.close()
        let before = try disk.list(simDirectory).filter { $0.hasSuffix(".seg") || $0.hasSuffix(".idx") }.sorted()
        try #require(before.count > 4)
        // The intent is written, then only the first two files moved before the "crash".
        let intent = try disk.open(simDirectory + "/set-aside.intent", create: true)
        try intent.write(Array("set-aside-1".utf8), at: 0)
        try intent.sync()
        intent.close()
        try disk.makeDirectory(simDirectory + "/set-aside-1")
        for n in before.prefix(2) { try disk.rename(simDirectory + "/" + n, to: simDirectory + "/set-aside-1/" + n) }
        let reopened = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(reopened.lastIndex == 0 && reopened.damage.isEmpty, "an empty log, no damage reported")
        let moved = try disk.list(simDirectory + "/set-aside-1").filter { $0.hasSuffix(".seg") || $0.hasSuffix(".idx") }.sorted()
        #expect(moved == before, "every file of the log is in the set-aside directory")
        #expect(!disk.exists(simDirectory + "/set-aside.intent"))
        reopened.close()
        // A second set-aside into a directory that holds files is refused.
        #expect(throws: StoreError.self) { try SegmentStore.setAside(in: simDirectory, into: "set-aside-1", disk: disk) }
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

/// Stream high-water marks across retention (issue 8, item 12): a stream whose records all lived in
/// dropped segments keeps its last seq (`streams.hwm`), so the next record of it continues the sequence
/// instead of starting again at 1 — after retention, after a reopen, after a crash half way, and a lost
/// or damaged high-water file is reported, never taken as "no streams".
@Suite struct HighWaterTests {
    static let early = StreamID(77)
    static let hwm = "streams.hwm"

    /// Stream 77's only records are the first five of the log (seqs 1...5), then random batches over
    /// streams 1...50 fill several segments; closed, with its model.
    static func storeWithEarlyStream(disk: any Disk, directory: String = simDirectory, options: StoreOptions = smallOptions) throws -> LogModel {
        let store = try SegmentStore(directory: directory, options: options, disk: disk)
        defer { store.close() }
        var model = LogModel()
        let first = (1...5).map { k in
            Record(index: LogIndex(k), term: 1, stream: early, seq: StreamSeq(k), timestampMicros: 0, payload: Array("early \(k)".utf8))
        }
        try store.append(first)
        model.apply(first)
        var rng = SeededRNG(seed: 900)
        for _ in 0..<90 {
            let batch = model.makeBatch(count: rng.int(1...12), rng: &rng)
            try store.append(batch)
            model.apply(batch)
        }
        return model
    }

    static func next(_ model: LogModel, _ stream: StreamID, seq: StreamSeq) -> Record {
        Record(index: model.lastIndex + 1, term: model.lastTerm, stream: stream, seq: seq, timestampMicros: 0, payload: [1])
    }

    /// Drops every sealed segment up to and including the one holding `index`.
    static func drop(_ store: SegmentStore, _ model: inout LogModel, through index: LogIndex) throws {
        let segs = try segmentFiles(store.fileSystem, store.directory)
        let end = try #require(segs.first { $0.blocks.last.map { $0.header.lastIndex >= index } ?? false }?.blocks.last?.header.lastIndex)
        #expect(try store.dropSegments(through: end) >= 1)
        model.drop(below: store.firstIndex)
    }

    @Test func streamContinuesAfterRetention() throws {
        let disk = SimulatedDisk()
        var model = try Self.storeWithEarlyStream(disk: disk)
        let store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        defer { store.close() }
        try Self.drop(store, &model, through: 5)
        #expect(store.firstIndex > 5)
        #expect(store.lastSeq(of: Self.early) == 5)
        #expect(storeError { try store.append([Self.next(model, Self.early, seq: 1)]) } == .streamSequence(stream: Self.early, expected: 6, got: 1))
        let r = Self.next(model, Self.early, seq: 6)
        try store.append([r])
        model.apply([r])
        #expect(store.lastSeq(of: Self.early) == 6)
        var rng = SeededRNG(seed: 901)
        #expect(check(store, model, "after retention", rng: &rng, queries: 20))
    }

    /// The floor of a stream: 1 while nothing is dropped; after retention, the first seq the files hold,
    /// or (every record of the stream dropped) the one after the last dropped; a read from below it
    /// starts there.
    @Test func aStreamsFloorIsTheFirstSeqStillHeld() throws {
        let disk = SimulatedDisk()
        var model = try Self.storeWithEarlyStream(disk: disk)
        let store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        defer { store.close() }
        #expect(store.streamFloor(Self.early) == 1 && store.streamFloor(StreamID(3)) == 1 && store.streamFloor(StreamID(999)) == 1)
        try Self.drop(store, &model, through: 5)
        #expect(store.streamFloor(Self.early) == 6, "all five dropped: the next one")
        #expect(store.streamFloor(StreamID(999)) == 1, "a stream never written")
        // Stream 3 lost its records in the dropped segments: its floor is the first it still has.
        let held = model.records.filter { $0.stream == StreamID(3) }.map(\.seq)
        let first = try #require(held.first)
        #expect(first > 1, "the test needs stream 3 to have lost some records")
        #expect(store.streamFloor(StreamID(3)) == first)
        #expect(try store.readStream(StreamID(3), fromSeq: 1, limit: 1).first?.seq == first)
        // The early stream goes on: its floor is its first new record.
        try store.append([Self.next(model, Self.early, seq: 6)])
        #expect(store.streamFloor(Self.early) == 6)
    }

    @Test func highWaterSurvivesReopenAndLaterRetention() throws {
        let disk = SimulatedDisk()
        var model = try Self.storeWithEarlyStream(disk: disk)
        var store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        try Self.drop(store, &model, through: 5)
        store.close()
        #expect(disk.exists(simDirectory + "/" + Self.hwm))
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(noFindings(store.findings), "\(store.findings)")
        #expect(store.lastSeq(of: Self.early) == 5)
        var rng = SeededRNG(seed: 902)
        #expect(check(store, model, "reopened after retention", rng: &rng, queries: 20))

        // More retention: the marks of the first run are kept, those of the new one added.
        try Self.drop(store, &model, through: store.firstIndex + 50)
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        defer { store.close() }
        #expect(noFindings(store.findings), "\(store.findings)")
        #expect(store.lastSeq(of: Self.early) == 5)
        #expect(check(store, model, "reopened after a second retention", rng: &rng, queries: 20))
        let r = Self.next(model, Self.early, seq: 6)
        try store.append([r])
    }

    /// Truncating the suffix cannot lower a mark below what the dropped segments held: a stream whose
    /// remaining records are all cut continues after its dropped ones.
    @Test func truncationKeepsDroppedMarks() throws {
        let disk = SimulatedDisk()
        var model = try Self.storeWithEarlyStream(disk: disk)
        var store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        try Self.drop(store, &model, through: 5)
        // Cut a few records after the new first index: streams whose later records are all cut keep the
        // marks of their dropped ones.
        let cut = store.firstIndex + 3
        try store.truncateSuffix(from: cut)
        model.truncate(from: cut)
        #expect(model.lastSeqs.contains { s, seq in !model.records.contains { $0.stream == s } && seq > 0 && s != Self.early })
        var rng = SeededRNG(seed: 903)
        #expect(check(store, model, "truncated after retention", rng: &rng, queries: 20))
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        defer { store.close() }
        #expect(check(store, model, "truncated after retention, reopened", rng: &rng, queries: 20))
    }

    /// A failure, then a power loss, at each write and each sync of a retention run (and after a run that
    /// completed): the marks are durable before any segment is deleted, so whichever segments survive,
    /// every stream's last seq is what it was (from the segments still there, or from the file), and no
    /// loss is reported.
    @Test(arguments: 1...5) func crashDuringRetention(failAt: Int) throws {
        for failSync in [false, true] {
            let disk = SimulatedDisk()
            let full = try Self.storeWithEarlyStream(disk: disk)
            let store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            let end = try #require(try segmentFiles(disk)[1].blocks.last?.header.lastIndex)
            if failSync {
                disk.failSyncNumber = disk.syncs + failAt
            } else {
                disk.failWriteNumber = disk.writes + failAt
                disk.shortWritePrefix = 5
            }
            let failed = storeError { _ = try store.dropSegments(through: end) }
            store.close()
            var rng = SeededRNG(seed: 904 + UInt64(failAt))
            disk.crash(rng: &rng)
            let reopened = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            defer { reopened.close() }
            let context = "fail \(failSync ? "sync" : "write") \(failAt) (\(failed.map { "\($0)" } ?? "completed"))"
            #expect(reopened.findings.damagedFrom == nil, "\(context): \(reopened.findings)")
            #expect(!reopened.findings.notes.contains { $0.contains(Self.hwm) }, "\(context): \(reopened.findings)")
            var model = full
            model.drop(below: reopened.firstIndex)
            #expect(reopened.lastSeq(of: Self.early) == 5, "\(context)")
            #expect(check(reopened, model, context, rng: &rng, queries: 10), "\(context)")
        }
    }

    /// A damaged, cut or deleted `streams.hwm` after segments were dropped is reported (a finding, and
    /// the file and offset for damage), and stays reported after later retention rewrites the file.
    @Test(arguments: ["flip", "cut", "delete", "shard"]) func lostHighWaterIsReported(_ how: String) throws {
        let disk = SimulatedDisk()
        var model = try Self.storeWithEarlyStream(disk: disk)
        var store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        try Self.drop(store, &model, through: 5)
        store.close()
        let path = simDirectory + "/" + Self.hwm
        let good = try #require(disk.contents(path))
        switch how {
        case "flip": disk.setContents(path, flippingBit(good, 8 * 40 + 3))
        case "cut": disk.setContents(path, Array(good.prefix(good.count - 9)))
        case "delete": try disk.remove(path)
        default:
            // Another shard's marks, checksum right.
            var b = good
            b.storeLE(UInt64(99), at: 16)
            b.storeLE(CRC32C.checksum(b[0..<(b.count - 4)]), at: b.count - 4)
            disk.setContents(path, b)
        }
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(store.findings.notes.contains { $0.contains(Self.hwm) }, "\(how): \(store.findings)")
        #expect(store.findings.damagedFrom == nil, "\(how): the records themselves are intact")
        if how != "delete" {
            #expect(store.damage.contains { $0.file == path }, "\(how): \(store.damage)")
        }
        // Later retention rewrites the file; the loss stays on record in it.
        try Self.drop(store, &model, through: store.firstIndex + 30)
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        defer { store.close() }
        #expect(store.findings.notes.contains { $0.contains(Self.hwm) }, "\(how), after more retention: \(store.findings)")
    }

    /// Removing a log removes its marks too; the sealed files shipped to a follower include them.
    @Test func removeLogAndSealedFiles() throws {
        let disk = SimulatedDisk()
        var model = try Self.storeWithEarlyStream(disk: disk)
        let store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        try Self.drop(store, &model, through: 5)
        let files = store.sealedFiles()
        #expect(files.first?.name == Self.hwm)
        #expect(files.first?.path == simDirectory + "/" + Self.hwm)
        #expect(files.dropFirst().allSatisfy { $0.name.hasSuffix(".seg") || $0.name.hasSuffix(".idx") })

        // A follower that installs the shipped files numbers the stream on from its last seq.
        let follower = "/sim/follower"
        try disk.makeDirectory(follower)
        for f in files { disk.setContents(follower + "/" + f.name, try #require(disk.contents(f.path))) }
        let copy = try SegmentStore(directory: follower, options: smallOptions, disk: disk)
        #expect(copy.lastSeq(of: Self.early) == 5)
        #expect(noFindings(copy.findings) || copy.findings.notes.allSatisfy { !$0.contains(Self.hwm) }, "\(copy.findings)")
        copy.close()

        store.close()
        try SegmentStore.removeLog(in: simDirectory, disk: disk)
        #expect(!disk.exists(simDirectory + "/" + Self.hwm))
        let left = try disk.list(simDirectory)
        #expect(left.isEmpty, "\(left)")
    }
}

