import Raft
import Testing
import WeftCore

@testable import WeftServer

/// Hints with terms (stop 27): an answer computed from an older view of a shard's leader never replaces a
/// newer one.
@Suite struct LeaderHintsTests {
    let s = ShardID(1)

    @Test func anOlderViewNeverReplacesANewerOne() {
        var h = LeaderHints()
        h.heard(s, leader: NodeID(2), term: 5)
        #expect(h.leader(of: s) == NodeID(2))
        // This node's replica learned of node 3 in term 6; then a peer's answer from term 5 arrives.
        h.heard(s, leader: NodeID(3), term: 6)
        h.heard(s, leader: NodeID(2), term: 5)
        #expect(h.leader(of: s) == NodeID(3))
        // Same term: a peer's view that names the leader is taken, one that knows none does not unname it.
        h.heard(s, leader: nil, term: 6)
        #expect(h.leader(of: s) == NodeID(3))
        // This node's replica stopped hearing from it (pre-votes, same term): no leader until the election.
        h.heard(s, leader: nil, term: 6, local: true)
        #expect(h.leader(of: s) == nil)
        h.heard(s, leader: NodeID(3), term: 6)
        #expect(h.leader(of: s) == NodeID(3))
        // A newer term with no leader known yet (an election): no leader.
        h.heard(s, leader: nil, term: 7)
        #expect(h.leader(of: s) == nil)
        h.heard(s, leader: NodeID(1), term: 7)
        #expect(h.leader(of: s) == NodeID(1))
        // Other shards are separate.
        #expect(h.leader(of: ShardID(2)) == nil)
    }

    @Test func aForgottenLeaderComesBackOnlyWithItsTermOrANewerOne() {
        var h = LeaderHints()
        h.heard(s, leader: NodeID(2), term: 5)
        // Another node forgotten: nothing changes.
        h.forget(s, NodeID(3))
        #expect(h.leader(of: s) == NodeID(2))
        // It did not answer: forgotten, the term kept.
        h.forget(s, NodeID(2))
        #expect(h.leader(of: s) == nil)
        // An answer from an older view cannot bring it, or another old leader, back.
        h.heard(s, leader: NodeID(3), term: 4)
        #expect(h.leader(of: s) == nil)
        // The same term's leader is named again (the others have not elected anyone since).
        h.heard(s, leader: NodeID(2), term: 5)
        #expect(h.leader(of: s) == NodeID(2))
        h.forget(s, nil)
        #expect(h.leader(of: s) == nil)
        h.heard(s, leader: NodeID(3), term: 6)
        #expect(h.leader(of: s) == NodeID(3))
    }

    @Test func aNotLeaderAnswerCarriesItsTermAndOlderPeersAreStillRead() throws {
        let id = Envelope.RequestID(incarnation: 7, sequence: 9)
        let a = Envelope.answer(request: id, .notLeader(NodeID(3), term: 42))
        #expect(try Envelope.decode(a.encode()) == a)
        // Before stop 27 the answer ended after the leader: read with term 0 (unknown).
        let old = Array(a.encode().dropLast(8))
        #expect(try Envelope.decode(old) == .answer(request: id, .notLeader(NodeID(3), term: 0)))
        // Anything else after it is refused.
        #expect(throws: (any Error).self) { try Envelope.decode(a.encode() + [0]) }
    }
}
