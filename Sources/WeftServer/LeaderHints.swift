import Raft
import WeftCore

/// Per shard, the leader a node last heard of and the term it heard it in: where the node sends the
/// shard's writes, and asks its questions first (Docs/replication.md, "Forwarding").
///
/// Heard from this node's replica's view, from a leader's announcement, and from a peer's not-leader
/// answer (which carries the term of the answering replica's view). A view of an older term never
/// replaces a newer one: an answer computed before a leader change can arrive after this node learned of
/// the change, and would send writes back to the old leader (until stop 27 hints carried no term, and
/// one write could then wait its whole deadline on a paused old leader). A peer's view of the same term
/// can name the leader but not unname it (a replica that has not heard from that term's leader yet);
/// this node's own replica can (it stopped hearing from the leader and asks for pre-votes: writes then
/// wait here for the election instead of going to a leader that may be gone). A leader that did not
/// answer is forgotten with its term kept, so an answer from before cannot bring it back either.
struct LeaderHints: Sendable, Equatable {
    struct Hint: Sendable, Equatable {
        /// nil: no leader known, or this node's own replica leads.
        var leader: NodeID?
        var term: Term
    }

    private(set) var hints: [ShardID: Hint] = [:]

    func leader(of shard: ShardID) -> NodeID? { hints[shard]?.leader }

    /// Takes a view of `shard`'s leader in `term` unless it is older than the one held. `local`: this
    /// node's replica's view.
    mutating func heard(_ shard: ShardID, leader: NodeID?, term: Term, local: Bool = false) {
        let held = hints[shard] ?? Hint(leader: nil, term: 0)
        guard term > held.term || (term == held.term && (leader != nil || local)) else { return }
        hints[shard] = Hint(leader: leader, term: term)
    }

    /// Drops `node` as the leader of `shard` (it did not answer); `nil`: whatever leader is held.
    mutating func forget(_ shard: ShardID, _ node: NodeID?) {
        guard var h = hints[shard], node == nil || h.leader == node else { return }
        h.leader = nil
        hints[shard] = h
    }
}
