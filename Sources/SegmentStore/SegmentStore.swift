import SegmentFormat
import WeftCore

/// A shard's log on disk: append-only segment files of LZ4 blocks, a per-stream index, crash recovery.
///
/// Not thread-safe: one owner (the shard's driver) calls it. Layout and recovery rules are in
/// Docs/segment-format.md; when it fsyncs is in Docs/storage.md.
public final class SegmentStore {
    public let directory: String
    public let options: StoreOptions
    let disk: any Disk
    let log: (String) -> Void

    /// Segments in log order; the last one is the active one unless `active` is nil (after a roll is due
    /// or a truncation removed it).
    var segments: [Segment] = []
    var active: Segment?

    public internal(set) var lastIndex: LogIndex = 0
    public internal(set) var lastTerm: Term = 0
    /// Damage found by recovery or by reads, newest last.
    public internal(set) var damage: [FormatError] = []
    /// Lowest index found lost or unreadable, at open or by a read or scrub since (nil: none found).
    /// Nothing from there on can be trusted to be served; the replica repairs the log from it.
    public internal(set) var damagedFrom: LogIndex?
    /// What opening the store found (see `OpenFindings`).
    public internal(set) var findings = OpenFindings()
    var fenceFile: (any DiskFile)?
    /// Next sealed block the scrubber verifies: (segment base, block ordinal).
    var scrubCursor: (base: LogIndex, block: Int) = (0, 0)
    private var failure: String?
    var failureReason: String? { failure }
    /// The most recently decoded blocks of the active segment (newest last): Raft reads back what it just
    /// wrote (to send, to apply), and decodes each block once. Sealed segments are always read and
    /// verified from disk.
    /// Cleared whenever blocks can change under the same offset (truncation, retention, index repair).
    var recentBlocks: [(base: LogIndex, offset: UInt64, records: [Record])] = []
    static let recentBlocksMax = 8
    private var batchesSinceSync = 0
    /// Appends written with `deferSync` and not yet durable.
    var deferred: DeferredSync?
    /// The device this store's files can share a flush on (`Disk.flushDomain`), nil: never shared.
    public private(set) var flushDomain: UInt64?
    /// stream -> its last seq among records retention dropped (`streams.hwm`; see HighWater.swift).
    var highWater: [StreamID: StreamSeq] = [:]
    /// Marks of some dropped records are unknown (found at open); written into the file as `incomplete`.
    var highWaterIncomplete = false

    /// Streams' last seqs held, as `lastSeq(of:)` found them or appends set them (filled on demand: one
    /// entry per stream written or asked about since the store opened; emptied when entries are cut).
    var lastSeqs: [StreamID: StreamSeq] = [:]

    /// Index of the oldest record held (lastIndex + 1 when empty).
    public var firstIndex: LogIndex { segments.first(where: { !$0.isEmpty })?.base ?? lastIndex + 1 }
    public var segmentCount: Int { segments.count }

    /// The file system this store lives on.
    public var fileSystem: any Disk { disk }

    /// Last index of the last sealed segment (0 if none): the prefix that can be shipped as whole files.
    public var sealedLastIndex: LogIndex { segments.last(where: { $0.sealed != nil })?.lastIndex ?? 0 }

    /// The files of the sealed segments, oldest first, each segment's data then its index:
    /// (file name, path). They never change once sealed, so they can be copied while the store runs.
    /// When retention dropped segments, `streams.hwm` comes first: the last seqs of streams whose
    /// records were all dropped, which a replica installing these files needs to number those streams
    /// on (it is replaced by a rename, never rewritten in place, so an open copy stays whole).
    public func sealedFiles() -> [(name: String, path: String)] {
        var out: [(String, String)] = []
        if disk.exists(highWaterPath) { out.append((FileNames.highWater, highWaterPath)) }
        for seg in segments where seg.sealed != nil {
            out.append((FileNames.segment(seg.base), seg.dataPath))
            out.append((FileNames.index(seg.base), seg.indexPath))
        }
        return out
    }

    // MARK: Open and recovery

    /// Opens (creating if needed) the store in `directory` and recovers it: finishes an interrupted
    /// truncation, loads sealed segments' index files (rebuilding any that is missing or damaged), and
    /// scans the last segment, cutting a torn tail back to the last whole block.
    public init(
        directory: String, options: StoreOptions = StoreOptions(), disk: any Disk = PosixDisk(),
        log: @escaping (String) -> Void = { _ in }
    ) throws {
        self.directory = directory
        self.options = options
        self.disk = disk
        self.log = log
        do {
            try disk.makeDirectory(directory)
            flushDomain = disk.flushDomain(directory)
            try recover()
        } catch let e as DiskError {
            throw StoreError.disk(e)
        } catch let e as FormatError {
            throw StoreError.corrupt(e)
        }
    }

    func path(_ name: String) -> String { directory + "/" + name }

