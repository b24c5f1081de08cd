/// A TCP endpoint written `host:port` in the configuration: an IPv4 address or a host name
/// (`127.0.0.1:7101`, `node-1.internal:7101`), or an IPv6 address in brackets (`[::1]:7101`).
public struct HostPort: Hashable, Sendable, CustomStringConvertible {
    /// The host without brackets: `127.0.0.1`, `node-1.internal` or `::1`.
    public let host: String
    /// 1...65535.
    public let port: Int

    /// Ports a listener can be given explicitly (0 would mean "any free port").
    public static let portRange = 1...65535
    /// A DNS name is at most 253 characters (RFC 1035, without the trailing dot).
    static let hostNameBytesMax = 253
    /// One DNS label is at most 63 characters.
    static let labelBytesMax = 63

    /// An endpoint from parts that are already valid; `precondition`s guard the invariants.
    public init(host: String, port: Int) {
        precondition(!host.isEmpty, "HostPort: empty host")
        precondition(Self.portRange.contains(port), "HostPort: port \(port) outside 1...65535")
        self.host = host
        self.port = port
    }

    /// Parses `host:port` or `[ipv6]:port`; nil when `text` is not a valid endpoint.
    public init?(_ text: String) {
        guard case .success(let value) = Self.parse(text) else { return nil }
        self = value
    }

    /// `host:port`, with the host in brackets when it is an IPv6 address; `HostPort(description)` gives it back.
    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// The same endpoint however the host name's letters are cased (DNS names are case-insensitive).
    var canonical: HostPort { HostPort(host: host.lowercased(), port: port) }

    /// Why a `host:port` string was rejected; the message is meant to follow a key path.
    struct Problem: Error, Equatable {
        let message: String
    }

    static func parse(_ text: String) -> Result<HostPort, Problem> {
        let expected = "must be \"host:port\" (an IPv6 address as \"[::1]:7000\"), got \(quoted(text))"
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            // [ipv6]:port
            guard let close = text.firstIndex(of: "]") else { return .failure(Problem(message: expected)) }
            hostPart = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return .failure(Problem(message: expected)) }
            portPart = rest.dropFirst()
            guard isIPv6(hostPart) else {
                return .failure(Problem(message: "invalid IPv6 address \(quoted(String(hostPart))) in \(quoted(text))"))
            }
        } else {
            guard let colon = text.lastIndex(of: ":") else { return .failure(Problem(message: expected)) }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
            if hostPart.contains(":") {
                return .failure(Problem(message: "an IPv6 address must be in brackets, as \"[::1]:7000\"; got \(quoted(text))"))
            }
            guard !hostPart.isEmpty else { return .failure(Problem(message: "missing host in \(quoted(text))")) }
            if hostPart.allSatisfy({ $0 == "." || $0.isASCII && $0.isNumber }) {
                guard isIPv4(hostPart) else {
                    return .failure(Problem(message: "invalid IPv4 address \(quoted(String(hostPart))) in \(quoted(text))"))
                }
            } else if !isHostName(hostPart) {
                return .failure(Problem(message: "invalid host name \(quoted(String(hostPart))) in \(quoted(text))"))
            }
        }
        guard let port = parsePort(portPart) else {
            return .failure(Problem(message: "port must be 1...65535, got \(quoted(String(portPart))) in \(quoted(text))"))
        }
        return .success(HostPort(host: String(hostPart), port: port))
    }

    /// Decimal digits only (no sign, no spaces), 1...65535.
    private static func parsePort(_ text: Substring) -> Int? {
        guard (1...5).contains(text.utf8.count), text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
            let port = Int(text), portRange.contains(port)
        else { return nil }
        return port
    }

    /// Four dot-separated decimal octets 0...255.
    static func isIPv4(_ text: Substring) -> Bool {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return false }
        return parts.allSatisfy { part in
            (1...3).contains(part.utf8.count) && part.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 })
                && (Int(part) ?? 256) <= 255
        }
    }

    /// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
    static func isHostName(_ text: Substring) -> Bool {
        guard text.utf8.count <= hostNameBytesMax else { return false }
        let labels = text.split(separator: ".", omittingEmptySubsequences: false)
        return labels.allSatisfy { label in
            let bytes = Array(label.utf8)
            guard let first = bytes.first, let last = bytes.last, bytes.count <= labelBytesMax else { return false }
            return first != UInt8(ascii: "-") && last != UInt8(ascii: "-")
                && bytes.allSatisfy { isASCIIAlphanumeric($0) || $0 == UInt8(ascii: "-") }
        }
    }

    /// Eight groups of 1...4 hex digits separated by `:`, at most one `::` standing for one or more zero
    /// groups, and optionally an IPv4 address as the last two groups (`::ffff:10.0.0.1`).
    static func isIPv6(_ text: Substring) -> Bool {
        guard text.utf8.count <= 45, text.contains(":") else { return false }
        let halves = text.split(separator: "::", maxSplits: 2, omittingEmptySubsequences: false)
        guard halves.count <= 2 else { return false }
        var groups = 0
        for (position, half) in halves.enumerated() {
            if half.isEmpty { continue }
            let parts = half.split(separator: ":", omittingEmptySubsequences: false)
            for (index, part) in parts.enumerated() {
                let isLastOfAddress = position == halves.count - 1 && index == parts.count - 1
                if isLastOfAddress && part.contains(".") {
                    guard isIPv4(part) else { return false }
                    groups += 2
                } else {
                    guard (1...4).contains(part.utf8.count), part.utf8.allSatisfy(isASCIIHexDigit) else { return false }
                    groups += 1
                }
            }
        }
        return halves.count == 2 ? groups <= 7 : groups == 8
    }

    private static func isASCIIAlphanumeric(_ byte: UInt8) -> Bool {
        (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
    }

    private static func isASCIIHexDigit(_ byte: UInt8) -> Bool {
        (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x46) || (byte >= 0x61 && byte <= 0x66)
    }
}

/// A value shown in an error message: in double quotes, control characters escaped, long values cut.
func quoted(_ text: String) -> String {
    let limit = 80
    var body = ""
    for scalar in text.unicodeScalars.prefix(limit) {
        body += scalar.properties.generalCategory == .control || scalar == "\"" || scalar == "\\"
            ? scalar.escaped(asASCII: true) : String(scalar)
    }
    if text.unicodeScalars.count > limit { body += "…" }
    return "\"\(body)\""
}
