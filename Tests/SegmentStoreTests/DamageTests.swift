import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

/// 4 KiB segments and 512-byte blocks: a few dozen batches make several sealed segments, each of
/// several blocks. No fsync on append (what is tested is what a reopen finds, not durability).
let damageOptions = StoreOptions(shard: ShardID(7), segmentBytesMax: 4_096, blockBytesTarget: 512, durability: .never)

/// Loss and damage found at open (through `tail.fence`, holes between segments, rebuilt indexes) and by
/// the scrubber, as reported in `findings` and `damagedFrom`; each case on the simulated disk and on
/// real files.
@Suite struct DamageTests {
    enum Kind: String, CaseIterable, CustomTestStringConvertible {
        case simulated, posix
        var testDescription: String { rawValue }
    }

    /// A store directory on one kind of disk; a real one lives under /tmp and goes with this object.
    final class Place {
        let disk: any Disk
        let dir: String
        let tmp: TempDirectory?

        init(_ kind: Kind) throws {
            switch kind {
            case .simulated:
                disk = SimulatedDisk()
                dir = simDirectory
                tmp = nil
            case .posix:
                let t = try TempDirectory(prefix: "weft-store-test")
                tmp = t
                disk = PosixDisk()
                dir = t.path + "/shard"
            }
        }

        deinit { tmp?.remove() }

        func path(_ name: String) -> String { dir + "/" + name }
        func open() throws -> SegmentStore { try SegmentStore(directory: dir, options: damageOptions, disk: disk) }
        func exists(_ name: String) -> Bool { disk.exists(path(name)) }
        func remove(_ name: String) throws { try disk.remove(path(name)) }
        func segments() throws -> [SegmentFile] { try segmentFiles(disk, dir) }
        func bytes(_ name: String) throws -> [UInt8] { try readFile(disk, path(name)) }
        func setBytes(_ name: String, _ b: [UInt8]) throws { try writeFile(disk, path(name), b) }

        /// A closed store of `batches` random batches, its model, and its segment files.
        func filled(seed: UInt64, batches: Int = 60) throws -> (LogModel, [SegmentFile]) {
            let (store, model) = try filledStore(disk: disk, directory: dir, options: damageOptions, seed: seed, batches: batches)
            store.close()
            return (model, try segments())
        }

        /// The fence as stored: (first index, last index, last term), nil if absent or invalid.
        func fence() throws -> (first: LogIndex, last: LogIndex, term: Term)? {
            guard exists("tail.fence") else { return nil }
            let b = try bytes("tail.fence")
            guard b.count == 36, Array(b[0..<8]) == Array("WEFTFNC\0".utf8), b.loadLE(UInt32.self, at: 32) == CRC32C.checksum(b[0..<32]) else {
                return nil
            }
            return (b.loadLE(at: 8), b.loadLE(at: 16), b.loadLE(at: 24))
        }
    }

    /// The records of the model below `index`.
    static func prefix(_ model: LogModel, below index: LogIndex) -> LogModel {
        var m = model
        m.truncate(from: index)
        return m
    }

    // MARK: (a), (b), (c) the tail

    /// The active segment cut exactly where a later block starts: the file is clean (nothing torn), so
    /// only the fence can tell that records were lost; they are reported from that block's first index.
    @Test(arguments: Kind.allCases) func activeSegmentCutAtABlockBoundary(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 500)
        let last = try #require(segments.last)
        try #require(segments.count >= 3 && last.blocks.count >= 3, "\(segments.count) segments, \(last.blocks.count) blocks in the last")
        #expect(try place.fence()?.last == model.lastIndex)
        let cutBlock = last.blocks[1]
        let lost = cutBlock.header.firstIndex
        try place.setBytes(last.name, Array(last.bytes.prefix(Int(cutBlock.offset))))