    private func recover() throws {
        // A log being set aside when the process stopped: finish moving it (Fence.swift).
        if disk.exists(path(FileNames.asideIntent)) {
            log("\(path(FileNames.asideIntent)): finishing an interrupted set-aside of the log")
            try Self.finishSetAside(in: directory, disk: disk)
        }
        let names = try disk.list(directory)
        for name in names where name.hasSuffix(".tmp") {
            try disk.remove(path(name))
        }
        if names.contains(FileNames.intent) { try finishTruncation() }
        let fence = readFence()
        let highWaterFile = try loadHighWater()
        let bases = try disk.list(directory).compactMap(FileNames.segmentBase).sorted()
        for (k, base) in bases.enumerated() {
            let isLast = k == bases.count - 1
            let dataPath = path(FileNames.segment(base))
            let file = try disk.open(dataPath, create: false)
            let seg = Segment(base: base, dataPath: dataPath, indexPath: path(FileNames.index(base)), file: file, size: try file.size())
            if let prev = segments.last, !prev.isEmpty, prev.lastIndex + 1 != base {
                // The previous segment lost its last records (damage at its end): it ends early.
                file.close()
                let note = "\(dataPath): previous segment ends at index \(prev.lastIndex), this one starts at \(base); moving it and later segments to \(FileNames.quarantine)/"
                log(note)
                findings.notes.append(note)
                try quarantine(Array(bases[k...]))
                noteDamage(at: prev.lastIndex + 1)
                break
            }
            // A segment of another shard is a configuration mistake, not damage: refuse to open.
            if let h = try? SegmentHeader.decode(try file.read(at: 0, count: Layout.segmentHeaderBytes)), h.shard != options.shard {
                file.close()
                throw StoreError.corrupt(
                    FormatError(.mismatch, file: dataPath, offset: 0, "segment belongs to shard \(h.shard); this store is shard \(options.shard)"))
            }
            do {
                if isLast {
                    if seg.size <= UInt64(Layout.segmentHeaderBytes),
                        (try? SegmentHeader.decode(try file.read(at: 0, count: Layout.segmentHeaderBytes))) == nil
                    {
                        // A roll that crashed before its header was durable: the file never held records.
                        log("\(dataPath): removing segment with incomplete header (\(seg.size) bytes)")
                        file.close()
                        try disk.remove(dataPath)
                        try disk.syncDirectory(directory)
                        continue
                    }
                    if disk.exists(seg.indexPath) {
                        // The last segment is the one appended to; its index lives in memory until sealed.
                        try disk.remove(seg.indexPath)
                        try disk.syncDirectory(directory)
                    }
                    seg.builder = try scan(seg, expectedEnd: nil)
                    active = seg
                } else {
                    let nextBase = bases[k + 1]
                    if !(try loadIndex(seg)) {
                        seg.builder = try scan(seg, expectedEnd: nextBase - 1)
                        try seal(seg)
                    }
                }
            } catch let e as FormatError {
                // A segment that cannot be read as one (damaged header, blocks out of order): the log
                // ends before it; it and the segments after it are moved aside.
                file.close()
                damage.append(e)
                let note = "\(e); moving this and later segments to \(FileNames.quarantine)/"
                log(note)
                findings.notes.append(note)
                try quarantine(Array(bases[k...]))
                noteDamage(at: base)
                break
            }
            segments.append(seg)
        }
        if let last = segments.last(where: { !$0.isEmpty }) {
            lastIndex = last.lastIndex
        } else if let first = segments.first {
            lastIndex = first.base - 1
        }
        lastTerm = lastIndex == 0 ? 0 : ((try? term(at: lastIndex)) ?? 0)
        checkFence(fence)
        checkHighWater(highWaterFile, fence: fence)
        findings.damagedFrom = damagedFrom
        if damagedFrom == nil && !findings.tailUnverified { try writeFence(sync: true) }
        // What recovery found may not be durable: a write or a file creation whose sync failed before the
        // restart. Later appends sync only the active file's data, so make both the data and the directory
        // durable now, before anything new is acknowledged on top of them.
        try active?.file.sync()
        try disk.syncDirectory(directory)
    }

    /// Moves segment and index files out of the log into the quarantine directory.
    private func quarantine(_ bases: [LogIndex]) throws {
        let q = path(FileNames.quarantine)
        try disk.makeDirectory(q)
        for b in bases {
            for name in [FileNames.segment(b), FileNames.index(b)] where disk.exists(path(name)) {
                try disk.rename(path(name), to: q + "/" + name)
            }
        }
        try disk.syncDirectory(q)
        try disk.syncDirectory(directory)
    }

    /// Compares the recovered log with the fence written by the last run (see `Fence`).
    private func checkFence(_ fence: Fence?) {
        guard let fence else {
            if lastIndex > 0 {
                findings.tailUnverified = true
                let note = "\(fencePath): missing or damaged; cannot tell whether records were lost at the tail"
                log(note)
                findings.notes.append(note)
            }
            return
        }
        if lastIndex < fence.lastIndex {
            let note = "\(directory): log ends at index \(lastIndex) but the fence says \(fence.lastIndex): records \(lastIndex + 1)...\(fence.lastIndex) are lost"
            log(note)
            findings.notes.append(note)
            noteDamage(at: lastIndex + 1)
        }
        if fence.lastIndex >= fence.firstIndex, firstIndex > fence.firstIndex {
            let note = "\(directory): log starts at index \(firstIndex) but the fence says \(fence.firstIndex): the first segment(s) are lost"
            log(note)
            findings.notes.append(note)
            noteDamage(at: fence.firstIndex)
        }
    }

