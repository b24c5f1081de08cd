import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// An offline-push webhook receiver for tests: `Tools/webhook-receiver.py` in its own process (http, or
/// https with a self-signed certificate it makes), logging every POST it gets.
public final class WebhookReceiver: Sendable {
    public let process: Process
    /// Its folder: the script's port file, its log, its certificate and key (removed by `stop`).
    public let dir: String
    public let log: String
    public let port: Int
    /// With `tls`: the receiver's certificate (PEM), to trust as `[push] ca_file`.
    public let certificate: String?

    /// Starts it and waits (at most 10 s) until it listens. It answers 503 to the first `failFirst` POSTs,
    /// then as `answer` says ("ok", "redirect", "big", "trickle": Tools/webhook-receiver.py).
    public init(secret: String, failFirst: Int = 0, tls: Bool = false, answer: String = "ok", file: String = #filePath) throws {
        let dir = NSTemporaryDirectory() + "weft-webhook-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", Self.script(from: file), dir + "/port", dir + "/log.jsonl", secret, String(failFirst)] + (tls ? ["--tls", dir] : []) + ["--answer", answer]
        // Never the test's own stdout: a receiver left running would hold that pipe open, and
        // `swift test` waits for its end (CI ran out of time on that once).
        _ = FileManager.default.createFile(atPath: dir + "/receiver.out", contents: nil)
        let out = FileHandle(forWritingAtPath: dir + "/receiver.out") ?? FileHandle.nullDevice
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let end = Date().addingTimeInterval(10)
        while Date() < end {
            if let t = try? String(contentsOfFile: dir + "/port", encoding: .utf8), let port = Int(t) {
                self.process = p
                self.dir = dir
                self.log = dir + "/log.jsonl"
                self.port = port
                self.certificate = tls ? dir + "/cert.pem" : nil
                return
            }
            if !p.isRunning { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let said = (try? String(contentsOfFile: dir + "/receiver.out", encoding: .utf8)) ?? ""
        try? FileManager.default.removeItem(atPath: dir)
        throw StartError(description: "the webhook receiver did not start: \(said.suffix(2000))")
    }

    public struct StartError: Error, CustomStringConvertible {
        public var description: String
    }

    /// `Tools/webhook-receiver.py`, found by walking up from the calling test's file to the package root.
    static func script(from file: String) -> String {
        var directory = file
        while let slash = directory.lastIndex(of: "/") {
            directory = String(directory[..<slash])
            if FileManager.default.fileExists(atPath: directory + "/Package.swift") { break }
        }
        return directory + "/Tools/webhook-receiver.py"
    }

    /// Every POST logged, in order. A complete line that is not a JSON object is kept as
    /// `["status": -1, "unparsed": line]`, so a check over every POST sees it; a last line still being
    /// written is left for the next look.
    public var all: [[String: Any]] {
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        lines.removeLast()  // after the last "\n": empty, or a line not complete yet
        return lines.map { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]) ?? ["status": -1, "unparsed": String(line)]
        }
    }
    /// The POSTs answered 200, in order.
    public var accepted: [[String: Any]] { all.filter { $0["status"] as? Int == 200 } }
    /// Every event received in accepted POSTs (with repeats).
    public var events: [[String: Any]] { accepted.flatMap { (($0["body"] as? [String: Any])?["events"] as? [[String: Any]]) ?? [] } }

    /// SIGKILL: a child spawned from the test process's threads inherits their signal mask, in which
    /// SIGTERM is blocked (`terminate()` would leave it running).
    public func stop() {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        try? FileManager.default.removeItem(atPath: dir)
    }
}
