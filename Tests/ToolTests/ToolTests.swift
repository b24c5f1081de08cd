import Foundation
import SegmentFormat
import SegmentStore
import Testing
import WeftCore

/// End-to-end checks of the real executables (`weft`, `weft-dump`) as a user runs them: real processes,
/// real files in a temporary directory.
@Suite(.serialized)
struct ToolTests {
    /// The directory holding the built products (next to the test bundle).
    static let bin: URL = {
        if let dir = ProcessInfo.processInfo.environment["WEFT_BIN_DIR"] { return URL(fileURLWithPath: dir) }
        var url = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        // Running inside `X.xctest/...` on some layouts: walk up to the folder that has `weft`.
        for _ in 0..<4 where !FileManager.default.fileExists(atPath: url.appendingPathComponent("weft-dump").path) {
            url.deleteLastPathComponent()
        }
        return url
    }()

    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    static func run(_ tool: String, _ args: [String]) throws -> Result {
        let p = Process()
        p.executableURL = bin.appendingPathComponent(tool)
        p.arguments = args
        let out = Pipe()
        let err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // Read both pipes fully before waiting, so a large output cannot block the child.
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    static func tempDir(_ name: String) throws -> String {
        let dir = NSTemporaryDirectory() + "weft-tooltests-\(name)-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// A small benchmark directory: several sealed segments (so index files exist) plus an active one.
    static let benchDir: String = {
        let dir = NSTemporaryDirectory() + "weft-tooltests-bench-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        return dir
    }()

    static func makeBench() throws -> Result {
        if FileManager.default.fileExists(atPath: benchDir + "/00000000000000000001.seg") {
            return Result(status: 0, stdout: "", stderr: "")
        }
        return try run("weft", ["bench", "store", "--dir", benchDir, "--records", "30000", "--reads", "50", "--streams", "300", "--segment-bytes", "1048576"])
    }

    /// A fresh copy of the bench directory, to damage.
    static func benchCopy(_ name: String) throws -> String {
        _ = try makeBench()
        let dir = try tempDir(name)
        for file in try FileManager.default.contentsOfDirectory(atPath: benchDir) {
            try FileManager.default.copyItem(atPath: benchDir + "/" + file, toPath: dir + "/" + file)
        }
        return dir
    }

    func jsonLines(_ s: String) throws -> [[String: Any]] {
        try s.split(separator: "\n").map {
            try #require(try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])
        }
    }

    @Test func benchPrintsFiguresAndVerifies() throws {
        let r = try Self.makeBench()
        #expect(r.status == 0, "\(r.stderr)")
        if !r.stdout.isEmpty {
            for needle in ["append batch=   1", "append batch=  64", "append batch=1024", "compression:", "reopen", "cursor read"] {
                #expect(r.stdout.contains(needle), "missing \(needle) in \(r.stdout)")
            }
        }
        let v = try Self.run("weft-dump", ["--verify", Self.benchDir])
        #expect(v.status == 0, "\(v.stdout)\(v.stderr)")
        #expect(v.stdout.contains("0 problems"))
        // Refuses a directory that is not fresh.
        let again = try Self.run("weft", ["bench", "store", "--dir", Self.benchDir, "--records", "10"])
        #expect(again.status != 0)
        #expect(again.stderr.contains("not empty"))
    }

    @Test func jsonOutputDescribesBlocksAndRecords() throws {
        _ = try Self.makeBench()
        let r = try Self.run("weft-dump", ["--json", "--from", "100", "--to", "160", Self.benchDir])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = try jsonLines(r.stdout)
        let blocks = lines.filter { $0["kind"] as? String == "block" }
        let records = lines.filter { $0["kind"] as? String == "record" }
        #expect(!blocks.isEmpty)
        #expect(records.count == 61)
        for b in blocks {
            for key in ["file", "offset", "payload_offset", "stored_bytes", "raw_bytes", "codec", "first_index", "last_index", "count", "crc_ok"] {
                #expect(b[key] != nil, "block lacks \(key)")
            }
            #expect(b["crc_ok"] as? Bool == true)
        }
        let indexes = records.compactMap { $0["index"] as? Int }
        #expect(indexes == Array(100...160))
        for rec in records {
            for key in ["index", "term", "stream", "seq", "type", "timestamp", "payload_b64"] {
                #expect(rec[key] != nil, "record lacks \(key)")
            }
            let payload = try #require(Data(base64Encoded: rec["payload_b64"] as? String ?? ""))
            #expect(String(decoding: payload, as: UTF8.self).contains("message_type"))
        }
        #expect(lines.last?["kind"] as? String == "summary")

        let s = try Self.run("weft-dump", ["--json", "--stream", "7", Self.benchDir])
        let streamRecs = try jsonLines(s.stdout).filter { $0["kind"] as? String == "record" }
        #expect(!streamRecs.isEmpty)
        #expect(streamRecs.allSatisfy { $0["stream"] as? Int == 7 })
        #expect(streamRecs.compactMap { $0["seq"] as? Int } == Array(1...streamRecs.count))
    }

    /// A messaging registration record holds a bcrypt hash: the dumper shows it as zeros, in text and JSON.
    @Test func passwordHashesAreNotDumped() throws {
        let dir = try Self.tempDir("redact")
        let hash = "$2b$04$SECRETHASHxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        var p: [UInt8] = [1]
        for field in ["alice", "Alice", hash] {
            withUnsafeBytes(of: UInt32(field.utf8.count).littleEndian) { p += $0 }
            p += Array(field.utf8)
        }
        withUnsafeBytes(of: UInt64(0).littleEndian) { p += $0 }
        withUnsafeBytes(of: UInt64(1).littleEndian) { p += $0 }
        do {
            let store = try SegmentStore(directory: dir, options: StoreOptions())
            try store.append([
                Record(index: 1, term: 1, stream: StreamID(1 << 62 | 2 << 40), seq: 1, type: .messaging, timestampMicros: 1, payload: p),
                Record(index: 2, term: 1, stream: StreamID(9), seq: 1, type: .data, timestampMicros: 2, payload: Array("SECRETHASH in a data record".utf8)),
            ])
            store.close()
        }
        let text = try Self.run("weft-dump", [dir])
        let json = try Self.run("weft-dump", ["--json", dir])
        #expect(text.status == 0 && json.status == 0, "\(text.stderr) \(json.stderr)")
        #expect(text.stdout.contains("#1 ") && text.stdout.contains("SECRETHASH in a data"), "the records are listed")
        #expect(!text.stdout.contains("$2b$04$SECRET"))
        let payloads = try jsonLines(json.stdout).compactMap { ($0["payload_b64"] as? String).flatMap { Data(base64Encoded: $0) } }
        #expect(payloads.count == 2)
        #expect(!payloads.contains { String(decoding: $0, as: UTF8.self).contains("$2b$04$SECRET") })
        #expect(payloads.contains { String(decoding: $0, as: UTF8.self).contains("alice") }, "the rest of the registration is shown")
    }

    @Test func verifyNamesTheOffsetOfAFlippedBit() throws {
        let dir = try Self.benchCopy("flip")
        let seg = dir + "/00000000000000000001.seg"
        let listing = try jsonLines(try Self.run("weft-dump", ["--json", "--from", "5000", "--to", "5000", seg]).stdout)
        let block = try #require(listing.first { $0["kind"] as? String == "block" })
        let offset = try #require(block["offset"] as? Int)
        let payload = try #require(block["payload_offset"] as? Int)
        let h = try #require(FileHandle(forUpdatingAtPath: seg))
        try h.seek(toOffset: UInt64(payload + 3))
        let byte = try #require(h.readData(ofLength: 1).first)
        try h.seek(toOffset: UInt64(payload + 3))
        h.write(Data([byte ^ 0x10]))
        try h.close()

        let v = try Self.run("weft-dump", ["--verify", dir])
        #expect(v.status == 1)
        #expect(v.stdout.contains("\(seg):\(offset): checksum mismatch"), "\(v.stdout)")
        // The human dump marks the block BAD and still lists the others.
        let d = try Self.run("weft-dump", [seg, "--from", "4990", "--to", "5010"])
        #expect(d.stdout.contains("crc BAD"))
        #expect(d.status == 1)
    }

    /// A shard directory with a catch-up still being received (`catchup/`, a segment cut short as
    /// shipping stopped): the log verifies, the staging is named as skipped; checked directly, it fails.
    @Test func verifySkipsACatchUpBeingReceived() throws {
        let dir = try Self.benchCopy("staging")
        let staging = dir + "/catchup"
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        let seg = try #require(FileManager.default.contents(atPath: dir + "/00000000000000000001.seg"))
        try Data(seg.prefix(seg.count / 2)).write(to: URL(fileURLWithPath: staging + "/00000000000000000001.seg"))
        let v = try Self.run("weft-dump", ["--verify", dir])
        #expect(v.status == 0, "\(v.stdout)")
        #expect(v.stderr.contains("skipped \(staging): a catch-up being received"), "\(v.stderr)")
        let direct = try Self.run("weft-dump", ["--verify", staging])
        #expect(direct.status == 1)
        #expect(direct.stdout.contains("truncated") || direct.stdout.contains(staging), "\(direct.stdout)")
    }

    @Test func verifyCatchesAnIndexThatDisagreesWithData() throws {
        let dir = try Self.benchCopy("idx")
        let idx = try #require(try FileManager.default.contentsOfDirectory(atPath: dir).sorted().first { $0.hasSuffix(".idx") })
        var bytes = try #require(FileManager.default.contents(atPath: dir + "/" + idx))
        bytes[bytes.count - 5] ^= 0x01
        try bytes.write(to: URL(fileURLWithPath: dir + "/" + idx))
        let v = try Self.run("weft-dump", ["--verify", dir])
        #expect(v.status == 1)
        #expect(v.stdout.contains(dir + "/" + idx + ":"), "\(v.stdout)")
    }

    @Test func badInputIsAClearErrorNotACrash() throws {
        let dir = try Self.tempDir("bad")
        let cases: [(String, [UInt8], String)] = [
            ("text.seg", Array("hello, this is not a segment\n".utf8), "bad magic"),
            ("short.seg", Array("WEFTSEG\0".utf8) + [1, 0, 64], "truncated"),
            ("version.seg", SegmentHeader(shard: .init(0), baseIndex: 1).encode().enumerated().map { $0.offset == 8 ? 9 : $0.element }, "unsupported version"),
            ("empty.seg", [], "bad magic"),
        ]
        for (name, bytes, reason) in cases {
            let path = dir + "/" + name
            #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
            let r = try Self.run("weft-dump", [path])
            #expect(r.status == 1, "\(name)")
            #expect(r.stderr.contains("\(path):") && r.stderr.contains(reason), "\(name): \(r.stderr)")
            let v = try Self.run("weft-dump", ["--verify", path])
            #expect(v.status == 1 && v.stdout.contains(reason), "\(name): \(v.stdout)")
        }
        let missing = try Self.run("weft-dump", [dir + "/nope"])
        #expect(missing.status == 2 && missing.stderr.contains("no such file"))
        let noSegs = try Self.tempDir("none")
        let none = try Self.run("weft-dump", [noSegs])
        #expect(none.status == 2 && none.stderr.contains("no segment files"))
        let badArg = try Self.run("weft", ["bench", "store", "--dir", noSegs, "--records", "0"])
        #expect(badArg.status != 0 && badArg.stderr.contains("--records"))
    }

    /// A shard directory after retention holds `streams.hwm`: `--verify` checks it (a flipped byte is
    /// `file:offset: checksum mismatch`), and the dump shows a stream's mark.
    @Test func verifyChecksTheHighWaterFile() throws {
        let dir = try Self.tempDir("hwm")
        let store = try SegmentStore(directory: dir, options: StoreOptions(shard: ShardID(4), segmentBytesMax: 4_096, blockBytesTarget: 512))
        var seqs: [UInt64: UInt64] = [:]
        for i in 1...400 as ClosedRange<UInt64> {
            // Stream 1000 only at the start: all its records go with the dropped segments.
            let s: UInt64 = i <= 3 ? 1000 : i % 7 + 1
            seqs[s, default: 0] += 1
            try store.append([Record(index: i, term: 1, stream: StreamID(s), seq: seqs[s] ?? 0, timestampMicros: 0, payload: Array("message \(i)".utf8))])
        }
        #expect(try store.dropSegments(through: 200) >= 1)
        #expect(store.lastSeq(of: StreamID(1000)) == 3)
        store.close()
        let hwm = dir + "/" + SegmentStore.highWaterFileName
        #expect(FileManager.default.fileExists(atPath: hwm))

        let clean = try Self.run("weft-dump", ["--verify", dir])
        #expect(clean.status == 0, "\(clean.stdout)\(clean.stderr)")
        #expect(clean.stdout.contains("0 problems"), "\(clean.stdout)")
        let listing = try jsonLines(try Self.run("weft-dump", ["--json", "--stream", "1000", dir]).stdout)
        let mark = try #require(listing.first { $0["kind"] as? String == "high_water" }, "\(listing)")
        #expect(mark["last_seq"] as? Int == 3)
        #expect(mark["shard"] as? Int == 4)
        #expect(mark["incomplete"] as? Bool == false)
        let text = try Self.run("weft-dump", ["--stream", "1000", dir])
        #expect(text.stdout.contains("stream 1000: last seq 3"), "\(text.stdout)")

        var bytes = try #require(FileManager.default.contents(atPath: hwm))
        bytes[Layout.highWaterHeaderBytes + 9] ^= 0x04
        try bytes.write(to: URL(fileURLWithPath: hwm))
        let v = try Self.run("weft-dump", ["--verify", dir])
        #expect(v.status == 1)
        #expect(v.stdout.contains("\(hwm):\(bytes.count - 4): checksum mismatch"), "\(v.stdout)")
        // The file alone, too.
        let alone = try Self.run("weft-dump", ["--verify", hwm])
        #expect(alone.status == 1 && alone.stdout.contains("\(hwm):\(bytes.count - 4): checksum mismatch"), "\(alone.stdout)")
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// The fault harness's checker sees every kind of anomaly it claims to (lost, duplicated, divergent,
    /// misplaced, refused-but-written), and passes a clean history.
    @Test func faultCheckerSeesKnownAnomalies() throws {
        let r = try Self.run("weft-faults", ["--self-check"])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.split(separator: "\n").count >= 8)
        #expect(!r.stdout.contains("WRONG"), "\(r.stdout)")
    }
}