    /// Opens a sealed segment's index file; false (after logging why) when it must be rebuilt.
    private func loadIndex(_ seg: Segment) throws -> Bool {
        guard disk.exists(seg.indexPath) else {
            log("\(seg.indexPath): index file missing; rebuilding from \(seg.dataPath)")
            return false
        }
        let f = try disk.open(seg.indexPath, create: false)
        do {
            let src = try FileByteSource(f)
            let idx = try SegmentIndexFile.open(src)
            guard idx.baseIndex == seg.base, idx.segmentBytes == seg.size, idx.shard == options.shard else {
                throw FormatError(
                    .mismatch, file: seg.indexPath, offset: 0,
                    "index describes base \(idx.baseIndex), \(idx.segmentBytes) bytes, shard \(idx.shard); segment has base \(seg.base), \(seg.size) bytes, shard \(options.shard)")
            }
            // Runs are checked chunk by chunk when a read reaches them (reading them all here would make
            // opening a large shard read every index in full); a damaged chunk makes that read rebuild
            // this index from the data (`repairingIndex`).
            seg.sealed = idx
            seg.indexSource = src
            return true
        } catch let e as FormatError {
            f.close()
            damage.append(e)
            log("\(e); rebuilding index from \(seg.dataPath)")
            return false
        }
    }

    /// Reads every block of a segment and builds its index. Damage followed by valid blocks becomes an
    /// unreadable entry in the block table; damage that reaches the end of the last segment is a torn
    /// write and is cut off; in a sealed segment it is an unreadable entry up to `expectedEnd`.
    func scan(_ seg: Segment, expectedEnd: LogIndex?) throws -> SegmentIndexBuilder {
        var scanner = try SegmentScanner(FileByteSource(seg.file, size: seg.size))
        guard scanner.header.baseIndex == seg.base, scanner.header.shard == options.shard else {
            throw FormatError(
                .mismatch, file: seg.dataPath, offset: 16,
                "header says shard \(scanner.header.shard) base \(scanner.header.baseIndex), expected shard \(options.shard) base \(seg.base)")
        }
        var builder = SegmentIndexBuilder()
        var expected = seg.base
        var end = UInt64(Layout.segmentHeaderBytes)
        while true {
            let at = scanner.offset
            guard let item = try scanner.next() else { break }
            switch item {
            case .block(let b):
                guard b.header.firstIndex == expected else {
                    throw FormatError(.mismatch, file: seg.dataPath, offset: at, "block starts at index \(b.header.firstIndex), expected \(expected)")
                }
                builder.add(offset: at, header: b.header, records: try b.records(file: seg.dataPath))
                expected = b.header.lastIndex + 1
                end = at + UInt64(b.bytes.count)
            case .damaged(let err, let resume):
                let reported = err.inFile(seg.dataPath)
                if let resume {
                    damage.append(reported)
                    noteDamage(at: expected)
                    findings.notes.append("\(reported): records from index \(expected) are unreadable")
                    log("\(reported); records up to the next valid block at offset \(resume) are unreadable")
                    let next = try scanner.readBlock(at: resume).header.firstIndex
                    // The records between are one unreadable entry, whose count is a u32: a block further
                    // ahead than that does not continue this segment (as one that goes backwards).
                    guard next >= expected, next - expected <= UInt64(UInt32.max) else {
                        throw FormatError(
                            .mismatch, file: seg.dataPath, offset: resume,
                            "block starts at index \(next), expected \(expected) or at most \(UInt32.max) records later")
                    }
                    if let count = UInt32(exactly: next - expected), count > 0 {
                        builder.addUnreadable(
                            offset: at, firstIndex: expected, count: count, storedBytes: unreadableBytes(from: at, to: resume))
                        expected = next
                    }
                    end = resume
                } else if let expectedEnd {
                    damage.append(reported)
                    if expectedEnd >= expected {
                        noteDamage(at: expected)
                        // One unreadable entry (a u32 count) up to the next segment's base. A base further
                        // away than that cannot be this segment's end: the segment ends with its last valid
                        // block, and the next one is found not to continue it (a hole).
                        if let count = UInt32(exactly: expectedEnd - expected + 1) {
                            findings.notes.append("\(reported): records \(expected)...\(expectedEnd) are unreadable")
                            builder.addUnreadable(
                                offset: at, firstIndex: expected, count: count, storedBytes: unreadableBytes(from: at, to: seg.size))
                        } else {
                            findings.notes.append("\(reported): records from \(expected) are unreadable; the next segment's base \(expectedEnd + 1) is too far to continue this one")
                        }
                    }
                    log("\(reported); records \(expected)...\(expectedEnd) are unreadable")
                    end = seg.size
                } else {
                    // Zeros to the end are space written ahead (`preallocateBytes`), or a tail whose
                    // data never reached the disk: nothing was there to lose. Anything else is a torn write.
                    if try !scanner.isZero(from: at) {
                        log("\(reported); torn write at the tail: cutting \(seg.size - at) bytes")
                    }
                    try seg.file.truncate(to: at)
                    try seg.file.sync()
                    end = at
                }
            }
        }
        seg.size = end
        seg.allocated = end
        return builder
    }

    /// Bytes of a damaged region `from ..< to` past its (unreadable) block header, as an unreadable
    /// entry's stored bytes (a u32: clamped; a read of the entry fails its checks anyway).
    private func unreadableBytes(from: UInt64, to: UInt64) -> UInt32 {
        let header = UInt64(Layout.blockHeaderBytes)
        return to > from && to - from > header ? UInt32(clamping: to - from - header) : 0
    }

