import Foundation
import Messaging
import NIOConcurrencyHelpers
import WeftCore

/// Per-user rate limits across the cluster (Docs/messaging.md, "Rate limits"): every node asks one node
/// per user — the first reachable replica of the user's home shard, in placement order — which keeps a
/// token bucket per (user, kind) in memory. So a user gets the same budget whichever nodes they use; if
/// that node goes down, the next one takes over with a fresh (full) bucket.
final class RateLimiter: Sendable {
    enum Kind: UInt8, Sendable { case send = 1, history = 2, action = 3, sync = 4, login = 5 }

    struct Bucket {
        var tokens: Double
        var last: ContinuousClock.Instant
        /// Its budget per minute (the bucket's own: buckets of different kinds are pruned by their own).
        var perMinute: Double
    }

    let buckets = NIOLockedValueBox<[UInt64: Bucket]>([:])
    /// Buckets kept at most; past it, full ones are dropped (a full bucket is the same as none).
    static let bucketsMax = 1 << 20

    init() {}

    /// Takes one token here: nil when there was one, else the seconds until there is.
    func takeLocal(_ kind: Kind, user: UInt64, perMinute: Int, now: ContinuousClock.Instant = .now) -> Int? {
        let rate = Double(max(1, perMinute)) / 60
        let capacity = Double(max(1, perMinute))
        let key = user << 8 | UInt64(kind.rawValue)
        return buckets.withLockedValue { all -> Int? in
            var b = all[key] ?? Bucket(tokens: capacity, last: now, perMinute: capacity)
            b.perMinute = capacity
            b.tokens = Self.refilled(b, now: now)
            b.last = now
            if all.count >= Self.bucketsMax, all[key] == nil { Self.prune(&all, now: now) }
            guard b.tokens >= 1 else {
                all[key] = b
                return max(1, Int(((1 - b.tokens) / rate).rounded(.up)))
            }
            b.tokens -= 1
            all[key] = b
            return nil
        }
    }

    static func refilled(_ b: Bucket, now: ContinuousClock.Instant) -> Double {
        let d = now - b.last
        let elapsed = max(0, Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18)
        return min(b.perMinute, b.tokens + elapsed * b.perMinute / 60)
    }

    /// Drops full buckets (the same as none). If every bucket is in use, the oldest-touched half goes:
    /// memory stays bounded, and only idle-longest users get a fresh budget.
    static func prune(_ all: inout [UInt64: Bucket], now: ContinuousClock.Instant) {
        all = all.filter { _, b in refilled(b, now: now) < b.perMinute }
        if all.count >= bucketsMax / 2 {
            let cut = all.values.map(\.last).sorted()[all.count / 2]
            all = all.filter { $0.value.last > cut }
        }
    }

    /// Takes a token for `user` from the node that keeps their buckets; throws 429 with `Retry-After`.
    /// `user`: the user id (for `.login`, a hash of the username: the limit holds before anyone is known).
    static func take(_ kind: Kind, user: UInt64, perMinute: Int, through node: WeftNode) async throws {
        let home = Ids.homeShard(user, shards: node.config.shards)
        let me = node.id
        // Placement order, not node order: the home shard's first replica differs from shard to shard, so
        // the cluster's limit nodes spread the way its shards do (sorted, every shard on three nodes picked
        // node 1, which then answered every other node's takes).
        let target = node.config.replicas(of: home).first { $0 == me || node.transport.reachable($0) } ?? me
        var retryAfter: Int?
        if target == me {
            retryAfter = node.limiter.takeLocal(kind, user: user, perMinute: perMinute)
        } else {
            let answer = await node.forwarder.send(
                to: target, shard: home,
                .rateTake(request: Envelope.RequestID(incarnation: 0, sequence: 0), user: user, kind: kind.rawValue, perMinute: UInt32(clamping: perMinute)),
                deadline: .now + .seconds(1))
            switch answer {
            case .refused(_, let s): retryAfter = Int(s) ?? 1
            // The limit node did not answer: count here rather than refuse or let everything through.
            case .ok: retryAfter = nil
            default: retryAfter = node.limiter.takeLocal(kind, user: user, perMinute: perMinute)
            }
        }
        if let retryAfter {
            var e = APIError(.tooManyRequests, "rate_limited", "too many requests: at most \(perMinute) per minute; retry in \(retryAfter) s")
            e.retryAfter = retryAfter
            throw e
        }
    }
}