        let store = try place.open()
        defer { store.close() }
        let kept = Self.prefix(model, below: lost)
        #expect(store.lastIndex == lost - 1)
        #expect(store.lastTerm == kept.lastTerm)
        #expect(store.findings.damagedFrom == lost)
        #expect(store.damagedFrom == lost)
        #expect(!store.findings.tailUnverified)
        #expect(store.findings.notes.count == 1, "\(store.findings.notes)")
        #expect(store.findings.notes.first?.contains("\(model.lastIndex)") == true, "\(store.findings.notes)")
        // Nothing in the files themselves is damaged or torn.
        #expect(store.damage.isEmpty, "\(store.damage)")
        #expect(try place.bytes(last.name).count == Int(cutBlock.offset))
        try checkFully(store, kept, "cut at block boundary")
    }

    /// The active segment cut inside a block (in its header, in its payload): recovery cuts the torn block
    /// off, and the fence shows that it and the blocks after it are lost.
    @Test(arguments: Kind.allCases) func activeSegmentCutInsideABlock(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 501)
        let last = try #require(segments.last)
        try #require(segments.count >= 3 && last.blocks.count >= 3)
        let torn = last.blocks[1]
        let lost = torn.header.firstIndex
        let kept = Self.prefix(model, below: lost)
        for cut in [Int(torn.offset) + 10, Int(torn.offset) + Layout.blockHeaderBytes + (torn.bytes.count - Layout.blockHeaderBytes) / 2] {
            try #require(cut > Int(torn.offset) && cut < Int(torn.offset) + torn.bytes.count)
            try place.setBytes(last.name, Array(last.bytes.prefix(cut)))
            try place.setBytes("tail.fence", try place.fenceBytes(first: 1, last: model.lastIndex, term: model.lastTerm))

            let store = try place.open()
            #expect(store.lastIndex == lost - 1, "cut at \(cut)")
            #expect(store.findings.damagedFrom == lost, "cut at \(cut)")
            #expect(store.damagedFrom == lost, "cut at \(cut)")
            #expect(!store.findings.tailUnverified, "cut at \(cut)")
            #expect(!store.findings.notes.isEmpty, "cut at \(cut)")
            // The torn bytes are gone from the file.
            #expect(try place.bytes(last.name).count == Int(torn.offset), "cut at \(cut)")
            try checkFully(store, kept, "cut at \(cut)")
            store.close()
        }
    }

    /// The last segment file deleted: the log ends with the previous (sealed) segment; lost from the
    /// deleted segment's base.
    @Test(arguments: Kind.allCases) func lastSegmentDeleted(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 502)
        try #require(segments.count >= 3)
        let last = segments[segments.count - 1]
        #expect(!place.exists(last.indexName), "the active segment has no index file")
        try place.remove(last.name)

        let store = try place.open()
        defer { store.close() }
        #expect(store.lastIndex == last.base - 1)
        #expect(store.lastIndex == segments[segments.count - 2].blocks.last!.header.lastIndex)
        #expect(store.findings.damagedFrom == last.base)
        #expect(store.damagedFrom == last.base)
        #expect(!store.findings.tailUnverified)
        try checkFully(store, Self.prefix(model, below: last.base), "last segment deleted")
    }

    // MARK: (d), (e) whole segments

    /// A middle segment deleted (data and index): the segments after the hole cannot be part of this log
    /// any more; they are moved to `quarantine/`, the log ends before the hole, lost from its start.
    @Test(arguments: Kind.allCases) func middleSegmentDeleted(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 503, batches: 80)
        try #require(segments.count >= 5, "\(segments.count) segments")
        let hole = segments[2]
        try place.remove(hole.name)
        try place.remove(hole.indexName)

        let store = try place.open()
        defer { store.close() }
        #expect(store.lastIndex == hole.base - 1)
        #expect(store.firstIndex == 1)
        #expect(store.findings.damagedFrom == hole.base)
        #expect(store.damagedFrom == hole.base)
        #expect(!store.findings.tailUnverified)
        #expect(store.findings.notes.contains { $0.contains("quarantine") }, "\(store.findings.notes)")
        for seg in segments[3...] {
            #expect(!place.exists(seg.name), "\(seg.name) still in the log directory")
            #expect(place.disk.exists(place.path("quarantine/" + seg.name)), "\(seg.name) not quarantined")
            #expect(try readFile(place.disk, place.path("quarantine/" + seg.name)) == seg.bytes, "\(seg.name) changed")
            if seg.base != segments.last!.base {
                #expect(place.disk.exists(place.path("quarantine/" + seg.indexName)), "\(seg.indexName) not quarantined")
            }
        }
        for seg in segments[..<2] { #expect(place.exists(seg.name) && place.exists(seg.indexName)) }
        #expect(try place.segments().map(\.base) == segments[..<2].map(\.base))
        try checkFully(store, Self.prefix(model, below: hole.base), "hole at \(hole.base)")
    }

    /// The first segment deleted: the log now starts after where the fence says it starts.
    @Test(arguments: Kind.allCases) func firstSegmentDeleted(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 504)
        try #require(segments.count >= 3)
        #expect(try place.fence()?.first == 1)
        try place.remove(segments[0].name)
        try place.remove(segments[0].indexName)

        let store = try place.open()
        defer { store.close() }
        #expect(store.firstIndex == segments[1].base)
        #expect(store.lastIndex == model.lastIndex)
        #expect(store.findings.damagedFrom == 1)
        #expect(store.damagedFrom == 1)
        #expect(!store.findings.tailUnverified)
        #expect(store.findings.notes.count == 1, "\(store.findings.notes)")
        #expect(try store.read(from: segments[1].base, to: .max) == model.read(from: segments[1].base, to: .max))
    }

    /// After retention the fence's first index moves on: losing the (new) first segment is reported from
    /// there, and retention itself is not reported as loss.
    @Test func firstSegmentDeletedAfterRetention() throws {
        let place = try Place(.simulated)
        let (model, segments) = try place.filled(seed: 505, batches: 80)
        try #require(segments.count >= 5)
        var store = try place.open()
        #expect(try store.dropSegments(through: segments[1].blocks.last!.header.lastIndex) == 2)
        store.close()
        #expect(try place.fence()?.first == segments[2].base)
        store = try place.open()
        #expect(noFindings(store.findings), "\(store.findings)")
        store.close()

        try place.remove(segments[2].name)
        try place.remove(segments[2].indexName)
        store = try place.open()
        defer { store.close() }
        #expect(store.firstIndex == segments[3].base)
        #expect(store.findings.damagedFrom == segments[2].base)
        #expect(store.lastIndex == model.lastIndex)
    }

    // MARK: (f) damage inside a sealed block

    /// A flipped byte in a sealed block's payload, with its index file intact: open reads no sealed data,
    /// so it finds nothing; one full scrub pass finds it, records `damagedFrom` at that block's first
    /// index, and the block is never served.
    @Test(arguments: Kind.allCases) func flippedByteFoundByScrub(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 506, batches: 80)
        try #require(segments.count >= 4)
        let seg = segments[2]
        try #require(seg.blocks.count >= 3)
        let bad = seg.blocks[seg.blocks.count / 2]
        var bytes = seg.bytes
        bytes[Int(bad.offset) + Layout.blockHeaderBytes + (bad.bytes.count - Layout.blockHeaderBytes) / 2] ^= 0x40
        try place.setBytes(seg.name, bytes)
        let indexBefore = try place.bytes(seg.indexName)

        let store = try place.open()
        defer { store.close() }
        #expect(noFindings(store.findings), "\(store.findings)")
        #expect(store.damagedFrom == nil)
        #expect(store.damage.isEmpty)
        #expect(try place.bytes(seg.indexName) == indexBefore, "the index was not rewritten")

        // Small steps: a pass takes many calls; damage shows up in the call that reaches the block.
        var calls = 0
        var passDone = false
        while !passDone && calls < 10_000 {
            passDone = store.scrub(maxBytes: 700)
            calls += 1
        }
        #expect(passDone)
        #expect(calls > segments.count, "a pass of \(calls) calls is too short for 700-byte steps")
        #expect(store.damagedFrom == bad.header.firstIndex)
        #expect(store.damage.count == 1, "\(store.damage)")
        #expect(store.damage.first?.file == place.path(seg.name))
        let e = storeError { _ = try store.read(from: bad.header.firstIndex, to: bad.header.lastIndex) }
        #expect(e?.isCorrupt == true, "\(String(describing: e))")
        #expect(storeError { _ = try store.read(from: bad.header.lastIndex, to: bad.header.lastIndex) }?.isCorrupt == true)
        // Everything else still reads.
        #expect(try store.read(from: 1, to: bad.header.firstIndex - 1) == model.read(from: 1, to: bad.header.firstIndex - 1))
        #expect(try store.read(from: bad.header.lastIndex + 1, to: .max) == model.read(from: bad.header.lastIndex + 1, to: .max))
        // A second pass finds nothing new and moves nothing.
        calls = 0
        repeat { calls += 1 } while !store.scrub(maxBytes: 700) && calls < 10_000
        #expect(store.damagedFrom == bad.header.firstIndex)
    }

    /// The scrubber over an undamaged store finds nothing; a pass ends.
    @Test func scrubOfACleanStoreFindsNothing() throws {
        let place = try Place(.simulated)
        let (_, segments) = try place.filled(seed: 507)
        try #require(segments.count >= 3)
        let store = try place.open()
        defer { store.close() }
        var calls = 0
        while !store.scrub(maxBytes: 700) && calls < 10_000 { calls += 1 }
        #expect(calls > 0 && calls < 10_000)
        #expect(store.damagedFrom == nil)
        #expect(store.damage.isEmpty)
    }

    // MARK: (g), (h), (i) what is not loss

    /// A sealed segment's index file deleted: rebuilt from the data, byte for byte; nothing is lost.
    @Test(arguments: Kind.allCases) func deletedIndexIsRebuiltWithoutFindings(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 508)
        try #require(segments.count >= 3)
        let seg = segments[1]
        let original = try place.bytes(seg.indexName)
        try place.remove(seg.indexName)

        let store = try place.open()
        defer { store.close() }
        #expect(store.findings.damagedFrom == nil)
        #expect(store.damagedFrom == nil)
        #expect(!store.findings.tailUnverified)
        #expect(try place.bytes(seg.indexName) == original)
        try checkFully(store, model, "index rebuilt")
    }

    /// No fence beside a non-empty log: whether the tail was lost cannot be told. A new empty store has
    /// nothing to lose.
    @Test(arguments: Kind.allCases) func missingFence(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, _) = try place.filled(seed: 509)
        try place.remove("tail.fence")
        var store = try place.open()
        #expect(store.findings.tailUnverified)
        #expect(store.findings.damagedFrom == nil)
        #expect(store.damagedFrom == nil)
        #expect(store.findings.notes.count == 1, "\(store.findings.notes)")
        try checkFully(store, model, "fence missing")
        // The open leaves the fence missing (so a restart still cannot tell) until the owner has put the
        // finding on record and accepts it.
        #expect(try place.fence() == nil)
        try store.acceptFindings()
        store.close()
        #expect(try place.fence().map { [$0.first, $0.last, $0.term] } == [1, model.lastIndex, model.lastTerm])
        store = try place.open()
        #expect(noFindings(store.findings), "\(store.findings)")
        store.close()

        // A damaged fence counts as missing.
        var fence = try place.bytes("tail.fence")
        fence[20] ^= 0x01
        try place.setBytes("tail.fence", fence)
        store = try place.open()
        #expect(store.findings.tailUnverified)
        store.close()

        let empty = try Place(kind)
        store = try empty.open()
        #expect(noFindings(store.findings), "\(store.findings)")
        #expect(store.lastIndex == 0)
        store.close()
        #expect(empty.exists("tail.fence"))
        // Reopened without its fence, an empty store is still fine.
        try empty.remove("tail.fence")
        store = try empty.open()
        #expect(noFindings(store.findings), "\(store.findings)")
        store.close()
    }

    /// A clean close and reopen finds nothing, also after a truncation inside a block, after one that
    /// removes whole segments, and after retention.
    @Test(arguments: Kind.allCases) func cleanReopenHasNoFindings(_ kind: Kind) throws {
        let place = try Place(kind)
        var (model, segments) = try place.filled(seed: 510, batches: 80)
        try #require(segments.count >= 5)
        func reopenClean(_ what: String) throws {
            let store = try place.open()
            defer { store.close() }
            #expect(noFindings(store.findings), "\(what): \(store.findings)")
            #expect(store.damagedFrom == nil, "\(what)")
            #expect(store.damage.isEmpty, "\(what)")
            #expect(try place.fence().map { [$0.first, $0.last] } == [model.firstIndex, model.lastIndex], "\(what)")
            try checkFully(store, model, what)
        }
        try reopenClean("fresh")

        var store = try place.open()
        let inside = segments.last!.blocks[1].header.firstIndex + 1
        try store.truncateSuffix(from: inside)
        model.truncate(from: inside)
        store.close()
        try reopenClean("cut inside a block")

        store = try place.open()
        try store.truncateSuffix(from: segments[3].base)
        model.truncate(from: segments[3].base)
        store.close()
        try reopenClean("cut at a segment base")

        store = try place.open()
        var rng = SeededRNG(seed: 511)
        let batch = model.makeBatch(count: 10, rng: &rng)
        try store.append(batch)
        model.apply(batch)
        #expect(try store.dropSegments(through: segments[0].blocks.last!.header.lastIndex) == 1)
        model.drop(below: segments[1].base)
        store.close()
        try reopenClean("appended, dropped the first segment")
        segments = try place.segments()
        #expect(segments.first?.base == model.firstIndex)
    }

    // MARK: power loss after the log shrank

    /// A store whose data is synced on every append, reopened once (so the fence on disk is the one
    /// synced at that open).
    static func syncedStore(seed: UInt64) throws -> (SimulatedDisk, LogModel, [SegmentFile]) {
        let disk = SimulatedDisk()
        let options = StoreOptions(shard: damageOptions.shard, segmentBytesMax: 4_096, blockBytesTarget: 512, durability: .everyBatch)
        let (store, model) = try filledStore(disk: disk, options: options, seed: seed, batches: 80)
        store.close()
        return (disk, model, try segmentFiles(disk))
    }

    /// `truncateSuffix` is durable when it returns, but the fence it rewrites is not synced: after a power
    /// loss the fence on disk still names the old, longer log, and the next open reports the records
    /// Raft removed on purpose as lost (a needless repair; on a majority at once, no node can vote).
    @Test func powerLossAfterTruncationIsNotLoss() throws {
        let (disk, model, segments) = try Self.syncedStore(seed: 520)
        let options = StoreOptions(shard: damageOptions.shard, segmentBytesMax: 4_096, blockBytesTarget: 512, durability: .everyBatch)
        var store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        let from = try #require(segments.last?.blocks.first?.header.firstIndex) + 1
        try store.truncateSuffix(from: from)
        store.close()
        var rng = SeededRNG(seed: 521)
        disk.crash(rng: &rng)
        store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        defer { store.close() }
        // The truncation itself survived, as documented.
        #expect(store.lastIndex == from - 1)
        try checkFully(store, Self.prefix(model, below: from), "truncated, then power loss")
        #expect(store.findings.damagedFrom == nil, "\(store.findings.notes)")
    }

    /// The same for retention: `dropSegments` makes the deletions durable (directory fsync) but not the
    /// fence, so after a power loss the old first index makes the next open report the first segments
    /// lost — and a replica then empties its whole log (`damagedFrom <= firstIndex`).
    @Test func powerLossAfterRetentionIsNotLoss() throws {
        let (disk, model, segments) = try Self.syncedStore(seed: 522)
        try #require(segments.count >= 4)
        let options = StoreOptions(shard: damageOptions.shard, segmentBytesMax: 4_096, blockBytesTarget: 512, durability: .everyBatch)
        var store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        #expect(try store.dropSegments(through: segments[1].blocks.last!.header.lastIndex) == 2)
        store.close()
        var rng = SeededRNG(seed: 523)
        disk.crash(rng: &rng)
        store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        defer { store.close() }
        #expect(store.firstIndex == segments[2].base)
        #expect(store.lastIndex == model.lastIndex)
        #expect(store.findings.damagedFrom == nil, "\(store.findings.notes)")
    }

    // MARK: (j) repair

    /// What the replica does after damage: cut the log from `damagedFrom` and append again. The cut clears
    /// `damagedFrom`, and the repaired log reopens with no findings.
    func repairAndReopen(_ place: Place, _ store: SegmentStore, _ model: LogModel, seed: UInt64, _ what: String) throws {
        let from = try #require(store.damagedFrom, "\(what): no damage to repair")
        try store.truncateSuffix(from: from)
        #expect(store.damagedFrom == nil, "\(what): damagedFrom \(String(describing: store.damagedFrom)) after truncateSuffix(from: \(from))")
        #expect(store.lastIndex == from - 1, "\(what)")
        var m = Self.prefix(model, below: from)
        var rng = SeededRNG(seed: seed)
        let batch = m.makeBatch(count: 25, rng: &rng)
        try store.append(batch)
        m.apply(batch)
        #expect(store.lastIndex == m.lastIndex)
        store.close()
        let again = try place.open()
        defer { again.close() }
        #expect(noFindings(again.findings), "\(what): \(again.findings)")
        #expect(again.damagedFrom == nil, "\(what)")
        try checkFully(again, m, "\(what), repaired and reopened")
    }

    @Test(arguments: Kind.allCases) func repairAfterScrubFoundDamage(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 512, batches: 80)
        try #require(segments.count >= 4)
        let seg = segments[1]
        let bad = seg.blocks[1]
        var bytes = seg.bytes
        bytes[Int(bad.offset) + bad.bytes.count - 3] ^= 0x08
        try place.setBytes(seg.name, bytes)
        let store = try place.open()
        var calls = 0
        while !store.scrub(maxBytes: 4_096) && calls < 1_000 { calls += 1 }
        #expect(store.damagedFrom == bad.header.firstIndex)
        try repairAndReopen(place, store, model, seed: 513, "scrub damage at \(bad.header.firstIndex)")
    }

    @Test(arguments: Kind.allCases) func repairAfterTailLoss(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 514)
        let last = try #require(segments.last)
        try #require(last.blocks.count >= 3)
        try place.setBytes(last.name, Array(last.bytes.prefix(Int(last.blocks[1].offset))))
        let store = try place.open()
        #expect(store.damagedFrom == last.blocks[1].header.firstIndex)
        try repairAndReopen(place, store, model, seed: 515, "tail lost from \(last.blocks[1].header.firstIndex)")
    }

    @Test(arguments: Kind.allCases) func repairAfterHole(_ kind: Kind) throws {
        let place = try Place(kind)
        let (model, segments) = try place.filled(seed: 516, batches: 80)
        try #require(segments.count >= 5)
        try place.remove(segments[2].name)
        try place.remove(segments[2].indexName)
        let store = try place.open()
        #expect(store.damagedFrom == segments[2].base)
        try repairAndReopen(place, store, model, seed: 517, "hole at \(segments[2].base)")
        // The quarantined files stay where they were put; the log's new segment at the hole's base is a
        // new file.
        #expect(place.disk.exists(place.path("quarantine/" + segments[3].name)))
    }
}

/// Nothing found: no loss, no doubt about the tail, no notes.
func noFindings(_ f: OpenFindings) -> Bool { f.damagedFrom == nil && !f.tailUnverified && f.notes.isEmpty }

extension DamageTests.Place {
    func fenceBytes(first: LogIndex, last: LogIndex, term: Term) throws -> [UInt8] {
        var b = Array("WEFTFNC\0".utf8)
        b.appendLE(first)
        b.appendLE(last)
        b.appendLE(term)
        b.appendLE(CRC32C.checksum(b))
        return b
    }
}