    /// Completes a partial-block truncation that was interrupted by a crash (see `truncateSuffix`).
    private func finishTruncation() throws {
        let p = path(FileNames.intent)
        let f = try disk.open(p, create: false)
        let bytes = try f.read(at: 0, count: Int(min(try f.size(), UInt64(Limits.blockRawBytesMax * 2))))
        f.close()
        if let intent = TruncateIntent.decode(bytes) {
            let segPath = path(FileNames.segment(intent.segmentBase))
            // Its checksum is right, but what it names is checked before anything is cut: an intent is
            // only written for an existing segment, to cut at a block offset (the file is never shorter
            // than that after a crash), with a whole block to put there.
            let seg = disk.exists(segPath) ? try disk.open(segPath, create: false) : nil
            let size = try seg?.size() ?? 0
            var problem: FormatError?
            if seg == nil {
                problem = FormatError(.mismatch, file: p, offset: 8, "names segment \(intent.segmentBase), which does not exist")
            } else if intent.offset < UInt64(Layout.segmentHeaderBytes) || intent.offset > size {
                problem = FormatError(.mismatch, file: p, offset: 16, "cut at offset \(intent.offset) is outside \(segPath) (\(size) bytes)")
            } else if let e = Self.wholeBlockProblem(intent.block, file: p, offset: 28) {
                problem = e
            }
            if let seg, problem == nil {
                try seg.truncate(to: intent.offset)
                try seg.write(intent.block, at: intent.offset)
                try seg.sync()
                log("\(p): finished an interrupted truncation of segment \(intent.segmentBase) at offset \(intent.offset)")
            }
            seg?.close()
            if let problem {
                damage.append(problem)
                let note = "\(problem); not replayed"
                log(note)
                findings.notes.append(note)
            }
        } else {
            // Not durable before the crash, so the truncation never started.
            log("\(p): incomplete intent, truncation had not started")
        }
        try disk.remove(p)
        try disk.syncDirectory(directory)
    }

    /// Why `bytes` are not exactly one valid block (nil when they are).
    static func wholeBlockProblem(_ bytes: [UInt8], file: String, offset: UInt64) -> FormatError? {
        do {
            let h = try bytes.withUnsafeBytes { try BlockCodec.verify($0, file: file, offset: offset) }
            guard h.totalBytes == bytes.count else {
                return FormatError(.mismatch, file: file, offset: offset, "\(bytes.count) bytes hold a block of \(h.totalBytes)")
            }
            return nil
        } catch let e as FormatError {
            return e
        } catch {
            return FormatError(.mismatch, file: file, offset: offset, "\(error)")
        }
    }

    /// The segments holding a stream's records, in log order: a binary search in each segment's stream
    /// table (sealed: the `.idx` file's, in memory; active: the builder's). Found on demand rather than
    /// kept in a per-stream directory: with a stream per user such a directory holds an entry per
    /// (stream, segment), costs memory for every stream ever written, and rebuilding it made opening a
    /// shard of a million streams take seconds (issue 10's restart target).
    func spans(of stream: StreamID) -> [StreamSpan] {
        segments.compactMap { seg in seg.streamSummary(stream).map { StreamSpan(segmentBase: seg.base, firstSeq: $0.firstSeq, lastSeq: $0.lastSeq) } }
    }

    /// The lowest seq of `stream` this log can still serve: the first one its files hold, or, when
    /// retention dropped every record of the stream, the one after the last dropped (1 for a stream
    /// never written). Seqs below it were dropped by retention (or were never in files this replica
    /// took from another: a catch-up that starts past a snapshot).
    public func streamFloor(_ stream: StreamID) -> StreamSeq {
        if firstIndex <= 1 && highWater.isEmpty { return 1 }
        for seg in segments {
            if let s = seg.streamSummary(stream) { return s.firstSeq }
        }
        return lastSeq(of: stream) &+ 1
    }

    // MARK: Append

    /// The last seq a stream has had in this log (0 if none): of its records held, or of those retention
    /// dropped (`streams.hwm`), whichever is higher. The next record of the stream must be this + 1.
    public func lastSeq(of stream: StreamID) -> StreamSeq {
        if let known = lastSeqs[stream] { return max(known, highWater[stream] ?? 0) }
        // Newest segment first: a stream written lately is found in the active one. The answer is kept
        // (appends keep it current), so a stream costs this search once per open, not per record.
        var held: StreamSeq = 0
        for seg in segments.reversed() {
            if let s = seg.streamSummary(stream) {
                held = s.lastSeq
                break
            }
        }
        lastSeqs[stream] = held
        return max(held, highWater[stream] ?? 0)
    }

