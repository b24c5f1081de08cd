/// A cluster configuration file that cannot be read, is not valid TOML, or breaks a rule.
///
/// `description` reads `<file>[:<line>[:<column>]]: [<key path>: ]<what is wrong>`, for example
/// `cluster.toml: cluster.shards: must be 1...1024, got 0` or
/// `cluster.toml:7:12: TOML syntax error: ...`. Key paths use TOML's dotted form with 0-based array
/// indices (`nodes[2].peer_addr`). Messages never echo `cluster.secret`.
public struct ConfigError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The configuration file's path, as given to `load(path:)` or `parse(_:configPath:)`.
    public let file: String
    /// The 1-based line, when known (TOML syntax errors).
    public let line: Int?
    /// The 1-based column, when known (TOML syntax errors).
    public let column: Int?
    /// The offending key, such as `cluster.shards` or `nodes[2].peer_addr`; nil for file-level problems.
    public let keyPath: String?
    /// What is wrong, such as `must be 1...1024, got 0`.
    public let message: String

    public init(file: String, line: Int? = nil, column: Int? = nil, keyPath: String? = nil, message: String) {
        self.file = file
        self.line = line
        self.column = column
        self.keyPath = keyPath
        self.message = message
    }

    public var description: String {
        var text = file
        if let line {
            text += ":\(line)"
            if let column { text += ":\(column)" }
        }
        if let keyPath { text += ": \(keyPath)" }
        return text + ": " + message
    }
}
