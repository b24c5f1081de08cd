import CFileSync
import Glibc
import SegmentFormat

/// An IO failure: which file, which operation, and the OS's error.
public struct DiskError: Error, Equatable, Sendable, CustomStringConvertible {
    public var path: String
    public var operation: String
    public var code: Int32
    public init(path: String, operation: String, code: Int32) {
        self.path = path
        self.operation = operation
        self.code = code
    }
    public var description: String {
        "\(path): \(operation) failed: \(String(cString: strerror(code))) (errno \(code))"
    }
}

/// One open file. The store's only way to touch data, so tests can substitute a disk that tears writes,
/// fails, and forgets what was not synced.
public protocol DiskFile: AnyObject {
    var path: String { get }
    func size() throws -> UInt64
    /// Writes all of `bytes` at `offset`, or throws (possibly after writing a prefix).
    func write(_ bytes: [UInt8], at offset: UInt64) throws
    /// Up to `count` bytes at `offset`; fewer only at end of file.
    func read(at offset: UInt64, count: Int) throws -> [UInt8]
    /// Makes every write so far durable (fdatasync). Also flushes the device's write cache, so the
    /// pages other files handed to the device before this call (`writeBack`) are durable after it too.
    func sync() throws
    /// Starts writing this file's dirty pages in `offset ..< offset + count` to the device and returns
    /// (sync_file_range WRITE): lets several files' writes proceed at once before `writeBack` waits.
    func startWriteBack(offset: UInt64, count: UInt64) throws
    /// Writes the dirty pages in `offset ..< offset + count` and waits until the device has them
    /// (sync_file_range WAIT_BEFORE|WRITE|WAIT_AFTER). Not durable yet: only once some file's `sync`
    /// (a device cache flush) follows, and only inside the file's durable size and block map, which this
    /// does not write (Docs/storage.md, "Shared flushes"). A failure is final, as a failed `sync` is:
    /// the kernel may have marked the pages clean and reported the error here only, so a later `sync`
    /// of the file could succeed without them.
    func writeBack(offset: UInt64, count: UInt64) throws
    func truncate(to size: UInt64) throws
    func close()
}

/// The file system as the store sees it: one directory of flat files.
public protocol Disk: AnyObject {
    func open(_ path: String, create: Bool) throws -> any DiskFile
    /// File names (not paths) in `directory`.
    func list(_ directory: String) throws -> [String]
    func remove(_ path: String) throws
    func rename(_ from: String, to: String) throws
    /// Makes creations, renames and removals in `directory` durable (fsync on the directory).
    func syncDirectory(_ directory: String) throws
    func makeDirectory(_ path: String) throws
    /// Removes an empty directory.
    func removeDirectory(_ path: String) throws
    func exists(_ path: String) -> Bool
    /// The device whose write cache one `fdatasync` in `directory` flushes, when the filesystem there
    /// overwrites a file's allocated blocks in place, so that a write-back of such an overwrite followed
    /// by another file's `fdatasync` on the same device makes it durable (`SegmentStore.syncTogether`);
    /// nil when that is not known to hold (the store then syncs every append itself).
    func flushDomain(_ directory: String) -> UInt64?
}

/// Adapts an open file to the pure decoders' `ByteSource`.
public struct FileByteSource: ByteSource {
    public let file: any DiskFile
    public let size: UInt64
    public var name: String { file.path }
    public init(_ file: any DiskFile) throws {
        self.file = file
        size = try file.size()
    }
    public init(_ file: any DiskFile, size: UInt64) {
        self.file = file
        self.size = size
    }
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset < size, count > 0 else { return [] }
        // min(count, what is left) is at most count, an Int.
        return try file.read(at: offset, count: Int(min(UInt64(count), size - offset)))
    }
}

// MARK: - POSIX

/// The real disk: POSIX calls, fdatasync for file data, fsync on directories.
public final class PosixDisk: Disk {
    public init() {}