    /// Appends a batch: one write and, under `.everyBatch`, one fdatasync; returns when the batch is as
    /// durable as the policy promises. Records must continue the log's indexes, not lower its term, and
    /// continue each stream's dense sequence (a stream's first record in the log may start at any seq).
    ///
    /// `deferSync` (under `.everyBatch` only): the batch is written but not synced, and the store owes
    /// a sync (`syncPending`) until `finishDeferredSync()`; in between, `syncTogether` can make several
    /// stores' batches durable with one device flush. Nothing may count the batch durable before
    /// `finishDeferredSync()` returns. The tail fence is written then, after the data is durable.
    public func append(_ batch: [Record], deferSync: Bool = false) throws {
        if let failure { throw StoreError.failed(failure) }
        let defer_ = deferSync && options.durability == .everyBatch
        if !defer_ { try finishDeferredSync() }
        guard !batch.isEmpty else { throw StoreError.invalidBatch("empty batch") }
        guard batch.count <= Limits.appendBatchCountMax else {
            throw StoreError.invalidBatch("\(batch.count) records, limit \(Limits.appendBatchCountMax)")
        }
        try validate(batch)

        if active == nil || active!.size >= options.segmentBytesMax || (active!.isEmpty && active!.base != batch[0].index)
            || active!.lastIndex + 1 - active!.base >= options.segmentRecordsMax
        {
            try wrapDisk { try roll(base: batch[0].index) }
        }
        guard let seg = active else { preconditionFailure("roll leaves an active segment") }
        // Deferred appends in a segment the roll above sealed were synced by the seal.
        if let d = deferred, d.segment !== seg { deferred = DeferredSync(segment: seg, from: seg.size, to: seg.size, ownSync: true) }

        var bytes = [UInt8]()
        var blocks: [(offset: Int, range: Range<Int>)] = []
        var start = 0
        var raw = 0
        for k in batch.indices {
            let n = RecordCodec.encodedBytes(batch[k])
            if k > start && raw + n > options.blockBytesTarget {
                blocks.append((bytes.count, start..<k))
                BlockCodec.encode(batch[start..<k], compress: options.compress, into: &bytes)
                start = k
                raw = 0
            }
            raw += n
        }
        blocks.append((bytes.count, start..<batch.count))
        BlockCodec.encode(batch[start...], compress: options.compress, into: &bytes)

        let writeOffset = seg.size
        do {
            try seg.file.write(bytes, at: seg.size)
            let end = seg.size + UInt64(bytes.count)
            if options.preallocateBytes > 0, !zerosAheadFailed, end > seg.allocated {
                // Past the data just written, never over it (see `Segment.allocated`).
                let target = max(end, min(end + options.preallocateBytes, options.segmentBytesMax))
                do {
                    if target > end { try Self.writeZeros(seg.file, from: end, to: target) }
                    seg.allocated = target
                } catch {
                    // Only an optimisation, past the data: a disk that refuses it (full) fails the next
                    // append, not this one. Part of the zeros may be in the file (a short write): the
                    // file's length, not the data's end, is what a seal must cut back to the data.
                    seg.allocated = max(end, (try? seg.file.size()) ?? target)
                    zerosAheadFailed = true
                    log("\(seg.dataPath): writing zeros ahead of the data failed (\(error)); appending without them until the store reopens")
                }
            }
            batchesSinceSync += 1
            switch options.durability {
            case .everyBatch where defer_:
                // Owed: the range written, and whether it can share a device flush (it lies inside the
                // length this file was last synced at) or needs its own fdatasync (the file grew).
                let from = min(writeOffset, deferred?.from ?? writeOffset)
                let to = seg.size + UInt64(bytes.count)
                let own = (deferred?.ownSync ?? false) || seg.allocated > seg.syncedLength || to > seg.syncedLength
                deferred = DeferredSync(segment: seg, from: from, to: to, ownSync: own)
            case .everyBatch:
                try seg.syncFile(holding: seg.size + UInt64(bytes.count))
                batchesSinceSync = 0
            case .everyBatches(let n) where batchesSinceSync >= n:
                try seg.file.sync()
                batchesSinceSync = 0
            default:
                break
            }
        } catch let e as DiskError {
            failure = e.description
            throw StoreError.disk(e)
        }

        for (offset, range) in blocks {
            let header = try bytes.withUnsafeBytes {
                try BlockHeader.decode(UnsafeRawBufferPointer(rebasing: $0[offset...]), offset: seg.size + UInt64(offset))
            }
            seg.builder.add(offset: seg.size + UInt64(offset), header: header, records: batch[range])
        }
        seg.size += UInt64(bytes.count)
        for r in batch where r.stream != .none { lastSeqs[r.stream] = r.seq }
        lastIndex = batch[batch.count - 1].index
        lastTerm = batch[batch.count - 1].term
        // The fence follows durable data only: a deferred batch's comes with `finishDeferredSync`.
        if deferred == nil { try wrapDisk { try writeFence() } }
    }

    /// A deferred append's sync, owed until `finishDeferredSync` (see `append(_:deferSync:)`).
    struct DeferredSync {
        let segment: Segment
        var from: UInt64
        var to: UInt64
        /// The file grew past the length it was last synced at: its size or block map is not durable, so
        /// only its own fdatasync makes the data durable.
        var ownSync: Bool
        /// Set by `syncTogether` once the data is durable; `shared`: by another file's fdatasync.
        var durable = false
        var shared = false
    }

    /// Whether appends made with `deferSync` still wait for `finishDeferredSync`.
    public var syncPending: Bool { deferred != nil }

    /// Completes the deferred appends: syncs them unless `syncTogether` already made them durable, then
    /// writes the tail fence. No-op when nothing is owed. A failure stops the store (`failed`). Returns
    /// whether another file's fdatasync made them durable (a shared flush), not one of their own.
    @discardableResult
    public func finishDeferredSync() throws -> Bool {
        guard let d = deferred else { return false }
        if let failure { throw StoreError.failed(failure) }
        do {
            if !d.durable { try d.segment.syncFile(holding: d.segment.size) }
            batchesSinceSync = 0
        } catch let e as DiskError {
            failure = e.description
            throw StoreError.disk(e)
        }
        deferred = nil
        try wrapDisk { try writeFence() }
        return d.shared
    }

