import ArgumentParser
import Foundation
import SegmentFormat
import SegmentStore
import WeftCore

/// `weft-dump PATH`: inspect and verify segment files. A thin shell over `SegmentDumper`.
@main
struct WeftDump: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft-dump",
        abstract:
            "Print or verify Weft segment files (a .seg file, or every segment and stream high-water file under a data directory).")

    @Argument(help: "A segment file (.seg), a stream high-water file (streams.hwm), or a data directory.")
    var path: String

    @Flag(help: "One JSON object per line instead of text.")
    var json = false

    @Flag(help: "Check every checksum and every index file; print file:offset: reason for each problem. Exit 1 if any.")
    var verify = false

    @Option(help: "Only records of this stream.")
    var stream: UInt64?

    @Option(help: "Only records with index >= this.")
    var from: UInt64?

    @Option(help: "Only records with index <= this.")
    var to: UInt64?

    func run() throws {
        let files: [String]
        var skipped: [String] = []
        do {
            files = try segmentFiles(under: path, skipped: &skipped)
        } catch let e as DumpFailure {
            FileHandle.standardError.write(Data("weft-dump: \(e.message)\n".utf8))
            throw ExitCode(2)
        }
        for note in skipped { FileHandle.standardError.write(Data("weft-dump: skipped \(note)\n".utf8)) }
        let disk = PosixDisk()
        var out = Output(json: json, verify: verify)
        var summary = DumpSummary()
        let total = files.reduce(UInt64(0)) { sum, f in
            sum + (((try? FileManager.default.attributesOfItem(atPath: f))?[.size] as? UInt64) ?? 0)
        }
        var progress = Progress(total: total)
        let filter = DumpFilter(stream: stream.map { StreamID($0) }, from: from, to: to, records: !verify)
        var unreadable = 0
        for file in files {
            if file.hasSuffix(".hwm") {
                if !highWater(file, disk: disk, out: &out) { unreadable += 1 }
                summary.files += 1
                continue
            }
            do {
                let f = try disk.open(file, create: false)
                defer { f.close() }
                let src = try FileByteSource(f)
                let idxPath = String(file.dropLast(4)) + ".idx"
                var idx: (any ByteSource)?
                var idxFile: (any DiskFile)?
                if verify, FileManager.default.fileExists(atPath: idxPath) {
                    let g = try disk.open(idxPath, create: false)
                    idxFile = g
                    idx = try FileByteSource(g)
                }
                defer { idxFile?.close() }
                try SegmentDumper.dump(src, index: idx, filter: filter, summary: &summary, progress: { progress.update(done: $0) }) {
                    out.emit($0)
                }
                progress.finish(file: src.size)
            } catch let e as FormatError {
                unreadable += 1
                out.emit(.problem(e))
            } catch let e as DiskError {
                unreadable += 1
                out.emit(.problem(FormatError(.truncated, file: e.path, offset: 0, e.description)))
            }
        }
        progress.clear()
        out.summary(summary)
        if summary.problems + unreadable > 0 { throw ExitCode(1) }
    }

    /// Reads and checks a `streams.hwm` file (Docs/segment-format.md §7) and prints it; false when it
    /// has a problem (printed as `file:offset: reason`). Marks flagged incomplete are a problem too: some
    /// stream last seqs of that shard were lost.
    func highWater(_ file: String, disk: PosixDisk, out: inout Output) -> Bool {
        do {
            let f = try disk.open(file, create: false)
            defer { f.close() }
            let hw = try HighWaterFile.read(try FileByteSource(f))
            out.highWater(file, hw, stream: stream.map { StreamID($0) })
            if hw.incomplete {
                out.emit(
                    .problem(
                        FormatError(
                            .mismatch, file: file, offset: 10,
                            "marks flagged incomplete: the last seqs of some streams whose records below index \(hw.firstIndex) were dropped are lost")))
                return false
            }
            return true
        } catch let e as FormatError {
            out.emit(.problem(e.file.isEmpty ? e.inFile(file) : e))
        } catch let e as DiskError {
            out.emit(.problem(FormatError(.truncated, file: e.path, offset: 0, e.description)))
        } catch {
            out.emit(.problem(FormatError(.truncated, file: file, offset: 0, "\(error)")))
        }
        return false
    }
}

struct DumpFailure: Error { var message: String }

