import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@Suite struct RecoveryTests {
    /// A store whose last segment has several blocks, closed; its files and model.
    static func closedStore(seed: UInt64, batches: Int) throws -> (files: [String: [UInt8]], model: LogModel, segments: [SegmentFile]) {
        let disk = SimulatedDisk()
        let (store, model) = try filledStore(disk: disk, seed: seed, batches: batches)
        store.close()
        return (try snapshot(disk), model, try segmentFiles(disk))
    }

    /// Cuts the last segment at every byte offset inside its last block; recovery drops the torn block only.
    func tornTail(
        disk makeDisk: ([String: [UInt8]]) throws -> (any Disk, String), seed: UInt64, options: StoreOptions = smallOptions,
        every step: Int = 1
    ) throws {
        let (files, model, segments) = try Self.closedStore(seed: seed, batches: 45)
        let last = try #require(segments.last)
        try #require(last.blocks.count >= 2 && segments.count > 1)
        let torn = last.blocks[last.blocks.count - 1]
        let kept = last.blocks[last.blocks.count - 2].header.lastIndex
        var keptModel = model
        keptModel.truncate(from: kept + 1)
        var rng = SeededRNG(seed: seed)
        let more = keptModel.makeBatch(count: 6, rng: &rng)
        var afterModel = keptModel
        afterModel.apply(more)

        let cuts = Array(stride(from: Int(torn.offset), to: last.bytes.count, by: step)) + [last.bytes.count - 1]
        for cut in Set(cuts).sorted() {
            var damaged = files
            damaged[last.name] = Array(last.bytes.prefix(cut))
            let (disk, dir) = try makeDisk(damaged)
            var store = try SegmentStore(directory: dir, options: options, disk: disk)
            #expect(store.lastIndex == kept, "cut at \(cut)")
            #expect(store.lastTerm == keptModel.lastTerm, "cut at \(cut)")
            #expect(try store.read(from: 1, to: .max) == keptModel.records, "cut at \(cut)")
            #expect(try readFile(disk, dir + "/" + last.name).count == Int(torn.offset), "torn bytes are cut off (cut at \(cut))")
            try store.append(more)
            #expect(try store.read(from: kept - 3, to: .max) == afterModel.read(from: kept - 3, to: .max), "cut at \(cut)")
            if cut % 16 == 0 || cut == last.bytes.count - 1 {
                store.close()
                store = try SegmentStore(directory: dir, options: options, disk: disk)
                try checkFully(store, afterModel, "cut at \(cut), appended, reopened")
            }
            store.close()
        }
    }

    @Test func tornTailAtEveryOffsetSimulated() throws {
        try tornTail(disk: { files in (try simulatedDisk(with: files), simDirectory) }, seed: 400)
    }

    /// The same on real files, at every third offset (fsync-free: durability is not what is tested here).
    @Test func tornTailPosix() throws {
        let tmp = try TempDirectory(prefix: "weft-store-test")
        defer { tmp.remove() }
        var round = 0
        try tornTail(
            disk: { files in
                round += 1
                let dir = tmp.path + "/r\(round)"
                let disk = PosixDisk()
                try disk.makeDirectory(dir)
                for (name, bytes) in files { try writeFile(disk, dir + "/" + name, bytes) }
                // Keep /tmp tidy as we go: the previous round is done.
                if round > 1 { TempDirectory(existing: tmp.path + "/r\(round - 1)").remove() }
                return (disk, dir)
            }, seed: 401, options: StoreOptions(shard: smallOptions.shard, segmentBytesMax: 8_192, blockBytesTarget: 512, durability: .never),
            every: 3)
        TempDirectory(existing: tmp.path + "/r\(round)").remove()
    }

    /// Damage in a sealed segment is found when read: that block's reads throw `corrupt`, never return
    /// data; the rest of the log still reads; the damage is reported.
    @Test func flippedBitInSealedBlock() throws {
        let disk = SimulatedDisk()
        let (store, model) = try filledStore(disk: disk, seed: 402, batches: 60)
        let segments = try segmentFiles(disk)
        try #require(segments.count > 3)
        let seg = segments[1]
        let path = simDirectory + "/" + seg.name
        var rng = SeededRNG(seed: 403)
        #expect(store.damage.isEmpty)

        for (k, block) in seg.blocks.enumerated() {
            let h = block.header
            let records = model.read(from: h.firstIndex, to: h.lastIndex)
            // Bits in the magic, count, first index, crc, and the payload.
            let bits = [0, 8 * 8 + 1, 20 * 8, 28 * 8 + 5] + (0..<4).map { _ in rng.int((32 * 8)..<(block.bytes.count * 8)) }
            for bit in bits {
                var bytes = seg.bytes
                bytes[Int(block.offset) + bit / 8] ^= UInt8(1) << UInt8(bit % 8)
                disk.setContents(path, bytes)
                let context = "block \(k) bit \(bit)"

                let e = storeError { _ = try store.read(from: h.firstIndex, to: h.lastIndex) }
                #expect(e?.isCorrupt == true, "\(context): \(String(describing: e))")
                #expect(storeError { _ = try store.read(from: 1, to: .max) }?.isCorrupt == true, "\(context)")
                for r in records where r.stream != .none {
                    let e = storeError { _ = try store.readStream(r.stream, fromSeq: r.seq, limit: 1) }
                    #expect(e?.isCorrupt == true, "\(context): readStream(\(r.stream), fromSeq: \(r.seq)): \(String(describing: e))")
                    let b = storeError { _ = try store.readStreamBackward(r.stream, beforeSeq: r.seq + 1, limit: 1) }
                    #expect(b?.isCorrupt == true, "\(context): readStreamBackward(\(r.stream), beforeSeq: \(r.seq + 1))")
                }
                // The segment's other blocks, and the neighbouring segments' first blocks, still read.
                let others = seg.blocks.filter { $0.offset != block.offset } + [segments[0].blocks[0], segments[2].blocks[0]]
                for other in others {
                    let oh = other.header
                    #expect(try store.read(from: oh.firstIndex, to: oh.lastIndex) == model.read(from: oh.firstIndex, to: oh.lastIndex), "\(context)")
                }
            }
            disk.setContents(path, seg.bytes)
        }
        #expect(!store.damage.isEmpty)
        #expect(store.damage.allSatisfy { $0.file == path })
        try checkFully(store, model, "after repairing the file")
    }

    /// Every single-bit flip of one sealed block is caught.
    @Test func everyBitOfASealedBlock() throws {
        let disk = SimulatedDisk()
        let (store, model) = try filledStore(disk: disk, seed: 404, batches: 30)
        let segments = try segmentFiles(disk)
        try #require(segments.count > 1 && segments[0].blocks.count > 1)
        let seg = segments[0]
        let block = seg.blocks[seg.blocks.count / 2]
        let path = simDirectory + "/" + seg.name
        var returned = [Int]()
        for bit in 0..<(block.bytes.count * 8) {
            var bytes = seg.bytes
            bytes[Int(block.offset) + bit / 8] ^= UInt8(1) << UInt8(bit % 8)
            disk.setContents(path, bytes)
            if storeError({ _ = try store.read(from: block.header.firstIndex, to: block.header.lastIndex) })?.isCorrupt != true {
                returned.append(bit)
            }
        }
        #expect(returned.isEmpty, "flips of bits \(returned.prefix(10)) were not reported as corrupt")
        disk.setContents(path, seg.bytes)
        try checkFully(store, model, "restored")
    }

    /// A damaged index file is rebuilt from the segment: on reopen when its header or tables are bad, on
    /// the first read that reaches a bad run chunk otherwise; either way reads are unaffected.
    @Test func flippedBitInIndexFileIsRebuilt() throws {
        let (files, model, segments) = try Self.closedStore(seed: 405, batches: 40)
        try #require(segments.count > 2)
        let seg = segments[1]
        let original = try #require(files[seg.indexName])
        let idx = try SegmentIndexFile.open(MemoryByteSource(bytes: original))
        let tables = Layout.indexHeaderBytes + idx.blocks.count * Layout.indexBlockEntryBytes
        let streamsEnd = tables + idx.streams.count * Layout.indexStreamEntryBytes
        let runsStart = streamsEnd + (Int(idx.runCount) + Layout.indexRunsPerChunk - 1) / Layout.indexRunsPerChunk * 4
        #expect(runsStart < original.count)
        var rng = SeededRNG(seed: 406)
        // A sample from each region: header, block table, stream table, chunk checksums, runs.
        var bits = [Int]()
        for (from, to) in [(0, 64), (64, tables), (tables, streamsEnd), (streamsEnd, runsStart), (runsStart, original.count)] {
            bits += [from * 8, to * 8 - 1]
            for _ in 0..<4 { bits.append(rng.int((from * 8)..<(to * 8))) }
        }
        for bit in bits {
            var damaged = files
            damaged[seg.indexName] = flippingBit(original, bit)
            let disk = try simulatedDisk(with: damaged)
            let store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            // Header and tables are checked on open; run chunks when a stream read reaches them. Either
            // way every read is right, and once the reads are done the damage is reported and the index
            // file rebuilt.
            try checkFully(store, model, "index bit \(bit)")
            #expect(!store.damage.isEmpty, "bit \(bit): damage not reported")
            #expect(store.damage.allSatisfy { $0.file == simDirectory + "/" + seg.indexName }, "bit \(bit): \(store.damage)")
            #expect(try readFile(disk, simDirectory + "/" + seg.indexName) == original, "bit \(bit): index not rebuilt")
            store.close()
            // Reopened, the rebuilt index is simply used.
            let again = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            try checkFully(again, model, "index bit \(bit), reopened")
            #expect(again.damage.isEmpty, "bit \(bit): \(again.damage)")
            again.close()
        }
    }

    /// A missing index file is rebuilt on reopen, byte for byte.
    @Test func deletedIndexFileIsRebuilt() throws {
        let (files, model, segments) = try Self.closedStore(seed: 407, batches: 60)
        try #require(segments.count > 3)
        var damaged = files
        for seg in segments.dropLast().prefix(3) { damaged[seg.indexName] = nil }
        let disk = try simulatedDisk(with: damaged)
        var store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        try checkFully(store, model, "rebuilt")
        #expect(try snapshot(disk) == files)
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        try checkFully(store, model, "reopened after rebuild")
    }

    /// A sealed segment with a damaged block and no index: the rebuilt index keeps an unreadable entry for
    /// the damaged block, so it is reported on read, never skipped.
    @Test func damagedBlockWithoutIndex() throws {
        let (files, model, segments) = try Self.closedStore(seed: 408, batches: 60)
        try #require(segments.count > 2)
        let seg = segments[1]
        try #require(seg.blocks.count >= 4)
        let bad = seg.blocks[2]
        var bytes = seg.bytes
        bytes[Int(bad.offset) + bad.bytes.count - 2] ^= 0x10
        var damaged = files
        damaged[seg.name] = bytes
        damaged[seg.indexName] = nil
        let disk = try simulatedDisk(with: damaged)
        for round in 0..<2 {  // the rebuild, then the rebuilt index
            let store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
            #expect(round == 1 || !store.damage.isEmpty)
            #expect(store.lastIndex == model.lastIndex)
            let h = bad.header
            #expect(storeError { _ = try store.read(from: h.firstIndex, to: h.firstIndex) }?.isCorrupt == true, "round \(round)")
            #expect(storeError { _ = try store.read(from: 1, to: .max) }?.isCorrupt == true, "round \(round)")
            for other in segments.flatMap(\.blocks) where other.header.firstIndex != h.firstIndex {
                let oh = other.header
                #expect(try store.read(from: oh.firstIndex, to: oh.lastIndex) == model.read(from: oh.firstIndex, to: oh.lastIndex))
            }
            // A stream with records in the damaged block and after it: reading across the hole fails.
            let inBlock = model.read(from: h.firstIndex, to: h.lastIndex).filter { $0.stream != .none }
            if let r = inBlock.first(where: { r in model.records.contains { $0.stream == r.stream && $0.index > h.lastIndex } }) {
                #expect(storeError { _ = try store.readStream(r.stream, fromSeq: r.seq, limit: .max) }?.isCorrupt == true)
            } else {
                Issue.record("no stream crosses the damaged block; pick another seed")
            }
            // Records clear of the damage still read by stream.
            for s in model.streams where !inBlock.contains(where: { $0.stream == s }) {
                #expect(try store.readStream(s, fromSeq: 0, limit: .max) == model.stream(s, fromSeq: 0, limit: .max))
            }
            store.close()
        }
        #expect(disk.exists(simDirectory + "/" + seg.indexName))
    }

    /// Damage in the middle of the last segment: recovery keeps the blocks after it, and appends go on.
    @Test func damagedBlockInActiveSegment() throws {
        let (files, model, segments) = try Self.closedStore(seed: 409, batches: 47)
        let last = try #require(segments.last)
        try #require(last.blocks.count >= 3)
        let bad = last.blocks[1]
        var bytes = last.bytes
        bytes[Int(bad.offset) + 40] ^= 0x01
        var damaged = files
        damaged[last.name] = bytes
        let disk = try simulatedDisk(with: damaged)
        var store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(!store.damage.isEmpty)
        #expect(store.lastIndex == model.lastIndex)
        #expect(storeError { _ = try store.read(from: bad.header.firstIndex, to: bad.header.lastIndex) }?.isCorrupt == true)
        let after = last.blocks[2].header
        #expect(try store.read(from: after.firstIndex, to: .max) == model.read(from: after.firstIndex, to: .max))
        var m = model
        // Streams whose last records sat in the damaged block are known only up to before it.
        for s in m.streams { m.lastSeqs[s] = store.lastSeq(of: s) }
        var rng = SeededRNG(seed: 410)
        let batch = m.makeBatch(count: 5, rng: &rng)
        try store.append(batch)
        m.apply(batch)
        store.close()
        store = try SegmentStore(directory: simDirectory, options: smallOptions, disk: disk)
        #expect(try store.read(from: after.firstIndex, to: .max) == m.read(from: after.firstIndex, to: .max))
    }
}