    public func open(_ path: String, create: Bool) throws -> any DiskFile {
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0)
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else { throw DiskError(path: path, operation: "open", code: errno) }
        return PosixFile(fd: fd, path: path)
    }

    public func list(_ directory: String) throws -> [String] {
        guard let dir = opendir(directory) else { throw DiskError(path: directory, operation: "opendir", code: errno) }
        defer { closedir(dir) }
        var names = [String]()
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    public func remove(_ path: String) throws {
        guard unlink(path) == 0 else { throw DiskError(path: path, operation: "unlink", code: errno) }
    }

    public func rename(_ from: String, to: String) throws {
        guard Glibc.rename(from, to) == 0 else { throw DiskError(path: from, operation: "rename to \(to)", code: errno) }
    }

    public func syncDirectory(_ directory: String) throws {
        let fd = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw DiskError(path: directory, operation: "open directory", code: errno) }
        defer { Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw DiskError(path: directory, operation: "fsync directory", code: errno) }
    }

    public func removeDirectory(_ path: String) throws {
        guard rmdir(path) == 0 else { throw DiskError(path: path, operation: "rmdir", code: errno) }
    }

    public func makeDirectory(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for part in path.split(separator: "/") {
            prefix += part + "/"
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                throw DiskError(path: prefix, operation: "mkdir", code: errno)
            }
        }
    }

    public func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// ext4 and XFS write an overwrite of allocated, written blocks in place, and their `fdatasync`
    /// always ends with a device cache flush. Copy-on-write filesystems (btrfs, ZFS, bcachefs, f2fs) put
    /// an overwrite in new blocks whose pointers only the file's own sync makes durable: not shared.
    public func flushDomain(_ directory: String) -> UInt64? {
        var st = stat()
        let type = weft_filesystem_type(directory)
        guard stat(directory, &st) == 0 else { return nil }
        let ext4: Int64 = 0xEF53
        let xfs: Int64 = 0x5846_5342
        guard type == ext4 || type == xfs else { return nil }
        return UInt64(st.st_dev)
    }
}

final class PosixFile: DiskFile {
    let fd: Int32
    let path: String
    private var closed = false

    init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    deinit { close() }

    func size() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw DiskError(path: path, operation: "fstat", code: errno) }
        return UInt64(st.st_size)
    }

    /// `offset + extra` as a file offset, or EINVAL: offsets can come from files, and `off_t(_:)` would
    /// trap on one past Int64.max.
    private func fileOffset(_ offset: UInt64, plus extra: Int = 0, _ operation: String) throws -> off_t {
        guard let o = off_t(exactly: offset), o <= off_t.max - off_t(extra) else {
            throw DiskError(path: path, operation: "\(operation) at offset \(offset)", code: EINVAL)
        }
        return o + off_t(extra)
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        _ = try fileOffset(offset, plus: bytes.count, "pwrite")
        try bytes.withUnsafeBytes { buf in
            guard let base = buf.baseAddress else { return }
            var done = 0
            while done < buf.count {
                let n = pwrite(fd, base + done, buf.count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw DiskError(path: path, operation: "pwrite", code: errno)
                }
                done += n
            }
        }
    }

    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard count > 0 else { return [] }
        _ = try fileOffset(offset, plus: count, "pread")
        var failure: Int32 = 0
        let out = [UInt8](unsafeUninitializedCapacity: count) { buf, initialized in
            initialized = 0
            guard let base = buf.baseAddress else { return }
            var done = 0
            while done < count {
                let n = pread(fd, base + done, count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    break
                }
                if n == 0 { break }
                done += n
            }
            initialized = done
        }
        if failure != 0 { throw DiskError(path: path, operation: "pread", code: failure) }
        return out
    }

    func sync() throws {
        // A closed descriptor's number may already name another file: its sync would not be this one's.
        guard !closed else { throw DiskError(path: path, operation: "fdatasync", code: EBADF) }
        guard fdatasync(fd) == 0 else { throw DiskError(path: path, operation: "fdatasync", code: errno) }
    }

    func startWriteBack(offset: UInt64, count: UInt64) throws {
        try syncRange(offset: offset, count: count, wait: false)
    }

    func writeBack(offset: UInt64, count: UInt64) throws {
        try syncRange(offset: offset, count: count, wait: true)
    }

    private func syncRange(offset: UInt64, count: UInt64, wait: Bool) throws {
        let operation = wait ? "sync_file_range (wait)" : "sync_file_range"
        guard !closed else { throw DiskError(path: path, operation: operation, code: EBADF) }
        let start = try fileOffset(offset, operation)
        guard let n = off_t(exactly: count), n <= off_t.max - start else {
            throw DiskError(path: path, operation: "\(operation) of \(count) bytes at offset \(offset)", code: EINVAL)
        }
        while weft_sync_file_range(fd, Int64(start), Int64(n), wait ? 1 : 0) != 0 {
            if errno == EINTR { continue }
            throw DiskError(path: path, operation: operation, code: errno)
        }
    }

    func truncate(to size: UInt64) throws {
        guard ftruncate(fd, try fileOffset(size, "ftruncate")) == 0 else { throw DiskError(path: path, operation: "ftruncate", code: errno) }
    }

    func close() {
        if !closed {
            closed = true
            Glibc.close(fd)
        }
    }
}
