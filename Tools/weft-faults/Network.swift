import Foundation

/// The test network: one network namespace per node (`wf-n<i>`), each with a veth pair whose outer end
/// sits on a bridge (`wf-br0`, 10.77.0.1/24) in the harness's own namespace, where the client runs.
/// Partitions are iptables DROP rules inside the namespaces (this kernel has no netem).
struct TestNetwork {
    let nodes: [Int]
    static let bridge = "wf-br0"
    static let subnet = "10.77.0"

    static func address(_ node: Int) -> String { "\(subnet).\(10 + node)" }
    static func namespace(_ node: Int) -> String { "wf-n\(node)" }

    /// Removes whatever an earlier run left behind.
    static func cleanUp(nodes: [Int]) {
        for n in nodes {
            _ = try? sh(["ip", "netns", "del", namespace(n)], allowFailure: true)
            _ = try? sh(["ip", "link", "del", "wf-v\(n)"], allowFailure: true)
        }
        _ = try? sh(["ip", "link", "del", bridge], allowFailure: true)
    }

    static func create(nodes: [Int]) throws -> TestNetwork {
        cleanUp(nodes: nodes)
        try sh(["ip", "link", "add", bridge, "type", "bridge"])
        try sh(["ip", "addr", "add", "\(subnet).1/24", "dev", bridge])
        try sh(["ip", "link", "set", bridge, "up"])
        for n in nodes {
            let ns = namespace(n)
            try sh(["ip", "netns", "add", ns])
            try sh(["ip", "link", "add", "wf-v\(n)", "type", "veth", "peer", "name", "wf-p\(n)"])
            try sh(["ip", "link", "set", "wf-p\(n)", "netns", ns])
            try sh(["ip", "link", "set", "wf-v\(n)", "master", bridge])
            try sh(["ip", "link", "set", "wf-v\(n)", "up"])
            try sh(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
            try sh(["ip", "netns", "exec", ns, "ip", "link", "set", "wf-p\(n)", "name", "eth0"])
            try sh(["ip", "netns", "exec", ns, "ip", "addr", "add", "\(address(n))/24", "dev", "eth0"])
            try sh(["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"])
            try sh(["ip", "netns", "exec", ns, "iptables", "-F"])
        }
        return TestNetwork(nodes: nodes)
    }

    /// `from` can no longer send to `to` (packets dropped as they leave `from`'s namespace, and as they
    /// arrive, so that neither new nor existing connections carry anything in that direction).
    func cut(from: Int, to: Int) throws {
        try sh(["ip", "netns", "exec", Self.namespace(from), "iptables", "-A", "OUTPUT", "-d", Self.address(to), "-j", "DROP"])
        try sh(["ip", "netns", "exec", Self.namespace(to), "iptables", "-A", "INPUT", "-s", Self.address(from), "-j", "DROP"])
    }

    /// Removes every rule.
    func heal() throws {
        for n in nodes { try sh(["ip", "netns", "exec", Self.namespace(n), "iptables", "-F"]) }
    }

    func destroy() { Self.cleanUp(nodes: nodes) }
}