    /// Makes the deferred appends of several stores durable with one device flush per device instead of
    /// one fdatasync each (Docs/storage.md, "Shared flushes"). Per device (`flushDomain`; a store without
    /// one is left to sync itself): the owed ranges of the files that can share are written back (all
    /// started, then each waited for), then each file that needs its own fdatasync gets one (at least
    /// one file does: the last of the others, if none needs it), and that fdatasync's device flush covers
    /// every write-back completed before it. A failed write-back or fdatasync fails its store (as a
    /// failed fdatasync always does: the kernel may have dropped the pages). A store is marked durable
    /// only if an fdatasync after its write-back succeeded; otherwise `finishDeferredSync` syncs it.
    /// Each store must then call `finishDeferredSync()`, which writes its fence.
    public static func syncTogether(_ stores: [SegmentStore]) {
        let owing = stores.filter { s in s.failure == nil && s.flushDomain != nil && s.deferred.map { !$0.durable } ?? false }
        var devices: [UInt64: [SegmentStore]] = [:]
        for s in owing {
            if let d = s.flushDomain { devices[d, default: []].append(s) }
        }
        for group in devices.values where group.count > 1 { flushTogether(group) }
    }

    private static func flushTogether(_ group: [SegmentStore]) {
        var shared = group.filter { $0.deferred.map { !$0.ownSync } ?? false }
        var own = group.filter { $0.deferred?.ownSync ?? false }
        if own.isEmpty, let last = shared.popLast() { own = [last] }
        func fail(_ s: SegmentStore, _ error: any Error) { s.failure = "\(error)" }
        for s in shared {
            guard let d = s.deferred else { continue }
            do { try d.segment.file.startWriteBack(offset: d.from, count: d.to - d.from) } catch { fail(s, error) }
        }
        for s in shared where s.failure == nil {
            guard let d = s.deferred else { continue }
            do { try d.segment.file.writeBack(offset: d.from, count: d.to - d.from) } catch { fail(s, error) }
        }
        var flushed = false
        for s in own {
            guard var d = s.deferred else { continue }
            do {
                try d.segment.syncFile(holding: d.segment.size)
                d.durable = true
                s.deferred = d
                flushed = true
            } catch {
                fail(s, error)
            }
        }
        guard flushed else { return }
        for s in shared where s.failure == nil {
            s.deferred?.durable = true
            s.deferred?.shared = true
        }
    }

    private func validate(_ batch: [Record]) throws {
        let first = batch[0].index
        if lastIndex == 0 && segments.allSatisfy(\.isEmpty) {
            guard first >= 1 else { throw StoreError.nonContiguous(expected: 1, got: first) }
        } else if first != lastIndex + 1 {
            throw StoreError.nonContiguous(expected: lastIndex + 1, got: first)
        }
        var term = lastTerm
        var pending: [StreamID: StreamSeq] = [:]
        for (k, r) in batch.enumerated() {
            guard r.index == first + UInt64(k) else { throw StoreError.nonContiguous(expected: first + UInt64(k), got: r.index) }
            guard r.term >= term else { throw StoreError.termRegressed(index: r.index, term: r.term, previous: term) }
            term = r.term
            guard r.payload.count <= Limits.recordPayloadBytesMax else {
                throw StoreError.invalidBatch("record \(r.index): payload of \(r.payload.count) bytes, limit \(Limits.recordPayloadBytesMax)")
            }
            if r.stream == .none {
                guard r.seq == 0 else { throw StoreError.streamSequence(stream: r.stream, expected: 0, got: r.seq) }
                continue
            }
            let last = pending[r.stream] ?? lastSeq(of: r.stream)
            // Seq 2^64-1 is never appended: no seq could follow it. (A stream read from a crafted file
            // may end there; then nothing can be appended to it.)
            guard last < StreamSeq.max, r.seq < StreamSeq.max, last == 0 ? r.seq >= 1 : r.seq == last + 1 else {
                throw StoreError.streamSequence(stream: r.stream, expected: last == 0 ? 1 : (last == .max ? .max : last + 1), got: r.seq)
            }
            pending[r.stream] = r.seq
        }
    }

    /// Seals the active segment (if any) and starts a new one whose first record will be `base`.
    func roll(base: LogIndex) throws {
        if let seg = active {
            if seg.isEmpty {
                // Nothing was ever appended to it (its base no longer fits): replace it.
                seg.close()
                try disk.remove(seg.dataPath)
                segments.removeLast()
            } else {
                try seal(seg)
            }
            active = nil
        }
        let dataPath = path(FileNames.segment(base))
        let file = try disk.open(dataPath, create: true)
        try file.truncate(to: 0)
        try file.write(SegmentHeader(shard: options.shard, baseIndex: base).encode(), at: 0)
        try file.sync()
        try disk.syncDirectory(directory)
        let seg = Segment(
            base: base, dataPath: dataPath, indexPath: path(FileNames.index(base)), file: file,
            size: UInt64(Layout.segmentHeaderBytes))
        segments.append(seg)
        active = seg
    }

    static let zeros = [UInt8](repeating: 0, count: 1 << 20)
    /// Writing zeros ahead failed once (a full disk): not tried again until the store reopens.
    var zerosAheadFailed = false

    static func writeZeros(_ file: any DiskFile, from: UInt64, to: UInt64) throws {
        var at = from
        while at < to {
            let n = Int(min(to - at, UInt64(zeros.count)))
            try file.write(n == zeros.count ? zeros : Array(zeros[0..<n]), at: at)
            at += UInt64(n)
        }
    }

