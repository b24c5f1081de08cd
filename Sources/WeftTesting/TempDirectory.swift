import Glibc
import SegmentStore

/// A new empty directory under /tmp for tests on real files, removed (with everything in it) by `remove`.
public struct TempDirectory: Sendable {
    public let path: String

    public init(prefix: String = "weft-test") throws {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw DiskError(path: "/tmp", operation: "mkdtemp", code: errno) }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// An existing directory, to be removed with `remove`.
    public init(existing path: String) { self.path = path }

    public func remove() { Self.removeTree(path) }

    static func removeTree(_ path: String) {
        for name in (try? PosixDisk().list(path)) ?? [] {
            let child = path + "/" + name
            if unlink(child) != 0 { removeTree(child) }
        }
        rmdir(path)
    }
}
