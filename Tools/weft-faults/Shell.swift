import Foundation

/// Runs a command to completion; returns its exit status and combined output.
@discardableResult
func sh(_ args: [String], allowFailure: Bool = false) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    // Poll rather than `waitUntilExit` (see `Cluster.kill`); these commands end in milliseconds.
    let deadline = Date().addingTimeInterval(60)
    while p.isRunning {
        if Date() > deadline { throw HarnessError("\(args.joined(separator: " ")) still runs after 60 s") }
        usleep(5_000)
    }
    let out = String(decoding: data, as: UTF8.self)
    if p.terminationStatus != 0 && !allowFailure {
        throw HarnessError("\(args.joined(separator: " ")) exited \(p.terminationStatus): \(out.trimmingCharacters(in: .whitespacesAndNewlines))")
    }
    return (p.terminationStatus, out)
}

struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}
