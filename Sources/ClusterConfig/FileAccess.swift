#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Reads a whole configuration file as UTF-8; every failure is a `ConfigError` naming `path`.
func readTextFile(_ path: String) throws(ConfigError) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else {
        throw ConfigError(file: path, message: "cannot open the file: \(errnoDescription(errno))")
    }
    defer { _ = close(fd) }

    let limit = ClusterConfiguration.configFileBytesMax
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 64 << 10)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 {
            let code = errno
            if code == EINTR { continue }
            throw ConfigError(file: path, message: "cannot read the file: \(errnoDescription(code))")
        }
        if count == 0 { break }
        bytes.append(contentsOf: chunk[0..<count])
        guard bytes.count <= limit else {
            throw ConfigError(file: path, message: "the file is larger than \(limit) bytes")
        }
    }

    // Validate rather than repair: a replacement character in a secret or a path would pass silently.
    var iterator = bytes.makeIterator()
    var decoder = UTF8()
    var line = 1
    decoding: while true {
        switch decoder.decode(&iterator) {
        case .scalarValue(let scalar): if scalar == "\n" { line += 1 }
        case .emptyInput: break decoding
        case .error: throw ConfigError(file: path, line: line, message: "the file is not valid UTF-8")
        }
    }
    return String(decoding: bytes, as: UTF8.self)
}

private func errnoDescription(_ code: Int32) -> String {
    guard let text = strerror(code) else { return "errno \(code)" }
    return "\(String(cString: text)) (errno \(code))"
}

/// The process's working directory, or nil if it cannot be determined (for example, it was deleted).
func currentDirectory() -> String? {
    guard let pointer = getcwd(nil, 0) else { return nil }
    defer { free(pointer) }
    return String(cString: pointer)
}

/// `path` made absolute against the directory holding `file` (itself against the working directory when
/// relative), then lexically normalized: no `.`, `..` or repeated `/` (symbolic links are not followed).
/// Nil when a relative path needs the working directory and it is unknown.
func resolvePath(_ path: String, againstDirectoryOf file: String) -> String? {
    if path.hasPrefix("/") { return normalizedAbsolutePath(path) }
    var base = directoryName(of: file)
    if !base.hasPrefix("/") {
        guard let cwd = currentDirectory() else { return nil }
        base = cwd + "/" + base
    }
    return normalizedAbsolutePath(base + "/" + path)
}

/// The part of `path` before its last `/`: `.` when there is none, `/` for a file in the root.
func directoryName(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    let directory = path[..<slash]
    return directory.isEmpty ? "/" : String(directory)
}

/// Collapses `.`, `..` and empty components of an absolute path (`..` at the root stays at the root).
func normalizedAbsolutePath(_ path: String) -> String {
    var parts: [Substring] = []
    for part in path.split(separator: "/") {
        switch part {
        case ".": continue
        case "..": _ = parts.popLast()
        default: parts.append(part)
        }
    }
    return "/" + parts.joined(separator: "/")
}