    /// Makes a segment read-only: cuts the zeros written ahead, syncs its data, writes its index file
    /// (tmp, fsync, rename, fsync dir).
    func seal(_ seg: Segment) throws {
        if seg.allocated > seg.size {
            try seg.file.truncate(to: seg.size)
            seg.allocated = seg.size
        }
        try seg.file.sync()
        let bytes = seg.builder.encode(shard: options.shard, baseIndex: seg.base, segmentBytes: seg.size)
        let tmp = seg.indexPath + ".tmp"
        let f = try disk.open(tmp, create: true)
        try f.truncate(to: 0)
        try f.write(bytes, at: 0)
        try f.sync()
        f.close()
        try disk.rename(tmp, to: seg.indexPath)
        try disk.syncDirectory(directory)
        let idxFile = try disk.open(seg.indexPath, create: false)
        let src = FileByteSource(idxFile, size: UInt64(bytes.count))
        seg.sealed = try SegmentIndexFile.open(src)
        seg.indexSource = src
        seg.builder = SegmentIndexBuilder()
    }

    /// Makes every append so far durable, whatever the policy.
    public func sync() throws {
        if let failure { throw StoreError.failed(failure) }
        try finishDeferredSync()
        do {
            try active?.file.sync()
            batchesSinceSync = 0
        } catch let e as DiskError {
            failure = e.description
            throw StoreError.disk(e)
        }
    }

    public func close() {
        // What was deferred and not finished was never acknowledged; its fence is not written.
        deferred = nil
        // The zeros written ahead go (best effort, not synced: a crash before the cut leaves them, and
        // the next open cuts them).
        if failure == nil, let a = active, a.allocated > a.size, (try? a.file.truncate(to: a.size)) != nil { a.allocated = a.size }
        fenceFile?.close()
        fenceFile = nil
        for s in segments { s.close() }
        segments = []
        active = nil
    }

    deinit { close() }

    /// Runs a file-system step; a disk error stops the store.
    func guardDisk<T>(_ body: () throws -> T) throws -> T { try wrapDisk(body) }

    private func wrapDisk<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as DiskError {
            failure = e.description
            throw StoreError.disk(e)
        } catch let e as FormatError {
            throw StoreError.corrupt(e)
        }
    }
}

// MARK: - Reads

