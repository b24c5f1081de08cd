import Foundation

/// The test network: one network namespace per node (`wf-n<i>`), each with a veth pair whose outer end
/// sits on a bridge (`wf-br0`, 10.77.0.1/24) in the harness's own namespace, where the client runs.
/// Partitions are iptables DROP rules inside the namespaces (this kernel has no netem).
/// `WEFT_FAULTS_NET=k` (0-200) gives a run its own names and subnet (`wf<k>-…`, 10.77.k.0/24), so two
/// runs can share a machine.
let networkNumber = Int(ProcessInfo.processInfo.environment["WEFT_FAULTS_NET"] ?? "0").map { min(max($0, 0), 200) } ?? 0

struct TestNetwork {
    let nodes: [Int]
    static let prefix = networkNumber == 0 ? "wf" : "wf\(networkNumber)"
    static let bridge = "\(prefix)-br0"
    static let subnet = "10.77.\(networkNumber)"

    static func address(_ node: Int) -> String { "\(subnet).\(10 + node)" }
    static func namespace(_ node: Int) -> String { "\(prefix)-n\(node)" }
    static func outerLink(_ node: Int) -> String { "\(prefix)-v\(node)" }
    static func innerLink(_ node: Int) -> String { "\(prefix)-p\(node)" }

    /// Removes whatever an earlier run left behind.
    static func cleanUp(nodes: [Int]) {
        for n in nodes {
            _ = try? sh(["ip", "netns", "del", namespace(n)], allowFailure: true)
            _ = try? sh(["ip", "link", "del", outerLink(n)], allowFailure: true)
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
            try sh(["ip", "link", "add", outerLink(n), "type", "veth", "peer", "name", innerLink(n)])
            try sh(["ip", "link", "set", innerLink(n), "netns", ns])
            try sh(["ip", "link", "set", outerLink(n), "master", bridge])
            try sh(["ip", "link", "set", outerLink(n), "up"])
            try sh(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
            try sh(["ip", "netns", "exec", ns, "ip", "link", "set", innerLink(n), "name", "eth0"])
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
