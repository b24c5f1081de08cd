import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// iptables, for tests that cut routes on loopback (root only).
public enum Firewall {
    /// Root, and an iptables binary.
    public static var usable: Bool { getuid() == 0 && FileManager.default.isExecutableFile(atPath: path) }

    /// `usable`, util-linux `setpriv` (to run a process under a group id of its own) and iptables'
    /// `owner` match: tried by adding and removing a rule that matches nothing, so a container without
    /// NET_ADMIN or the match skips such a test instead of failing it.
    public static var ownerMatchUsable: Bool {
        guard usable, FileManager.default.isExecutableFile(atPath: setpriv) else { return false }
        let probe = ["OUTPUT", "-o", "lo", "-p", "tcp", "-m", "owner", "--gid-owner", "46999", "--dport", "9", "-j", "DROP"]
        guard (try? run(["-A"] + probe)) != nil else { return false }
        try? run(["-D"] + probe)
        return true
    }

    public static var path: String {
        ["/usr/sbin/iptables", "/sbin/iptables"].first { FileManager.default.isExecutableFile(atPath: $0) } ?? "/usr/sbin/iptables"
    }
    public static let setpriv = "/usr/bin/setpriv"

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Runs iptables with `arguments` (after `-w`: wait for the lock); throws unless it exits 0.
    public static func run(_ arguments: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = ["-w"] + arguments
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw Failure(description: "iptables \(arguments.joined(separator: " ")) exited \(p.terminationStatus)") }
    }
}