extension SegmentStore {
    /// The segment holding `index`, by binary search on base indexes.
    func segment(containing index: LogIndex) -> Segment? {
        var lo = 0
        var hi = segments.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if segments[mid].lastIndex < index { lo = mid + 1 } else { hi = mid }
        }
        guard lo < segments.count, segments[lo].base <= index, index <= segments[lo].lastIndex else { return nil }
        return segments[lo]
    }

    func segment(base: LogIndex) -> Segment? {
        var lo = 0
        var hi = segments.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if segments[mid].base < base { lo = mid + 1 } else { hi = mid }
        }
        return lo < segments.count && segments[lo].base == base ? segments[lo] : nil
    }

    /// Reads, verifies and decodes one block. Damage is recorded and thrown, never returned as data.
    func readBlock(_ seg: Segment, _ ordinal: Int) throws -> [Record] {
        let blocks = seg.blocks
        guard ordinal >= 0, ordinal < blocks.count else {
            throw StoreError.corrupt(FormatError(.mismatch, file: seg.indexPath, offset: 0, "run points at block \(ordinal) of \(blocks.count)"))
        }
        let e = blocks[ordinal]
        if let hit = recentBlocks.last(where: { $0.base == seg.base && $0.offset == e.offset }),
            hit.records.first?.index == e.firstIndex, hit.records.count == Int(e.count)
        {
            return hit.records
        }
        do {
            let bytes = try seg.file.read(at: e.offset, count: Layout.blockHeaderBytes + Int(e.storedBytes))
            let (h, records) = try BlockCodec.decode(bytes, file: seg.dataPath, offset: e.offset)
            guard h.firstIndex == e.firstIndex, h.count == e.count else {
                throw FormatError(
                    .mismatch, file: seg.dataPath, offset: e.offset,
                    "block holds \(h.firstIndex)+\(h.count), index says \(e.firstIndex)+\(e.count)")
            }
            if seg === active {
                if recentBlocks.count >= Self.recentBlocksMax { recentBlocks.removeFirst() }
                recentBlocks.append((seg.base, e.offset, records))
            }
            return records
        } catch let err as FormatError {
            if !damage.contains(err) { damage.append(err) }
            noteDamage(at: e.firstIndex)
            log("\(err)")
            throw StoreError.corrupt(err)
        } catch let err as DiskError {
            throw StoreError.disk(err)
        }
    }

    /// Records with indexes in `from...to` (clamped to what the log holds), at most `limit` of them.
    public func read(from: LogIndex, to: LogIndex, limit: Int = Int.max) throws -> [Record] {
        guard from <= to, from <= lastIndex, limit > 0 else { return [] }
        guard from >= firstIndex else { throw StoreError.outOfRange(requested: from, first: firstIndex, last: lastIndex) }
        var out = [Record]()
        var next = from
        let end = min(to, lastIndex)
        while next <= end && out.count < limit {
            guard let seg = segment(containing: next), let b = blockOrdinal(containing: next, in: seg.blocks) else {
                throw StoreError.outOfRange(requested: next, first: firstIndex, last: lastIndex)
            }
            for r in try readBlock(seg, b) where r.index >= next && r.index <= end {
                out.append(r)
                if out.count == limit { break }
            }
            next = seg.blocks[b].lastIndex + 1
        }
        return out
    }

    /// The term of the record at `index` (0 for index 0).
    public func term(at index: LogIndex) throws -> Term {
        if index == 0 { return 0 }
        guard let r = try read(from: index, to: index).first else {
            throw StoreError.outOfRange(requested: index, first: firstIndex, last: lastIndex)
        }
        return r.term
    }

    /// Up to `limit` records of `stream` with seq >= `fromSeq`, in ascending seq order.
    /// Cost: a binary search in each segment's stream table, one over the stream's runs, then one block read per run touched.
    /// A hole in the stream's dense sequence (records lost to damage) is an error, never skipped.
    public func readStream(_ stream: StreamID, fromSeq: StreamSeq, limit: Int) throws -> [Record] {
        try repairingIndex { try readStreamOnce(stream, fromSeq: fromSeq, limit: limit) }
    }

    /// Up to `limit` records of `stream` with seq < `beforeSeq` (all when nil), newest first.
    public func readStreamBackward(_ stream: StreamID, beforeSeq: StreamSeq? = nil, limit: Int) throws -> [Record] {
        try repairingIndex { try readStreamBackwardOnce(stream, beforeSeq: beforeSeq, limit: limit) }
    }

    /// Runs a stream read; if it failed on a sealed segment's damaged index file, rebuilds that index from
    /// the segment's data (logged, and kept in `damage`) and runs the read again.
    func repairingIndex<T>(_ read: () throws -> T) throws -> T {
        do {
            return try read()
        } catch StoreError.corrupt(let e) {
            guard let seg = segments.first(where: { $0.sealed != nil && $0.indexPath == e.file }) else { throw StoreError.corrupt(e) }
            log("\(e); rebuilding index from \(seg.dataPath)")
            let end = seg.lastIndex
            recentBlocks = []
            try guardDisk {
                seg.indexSource?.file.close()
                seg.indexSource = nil
                seg.sealed = nil
                seg.builder = try scan(seg, expectedEnd: end)
                try seal(seg)
            }
            return try read()
        }
    }

    func readStreamOnce(_ stream: StreamID, fromSeq: StreamSeq, limit: Int) throws -> [Record] {
        let list = spans(of: stream)
        guard limit > 0, let top = list.last?.lastSeq else { return [] }
        var out = [Record]()
        var i = lowerBound(list.count) { list[$0].lastSeq < fromSeq }
        var want = max(fromSeq, list.first?.firstSeq ?? fromSeq)
        // Seqs come from files: the one after 2^64-1 does not exist (`end`), it must not overflow.
        var end = false
        while i < list.count && out.count < limit && !end {
            guard let seg = segment(base: list[i].segmentBase), var runs = seg.runs(stream) else { i += 1; continue }
            var j = try wrapIndex { try runs.firstRun(endingAtOrAfter: want) }
            while j < runs.count && out.count < limit && !end {
                let run = try wrapIndex { try runs.run(j) }
                for r in try readBlock(seg, Int(run.block)) where r.stream == stream && r.seq >= want {
                    guard r.seq == want else { throw hole(stream, want, r.seq, seg) }
                    out.append(r)
                    if want == .max { end = true } else { want += 1 }
                    if out.count == limit || end { break }
                }
                j += 1
            }
            i += 1
        }
        if out.count < limit, !end, want <= top { throw hole(stream, want, top, nil, through: true) }
        return out
    }

    func readStreamBackwardOnce(_ stream: StreamID, beforeSeq: StreamSeq?, limit: Int) throws -> [Record] {
        let list = spans(of: stream)
        guard limit > 0, let top = list.last?.lastSeq, let first = list.first else { return [] }
        if let b = beforeSeq, b <= 1 { return [] }
        var want = min(beforeSeq.map { $0 - 1 } ?? UInt64.max, top)
        var out = [Record]()
        var i = lowerBound(list.count) { list[$0].firstSeq <= want } - 1
        // Seqs come from files: below seq 0 there is nothing (`end`), it must not underflow.
        var end = false
        while i >= 0 && out.count < limit && !end {
            guard let seg = segment(base: list[i].segmentBase), var runs = seg.runs(stream) else { i -= 1; continue }
            var j = try wrapIndex { try runs.lastRun(startingAtOrBefore: want) }
            while j >= 0 && out.count < limit && !end {
                let run = try wrapIndex { try runs.run(j) }
                for r in try readBlock(seg, Int(run.block)).reversed() where r.stream == stream && r.seq <= want {
                    guard r.seq == want else { throw hole(stream, r.seq + 1, want, seg, through: true) }
                    out.append(r)
                    if want == 0 { end = true } else { want -= 1 }
                    if out.count == limit || end { break }
                }
                j -= 1
            }
            i -= 1
        }
        if out.count < limit, !end, want >= first.firstSeq {
            throw hole(stream, first.firstSeq, want, nil, through: true)
        }
        return out
    }

    /// A hole in a stream: seqs `from ..< to` (`from ... to` with `through`, so that `to` may be the
    /// last seq there is) are not readable.
    private func hole(_ s: StreamID, _ from: StreamSeq, _ to: StreamSeq, _ seg: Segment?, through: Bool = false) -> StoreError {
        let range = "\(from)\(through ? "..." : "..<")\(to)"
        let e = FormatError(.mismatch, file: seg?.dataPath ?? directory, offset: 0, "stream \(s) seq \(range) is unreadable")
        return .corrupt(e)
    }

    private func wrapIndex<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as FormatError {
            if !damage.contains(e) { damage.append(e) }
            throw StoreError.corrupt(e)
        } catch let e as DiskError { throw StoreError.disk(e) }
    }
}

/// The first position in 0..<count where `before` is false (`before` must be true then false).
func lowerBound(_ count: Int, _ before: (Int) -> Bool) -> Int {
    var lo = 0
    var hi = count
    while lo < hi {
        let mid = (lo + hi) / 2
        if before(mid) { lo = mid + 1 } else { hi = mid }
    }
    return lo
}
