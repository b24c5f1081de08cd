import SegmentFormat
import WeftCore

/// §6 of Docs/segment-format.md: the intent written before a segment is cut inside a block, so a crash
/// between cutting the file and rewriting the kept records of that block cannot lose them.
struct TruncateIntent {
    static let magic: [UInt8] = Array("WEFTTRN\0".utf8)
    var segmentBase: LogIndex
    var offset: UInt64
    /// The block that must end the segment after the cut (the records of the cut block below the cut).
    var block: [UInt8]

    func encode() -> [UInt8] {
        var b = TruncateIntent.magic
        b.appendLE(segmentBase)
        b.appendLE(offset)
        b.appendLE(UInt32(block.count))
        b.append(contentsOf: block)
        b.appendLE(CRC32C.checksum(b))
        return b
    }

    static func decode(_ b: [UInt8]) -> TruncateIntent? {
        guard b.count >= 32, Array(b[0..<8]) == magic else { return nil }
        let n = Int(b.loadLE(UInt32.self, at: 24))
        guard b.count == 28 + n + 4, b.loadLE(UInt32.self, at: 28 + n) == CRC32C.checksum(b[0..<(28 + n)]) else { return nil }
        return TruncateIntent(segmentBase: b.loadLE(at: 8), offset: b.loadLE(at: 16), block: Array(b[28..<(28 + n)]))
    }
}

extension SegmentStore {
    /// Removes every record with index >= `index` (Raft's conflicting suffix). Durable when it returns.
    ///
    /// Whole segments are deleted; a segment cut at a block boundary is truncated; a segment cut inside a
    /// block gets that block's kept records rewritten as a new last block, through a truncate intent so
    /// that a crash half way is finished on reopen.
    public func truncateSuffix(from index: LogIndex) throws {
        if let why = failureReason { throw StoreError.failed(why) }
        try finishDeferredSync()
        // Whatever was found damaged from `index` on is gone after this.
        if let d = damagedFrom, d >= index { damagedFrom = nil }
        guard index >= 1 else { throw StoreError.outOfRange(requested: index, first: firstIndex, last: lastIndex) }
        // The fence for the shorter log goes first, synced: after a crash it is never ahead of the log.
        let newLast = min(index - 1, lastIndex)
        // The fence's term is informational (losses are found by index): a damaged block before the cut
        // must not stop the cut.
        let newTerm = newLast == 0 || newLast < firstIndex ? 0 : ((try? term(at: newLast)) ?? 0)
        try guardDisk { try writeFence(Fence(firstIndex: firstIndex, lastIndex: newLast, lastTerm: newTerm), sync: true) }
        guard index <= lastIndex else { return }
        recentBlocks = []
        lastSeqs = [:]
        defer { recentBlocks = [] }
        try guardDisk {
            var removed = false
            while let last = segments.last, last.base >= index {
                last.close()
                try disk.remove(last.dataPath)
                if disk.exists(last.indexPath) { try disk.remove(last.indexPath) }
                segments.removeLast()
                active = nil
                removed = true
            }
            if removed { try disk.syncDirectory(directory) }
            if let seg = segments.last, seg.lastIndex >= index {
                try cut(seg, at: index)
            }
        }
        lastIndex = index - 1
        lastTerm = lastIndex == 0 || lastIndex < firstIndex ? 0 : try term(at: lastIndex)
        lastSeqs = [:]
    }