/// The files at `path`: the file itself, or every .seg file and stream high-water file (`streams.hwm`)
/// under a directory, in path order. Below `path`, a replica's catch-up staging directory (`catchup/`:
/// files a leader is still shipping, checked block by block before they replace the log) is not part
/// of the log and is left out, with a note in `skipped`; give its path to check it.
func segmentFiles(under path: String, skipped: inout [String]) throws -> [String] {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
        throw DumpFailure(message: "\(path): no such file or directory")
    }
    guard isDir.boolValue else { return [path] }
    guard let walker = FileManager.default.enumerator(atPath: path) else {
        throw DumpFailure(message: "\(path): cannot list directory")
    }
    let all = walker.compactMap { $0 as? String }
    func staged(_ name: String) -> Bool { name.split(separator: "/").dropLast().contains("catchup") }
    let stagedFiles = all.filter { staged($0) && ($0.hasSuffix(".seg") || $0.hasSuffix(".idx")) }
    if !stagedFiles.isEmpty {
        let dirs = Set(stagedFiles.map { name -> String in
            let parts = name.split(separator: "/")
            let k = parts.lastIndex(of: "catchup") ?? parts.count - 1
            return parts[...k].joined(separator: "/")
        })
        for d in dirs.sorted() {
            skipped.append("\(path)/\(d): a catch-up being received (staged files, checked before they are installed); not part of the log, not verified")
        }
    }
    let names = all.filter { !staged($0) }
    let segments = names.filter { $0.hasSuffix(".seg") }
    guard !segments.isEmpty else { throw DumpFailure(message: "\(path): no segment files (*.seg) found") }
    let highWaters = names.filter { $0 == SegmentStore.highWaterFileName || $0.hasSuffix("/" + SegmentStore.highWaterFileName) }
    return (segments + highWaters).sorted().map { path + "/" + $0 }
}

/// Text or JSON lines on stdout; problems also go to stderr in text mode.
struct Output {
    let json: Bool
    let verify: Bool
    private var buffer = ""
    private let dateFormatter: ISO8601DateFormatter = {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return f
    }()

    init(json: Bool, verify: Bool) {
        self.json = json
        self.verify = verify
    }

