import Raft
import Testing
import WeftCore
import WeftTesting

/// Issue 9: while an append to a follower is unacknowledged, new entries at the log's tail wait on the
/// leader and go in one append when the ack comes (`RaftConfig.tailAppendsInflightMax`): the follower
/// persists once per round trip, not once per proposal. A lost append must not stall the follower.
@Suite struct TailWindowTests {
    /// Hands out a node's Ready (entries persisted, hard state saved) and returns its messages.
    func drain(_ net: Net, _ id: NodeID) -> [Message] {
        var out: [Message] = []
        while net.nodes[id]!.hasReady {
            let rd = net.nodes[id]!.ready()
            net.logs[id]!.persist(rd.entries)
            if let hs = rd.hardState { net.logs[id]!.hardState = hs }
            net.applied[id, default: []] += rd.committed
            out += rd.messages
            net.nodes[id]!.advance(rd)
        }
        return out
    }

    func elected() throws -> (Net, NodeID) {
        let net = Net(3)
        net.tick(NodeID(1), 40)
        let l = try #require(net.leader())
        net.settle()
        return (net, l)
    }

    @Test func proposalsDuringAnUnacknowledgedAppendGoInOneAppend() throws {
        let (net, l) = try elected()
        let f = net.nodes.keys.sorted().first { $0 != l }!
        _ = try net.nodes[l]!.propose([Proposal(payload: [1])])
        let first = drain(net, l).filter { $0.kind == .append && $0.to == f }
        #expect(first.count == 1)
        #expect(first.first?.entries.count == 1)
        // Nine more proposals while that append is out: nothing more goes to f.
        for k in 2...10 {
            _ = try net.nodes[l]!.propose([Proposal(payload: [UInt8(k)])])
            #expect(drain(net, l).filter { $0.kind == .append && $0.to == f && !$0.entries.isEmpty }.isEmpty)
        }
        // The ack comes back: the nine go out together.
        net.nodes[f]!.step(first[0])
        for m in drain(net, f) where m.to == l { net.nodes[l]!.step(m) }
        let second = drain(net, l).filter { $0.kind == .append && $0.to == f && !$0.entries.isEmpty }
        #expect(second.count == 1)
        #expect(second.first?.entries.map { $0.payload } == (2...10).map { [UInt8($0)] })
        // And everything commits on every node.
        for m in second { net.nodes[f]!.step(m) }
        net.settle()
        net.tickAll(3)
        for id in net.nodes.keys { #expect(net.applied[id]?.filter { $0.type == .data }.count == 10, "node \(id)") }
    }

    @Test func aLostAppendIsResentAfterAHeartbeat() throws {
        let (net, l) = try elected()
        let f = net.nodes.keys.sorted().first { $0 != l }!
        _ = try net.nodes[l]!.propose([Proposal(payload: [1])])
        // The append to f is lost; the other follower gets its own.
        for m in drain(net, l) where m.to != f { net.nodes[m.to]!.step(m) }
        net.settle()
        _ = try net.nodes[l]!.propose([Proposal(payload: [2])])
        net.cut.insert([l.rawValue, f.rawValue])
        net.settle()
        net.heal()
        // Heartbeats: f answers, the leader frees the lost append's slot and sends f what it lacks.
        net.tickAll(3)
        #expect(net.applied[f]?.filter { $0.type == .data }.map(\.payload) == [[1], [2]])
    }

    @Test func aFullAppendStillStreams() throws {
        // A follower far behind gets full appends back to back (the window), not one per round trip.
        let (net, l) = try elected()
        let f = net.nodes.keys.sorted().first { $0 != l }!
        net.cut.insert([l.rawValue, f.rawValue])
        let big = [UInt8](repeating: 7, count: 200 << 10)
        for _ in 0..<30 { _ = try net.nodes[l]!.propose([Proposal(payload: big)]) }
        net.settle()
        net.heal()
        for id in net.nodes.keys.sorted() { net.nodes[id]!.tick() }
        // f answers the heartbeat, then several full appends are out to it at once.
        var inFlight = 0
        for _ in 0..<30 {
            let out = drain(net, l)
            inFlight = max(inFlight, out.filter { $0.kind == .append && $0.to == f && !$0.entries.isEmpty }.count)
            for m in out { net.nodes[m.to]!.step(m) }
            for id in net.nodes.keys.sorted() where id != l {
                for m in drain(net, id) where m.to == l { net.nodes[l]!.step(m) }
            }
        }
        #expect(inFlight >= 2)
        net.settle()
        net.tickAll(3)
        #expect(net.applied[f]?.filter { $0.type == .data }.count == 30)
    }
}