    private func cut(_ seg: Segment, at index: LogIndex) throws {
        guard let ordinal = blockOrdinal(containing: index, in: seg.blocks) else {
            preconditionFailure("segment \(seg.base) holds index \(index) but no block does")
        }
        let entry = seg.blocks[ordinal]
        var block = [UInt8]()
        let kept = entry.firstIndex < index ? try readBlock(seg, ordinal).filter { $0.index < index } : []
        if !kept.isEmpty { BlockCodec.encode(kept[...], compress: options.compress, into: &block) }

        let intentPath = path(FileNames.intent)
        if !block.isEmpty {
            let f = try disk.open(intentPath, create: true)
            try f.truncate(to: 0)
            try f.write(TruncateIntent(segmentBase: seg.base, offset: entry.offset, block: block).encode(), at: 0)
            try f.sync()
            f.close()
            try disk.syncDirectory(directory)
        }
        try seg.file.truncate(to: entry.offset)
        seg.allocated = entry.offset
        seg.syncedLength = 0
        if !block.isEmpty { try seg.file.write(block, at: entry.offset) }
        try seg.file.sync()
        if !block.isEmpty {
            try disk.remove(intentPath)
            try disk.syncDirectory(directory)
        }

        if seg.sealed != nil {
            // It becomes the active segment again: drop its index file and rebuild the in-memory index
            // from the blocks before the cut (the index file's runs are not kept in memory).
            var builder = SegmentIndexBuilder()
            for b in 0..<ordinal {
                let records = try readBlock(seg, b)
                builder.add(offset: seg.blocks[b].offset, header: try header(of: seg, b), records: records)
            }
            seg.indexSource?.file.close()
            seg.indexSource = nil
            seg.sealed = nil
            try disk.remove(seg.indexPath)
            try disk.syncDirectory(directory)
            seg.builder = builder
        } else {
            seg.builder.truncate(blockCount: ordinal)
        }
        if !kept.isEmpty {
            let h = try BlockHeader.decode(block, file: seg.dataPath, offset: entry.offset)
            seg.builder.add(offset: entry.offset, header: h, records: kept)
        }
        seg.size = entry.offset + UInt64(block.count)
        active = seg
    }

    private func header(of seg: Segment, _ ordinal: Int) throws -> BlockHeader {
        let e = seg.blocks[ordinal]
        return try BlockHeader.decode(try seg.file.read(at: e.offset, count: Layout.blockHeaderBytes), file: seg.dataPath, offset: e.offset)
    }

    /// One segment as retention sees it.
    public struct SegmentSpan: Sendable, Equatable {
        public var base: LogIndex
        /// Last index held (`base - 1` when empty).
        public var lastIndex: LogIndex
        /// Bytes of data in the file.
        public var bytes: UInt64
        public var sealed: Bool
        public init(base: LogIndex, lastIndex: LogIndex, bytes: UInt64, sealed: Bool) {
            self.base = base
            self.lastIndex = lastIndex
            self.bytes = bytes
            self.sealed = sealed
        }
    }

    /// The segments, oldest first.
    public func segmentSpans() -> [SegmentSpan] {
        segments.map { SegmentSpan(base: $0.base, lastIndex: $0.lastIndex, bytes: $0.size, sealed: $0.sealed != nil) }
    }

    /// Seals the active segment now (as if it were full) and starts a new one, so that every entry is in
    /// a sealed file (a catch-up that ships a snapshot needs the files to reach past it). Does nothing
    /// when the active segment is empty.
    public func sealActive() throws {
        if let why = failureReason { throw StoreError.failed(why) }
        try finishDeferredSync()
        guard let seg = active, !seg.isEmpty else { return }
        try guardDisk { try roll(base: lastIndex + 1) }
    }

    /// Retention: deletes whole sealed segments all of whose records have index <= `index`, oldest first.
    /// The active segment is never dropped. Returns how many segments were deleted.
    ///
    /// Before any segment goes, the last seq of each stream in them is merged into `streams.hwm`, made
    /// durable (so `lastSeq(of:)` never goes back, even for a stream none of whose records is left).
    @discardableResult
    public func dropSegments(through index: LogIndex) throws -> Int {
        if let why = failureReason { throw StoreError.failed(why) }
        try finishDeferredSync()
        var dropped = 0
        recentBlocks = []
        var droppable = 0
        while droppable < segments.count - 1, segments[droppable] !== active, segments[droppable].lastIndex <= index { droppable += 1 }
        guard droppable > 0 else { return 0 }
        // The marks of the streams in the segments about to go: durable before the first deletion.
        let marks = marks(adding: segments[0..<droppable])
        try guardDisk {
            try saveHighWater(
                HighWaterFile(shard: options.shard, firstIndex: segments[droppable].base, incomplete: highWaterIncomplete, marks: marks))
        }
        highWater = marks
        // The fence for the shorter log goes first, synced: after a crash it is never ahead of the log.
        try guardDisk {
            try writeFence(Fence(firstIndex: segments[droppable].base, lastIndex: lastIndex, lastTerm: lastTerm), sync: true)
        }
        try guardDisk {
            while dropped < droppable, let first = segments.first {
                first.close()
                try disk.remove(first.dataPath)
                if disk.exists(first.indexPath) { try disk.remove(first.indexPath) }
                segments.removeFirst()
                dropped += 1
            }
            if dropped > 0 { try disk.syncDirectory(directory) }
        }
        if dropped > 0 {
            if let d = damagedFrom, d < firstIndex { damagedFrom = nil }
        }
        return dropped
    }
}
