import ClusterConfig
import Testing

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The package root: walks up from this file until a directory holds `Package.swift`.
func packageRoot(from file: String = #filePath) -> String {
    var directory = file
    while let slash = directory.lastIndex(of: "/") {
        directory = String(directory[..<slash])
        if access(directory + "/Package.swift", F_OK) == 0 { return directory }
    }
    Issue.record("no Package.swift above \(file)")
    return "/"
}

let validSecret = "0123456789abcdef"

let threeNodes = """
    [[nodes]]
    id = 1
    peer_addr = "127.0.0.1:7101"
    api_addr = "127.0.0.1:8101"

    [[nodes]]
    id = 2
    peer_addr = "127.0.0.1:7102"
    api_addr = "127.0.0.1:8102"

    [[nodes]]
    id = 3
    peer_addr = "127.0.0.1:7103"
    api_addr = "127.0.0.1:8103"
    """

/// A configuration document: `[cluster]` with `cluster` as its body (name and secret valid by default),
/// optional `[storage]` and `[raft]` bodies, and `nodes` (three valid `[[nodes]]` by default, or a root-level
/// `nodes = ...` line).
let validToken = "operator-token-0123456789"

func document(
    cluster: String = "name = \"test\"\nsecret = \"\(validSecret)\"", storage: String? = nil, raft: String? = nil,
    api: String? = "operator_token = \"\(validToken)\"", nodes: String = threeNodes, extra: String = ""
) -> String {
    // A root-level `nodes = [...]` must come before the first table header; `[[nodes]]` may go anywhere.
    let nodesAtRoot = !nodes.hasPrefix("[")
    var text = nodesAtRoot ? nodes + "\n" : ""
    text += "[cluster]\n\(cluster)\n\n"
    if let storage { text += "[storage]\n\(storage)\n\n" }
    if let raft { text += "[raft]\n\(raft)\n\n" }
    if let api { text += "[api]\n\(api)\n\n" }
    return text + (nodesAtRoot ? "" : nodes) + "\n" + extra + "\n"
}

/// `[[nodes]]` entries with the given ids, in that order, on distinct local ports.
func nodes(ids: [Int]) -> String {
    ids.map { id in
        "[[nodes]]\nid = \(id)\npeer_addr = \"127.0.0.1:\(7000 + id)\"\napi_addr = \"127.0.0.1:\(9000 + id)\"\n"
    }.joined(separator: "\n")
}

/// Parses `text` expecting a `ConfigError`; returns it (nil and a recorded issue if parsing succeeded).
func parseError(
    _ text: String, configPath: String = "cluster.toml", sourceLocation: SourceLocation = #_sourceLocation
) -> ConfigError? {
    #expect(throws: ConfigError.self, sourceLocation: sourceLocation) {
        try ClusterConfiguration.parse(text, configPath: configPath)
    }
}

/// A fresh directory under the system's temporary directory.
func makeTemporaryDirectory() -> String {
    var template = Array("/tmp/weft-cluster-config-XXXXXX".utf8CString)
    let made = template.withUnsafeMutableBufferPointer { buffer in
        buffer.baseAddress.flatMap { mkdtemp($0) }
    }
    #expect(made != nil, "mkdtemp failed")
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Writes `bytes` to `path`, replacing the file.
func writeFile(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    #expect(fd >= 0, "cannot create \(path)")
    guard fd >= 0 else { return }
    defer { close(fd) }
    let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    #expect(written == bytes.count)
}

func removeTree(_ directory: String, files: [String]) {
    for file in files { unlink(directory + "/" + file) }
    rmdir(directory)
}
