import Foundation

/// The rule "writes go on": while one node is down, paused or cut off from the others, the other nodes
/// still hold a quorum of every shard, so once they have elected leaders, writes through them must
/// succeed. The checker of lost and duplicated writes cannot see a stall (a write that is never
/// acknowledged is not lost), and stop 24 found one by accident: a node kept forwarding writes to the
/// paused leader it had last heard of (Docs/replication.md, "Forwarding"). The writers cannot show it
/// either: each waits out its stuck write (5 s), so few new writes are sent while a fault lasts.
///
/// So the nemesis probes (`Nemesis.holdProbing`): `grace` after such a fault began, one write through
/// each other node to each shard, answered before the fault is healed. A probe that is not acknowledged
/// is a finding. A node with a replica of the shard learns the new leader from it; one without (with
/// `--replication` below `--nodes`) from the new leader's announcement.
enum Availability {
    struct Fault: Sendable, Equatable {
        var kind: String
        /// The node that was killed, paused or cut off.
        var victim: Int
        /// Seconds since the run began.
        var start: Double
        var end: Double
        /// A two-way partition's other node.
        var peer: Int? = nil
    }

    struct Attempt: Sendable, Equatable {
        /// When it was sent, seconds since the run began.
        var t: Double
        var node: Int
        var shard: Int
        /// Acknowledged (200). nil: no outcome recorded.
        var ok: Bool?
    }

    /// Elections here take the election timeout (300–600 ms) and a round or two; 2 s leaves room for a
    /// split vote and a loaded machine. A probe sent while an election is still on waits for it (the
    /// node retries until the write's 5 s deadline), so only a write sent somewhere it cannot be
    /// answered fails.
    static let grace = 2.0

    static func check(faults: [Fault], probes: [Attempt]) -> [String] {
        var findings: [String] = []
        for f in faults {
            for p in probes where p.t >= f.start && p.t <= f.end && p.ok != true {
                findings.append(
                    String(
                        format: "writes stopped: %@ of node %d from %.1f s to %.1f s: the write through node %d to shard %d sent at %.1f s was %@ (its outcome is in history.jsonl)",
                        f.kind, f.victim, f.start, f.end, p.node, p.shard, p.t, p.ok == nil ? "never answered" : "not acknowledged"))
            }
        }
        return findings
    }

    /// Self-check cases: a stalled probe is found, answered ones and probes outside faults are not.
    static func selfCheck() -> [(String, Bool)] {
        let fault = Fault(kind: "pause", victim: 3, start: 10, end: 14)
        func a(_ t: Double, _ node: Int, _ shard: Int, _ ok: Bool?) -> Attempt { Attempt(t: t, node: node, shard: shard, ok: ok) }
        let healthy = [a(12, 1, 0, true), a(12, 1, 1, true), a(12, 2, 0, true), a(12, 2, 1, true)]
        var stalled = healthy
        stalled[2].ok = false
        var unanswered = healthy
        unanswered[3].ok = nil
        return [
            ("availability: every probe answered", check(faults: [fault], probes: healthy).isEmpty),
            ("availability: a probe not acknowledged", check(faults: [fault], probes: stalled).count == 1),
            ("availability: a probe never answered", check(faults: [fault], probes: unanswered).count == 1),
            ("availability: a failed write outside any fault", check(faults: [fault], probes: [a(20, 1, 0, false)]).isEmpty),
        ]
    }
}