    mutating func emit(_ e: DumpEvent) {
        switch e {
        case .file(let path, let h, let bytes):
            if json {
                line(#"{"kind":"file","file":\#(q(path)),"shard":\#(h.shard),"base_index":\#(h.baseIndex),"bytes":\#(bytes)}"#)
            } else if !verify {
                line("segment \(path): shard \(h.shard), base index \(h.baseIndex), \(bytes) bytes, format v\(Layout.segmentVersion)")
            }
        case .block(let b):
            let h = b.header
            if json {
                line(
                    #"{"kind":"block","file":\#(q(b.file)),"offset":\#(b.offset),"payload_offset":\#(b.payloadOffset),"stored_bytes":\#(h.storedBytes),"raw_bytes":\#(h.rawBytes),"codec":"\#(h.codec)","first_index":\#(h.firstIndex),"last_index":\#(h.lastIndex),"count":\#(h.count),"crc_ok":\#(b.crcOK)}"#
                )
            } else if !verify {
                line(
                    "  block @\(b.offset): index \(h.firstIndex)-\(h.lastIndex), \(h.count) records, \(h.codec), \(h.storedBytes) stored / \(h.rawBytes) raw bytes (ratio \(fmt(b.ratio))), crc \(b.crcOK ? "OK" : "BAD")"
                )
            }
        case .record(let r):
            if json {
                line(
                    #"{"kind":"record","index":\#(r.index),"term":\#(r.term),"stream":\#(r.stream),"seq":\#(r.seq),"type":\#(r.type.rawValue),"timestamp":\#(r.timestampMicros),"payload_b64":"\#(Data(redacted(r)).base64EncodedString())"}"#
                )
            } else if !verify {
                line("    #\(r.index) term \(r.term) stream \(r.stream) seq \(r.seq) \(r.type) \(time(r.timestampMicros, dateFormatter)) \(preview(redacted(r)))")
            }
        case .problem(let err):
            if json {
                line(#"{"kind":"problem","file":\#(q(err.file)),"offset":\#(err.offset),"reason":\#(q(err.kind.rawValue + ": " + err.detail))}"#)
            } else if verify {
                line(err.description)
            } else {
                flush()
                FileHandle.standardError.write(Data("\(err)\n".utf8))
            }
        }
    }

    /// A high-water file: one line (with --stream, that stream's mark). Nothing in --verify text mode.
    mutating func highWater(_ path: String, _ hw: HighWaterFile, stream: StreamID?) {
        let mark = stream.map { hw.marks[$0] ?? 0 }
        if json {
            let last = mark.map { #","stream":\#(stream?.rawValue ?? 0),"last_seq":\#($0)"# } ?? ""
            line(
                #"{"kind":"high_water","file":\#(q(path)),"shard":\#(hw.shard),"first_index":\#(hw.firstIndex),"streams":\#(hw.marks.count),"incomplete":\#(hw.incomplete)\#(last)}"#
            )
        } else if !verify {
            line(
                "high-water marks \(path): shard \(hw.shard), last seqs of \(hw.marks.count) streams with records below index \(hw.firstIndex) (dropped)\(hw.incomplete ? ", INCOMPLETE" : "")"
            )
            if let stream, let mark { line("  stream \(stream): last seq \(mark)\(mark == 0 ? " (no dropped records)" : "")") }
        }
    }

    mutating func summary(_ s: DumpSummary) {
        if json {
            line(
                #"{"kind":"summary","files":\#(s.files),"blocks":\#(s.blocks),"bad_blocks":\#(s.badBlocks),"records":\#(s.records),"stored_bytes":\#(s.storedBytes),"raw_bytes":\#(s.rawBytes),"ratio":\#(fmt(s.ratio)),"problems":\#(s.problems),"preallocated_bytes":\#(s.preallocatedBytes)}"#
            )
        } else {
            let what = verify ? "verified" : "dumped"
            line(
                "\(what): \(s.files) files, \(s.blocks) blocks (\(s.badBlocks) bad), \(verify ? "" : "\(s.records) records shown, ")\(s.storedBytes) stored / \(s.rawBytes) raw bytes, compression ratio \(fmt(s.ratio)), \(s.problems) problems\(s.preallocatedBytes > 0 ? ", \(s.preallocatedBytes) bytes of zeros written ahead at the tail of active segments" : "")"
            )
        }
        flush()
    }

    private mutating func line(_ s: String) {
        buffer += s
        buffer += "\n"
        if buffer.utf8.count > 1 << 16 { flush() }
    }

    mutating func flush() {
        FileHandle.standardOutput.write(Data(buffer.utf8))
        buffer = ""
    }
}

func q(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            if u.value < 0x20 {
                let h = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
            } else {
                out.unicodeScalars.append(u)
            }
        }
    }
    return out + "\""
}

func fmt(_ d: Double) -> String { String(format: "%.2f", d) }

func time(_ micros: Int64, _ f: ISO8601DateFormatter) -> String {
    f.string(from: Date(timeIntervalSince1970: Double(micros) / 1_000_000))
}

/// A record's payload as the dumper shows it: a messaging registration's password hash (op 1: `u8 op |
/// text username | text display name | blob hash | …`, Docs/messaging.md) is replaced by zeros, so dumps
/// can be shared without the hashes (TOTP secrets are sealed before they reach the log).
func redacted(_ r: Record) -> [UInt8] {
    guard r.type == .messaging, r.payload.first == 1 else { return r.payload }
    var p = r.payload
    var at = 1
    func length() -> Int? {
        guard at + 4 <= p.count else { return nil }
        let n = Int(p[at]) | Int(p[at + 1]) << 8 | Int(p[at + 2]) << 16 | Int(p[at + 3]) << 24
        at += 4
        return n <= p.count - at ? n : nil
    }
    // A registration that does not parse is hidden whole.
    guard let name = length() else { return [UInt8](repeating: 0, count: p.count) }
    at += name
    guard let display = length() else { return [UInt8](repeating: 0, count: p.count) }
    at += display
    guard let hash = length() else { return [UInt8](repeating: 0, count: p.count) }
    for k in at..<(at + hash) { p[k] = 0 }
    return p
}

/// Up to 60 characters of the payload: text if it is UTF-8, hex otherwise.
func preview(_ p: [UInt8]) -> String {
    let head = Array(p.prefix(60))
    let more = p.count > 60 ? "… (\(p.count) bytes)" : ""
    if let s = String(validating: head, as: UTF8.self), !s.unicodeScalars.contains(where: { $0.value < 0x20 }) {
        return q(s) + more
    }
    return "0x" + head.map { String(format: "%02x", $0) }.joined() + more
}

extension Int {
    func clamped(to r: ClosedRange<Int>) -> Int { Swift.min(Swift.max(self, r.lowerBound), r.upperBound) }
}

/// A percentage on stderr, only when stderr is a terminal and the input is large.
struct Progress {
    let total: UInt64
    var finished: UInt64 = 0
    var lastShown = -1
    let enabled: Bool

    init(total: UInt64) {
        self.total = total
        enabled = isatty(2) != 0 && total > 64 << 20
    }

    mutating func update(done inFile: UInt64) {
        guard enabled else { return }
        // Sizes of files that may change while they are read: clamp, never overflow.
        let done = min(finished &+ inFile, total)
        let pct = Int(done / max(total / 100, 1)).clamped(to: 0...100)
        if pct != lastShown {
            lastShown = pct
            FileHandle.standardError.write(Data("\rweft-dump: \(pct)%".utf8))
        }
    }

    mutating func finish(file size: UInt64) { finished += size }

    func clear() {
        if enabled { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
    }
}
