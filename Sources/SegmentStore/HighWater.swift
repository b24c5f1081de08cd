import SegmentFormat
import WeftCore

/// Stream high-water marks across retention (`streams.hwm`, §7 of Docs/segment-format.md).
///
/// `lastSeq(of:)` is what the Raft leader numbers a stream's next record from. For streams with records in
/// the log it comes from the segments' stream tables; for streams whose records were all in segments that
/// retention dropped, from the marks `dropSegments` wrote before deleting them (written to a temporary
/// file, fdatasync'ed, renamed, directory fsync'ed: a crash in between never loses them). A lost or
/// damaged file is never taken as "no streams": opening reports it (`findings.highWaterUnknown`), and the
/// loss stays recorded in the file (`incomplete`) when retention writes it again.
extension SegmentStore {
    /// The file's name in a shard directory. It travels with the sealed segment files to a follower that
    /// catches up from them (`sealedFiles()`).
    public static let highWaterFileName = FileNames.highWater

    /// Whether a file of a shard directory is one `sealedFiles()` names: what catch-up ships and installs.
    public static func isCatchUpFile(_ name: String) -> Bool {
        !name.contains("/") && (name.hasSuffix(".seg") || name.hasSuffix(".idx") || name == FileNames.highWater)
    }

    var highWaterPath: String { path(FileNames.highWater) }

    /// Loads `streams.hwm` at open. A file that fails its checks (or is another shard's) is recorded as
    /// damage and its marks are unknown from now on; nil when there is no file.
    func loadHighWater() throws -> HighWaterFile? {
        guard disk.exists(highWaterPath) else { return nil }
        let f = try disk.open(highWaterPath, create: false)
        defer { f.close() }
        do {
            let hw = try HighWaterFile.read(try FileByteSource(f))
            guard hw.shard == options.shard else {
                throw FormatError(.mismatch, file: highWaterPath, offset: 16, "high-water marks of shard \(hw.shard); this store is shard \(options.shard)")
            }
            return hw
        } catch let e as FormatError {
            let reported = e.file.isEmpty ? e.inFile(highWaterPath) : e
            damage.append(reported)
            log("\(reported)")
            highWaterLost("\(reported)")
            return nil
        }
    }

    /// After the segments are loaded: the marks must cover every record below where the log begins (or
    /// below where the fence says it began, when the first segments were lost — that loss is reported by
    /// the fence check). A log that begins after index 1 with no marks for what came before, or with
    /// marks that say they are incomplete or stop short, is reported.
    func checkHighWater(_ hw: HighWaterFile?, fence: Fence?) {
        var begins = firstIndex
        if let fence, fence.lastIndex >= fence.firstIndex { begins = min(begins, fence.firstIndex) }
        if let hw {
            highWater = hw.marks
            if hw.incomplete {
                highWaterLost("\(highWaterPath): marks of some records below index \(hw.firstIndex) were lost earlier")
            } else if hw.firstIndex < begins {
                highWaterLost("\(highWaterPath): marks cover the records below index \(hw.firstIndex), but the log begins at \(begins)")
            }
        } else if begins > 1 && !findings.highWaterUnknown {
            highWaterLost("\(highWaterPath): missing, but the log begins at index \(begins) (segments were dropped)")
        }
    }

    /// The marks of streams whose records were dropped are (partly) unknown: reported at open, and kept
    /// in the file when it is written again.
    private func highWaterLost(_ why: String) {
        highWaterIncomplete = true
        findings.highWaterUnknown = true
        let note = "\(why): streams whose records were all dropped have unknown last seqs (a leader numbering one could reuse seqs)"
        log(note)
        findings.notes.append(note)
    }

    /// The marks once `dropped` segments are gone: the current ones, raised by each stream's last seq in
    /// them. Never lowered (a suffix truncation cannot take back what retention dropped).
    func marks(adding dropped: ArraySlice<Segment>) -> [StreamID: StreamSeq] {
        var marks = highWater
        for seg in dropped {
            for (s, last) in seg.streamLastSeqs() where last > (marks[s] ?? 0) { marks[s] = last }
        }
        return marks
    }

    /// Writes `streams.hwm` atomically and durably: temporary file, fdatasync, rename, directory fsync.
    func saveHighWater(_ hw: HighWaterFile) throws {
        let tmp = highWaterPath + ".tmp"
        let f = try disk.open(tmp, create: true)
        do {
            try f.truncate(to: 0)
            try f.write(hw.encode(), at: 0)
            try f.sync()
        } catch {
            f.close()
            throw error
        }
        f.close()
        try disk.rename(tmp, to: highWaterPath)
        try disk.syncDirectory(directory)
    }
}

extension Segment {
    /// Each stream in this segment with its last seq.
    func streamLastSeqs() -> [(StreamID, StreamSeq)] {
        if let sealed { return sealed.streams.map { ($0.stream, $0.lastSeq) } }
        return builder.streams.map { ($0.key, $0.value.lastSeq) }
    }
}
