import Foundation
import Messaging
import NIOConcurrencyHelpers
import WeftCore

/// Per-user rate limits across the cluster (Docs/messaging.md, "Rate limits"): every node asks one node
/// per user — the first reachable replica of the user's home shard, in placement order — which keeps a
/// token bucket per (user, kind) in memory. So a user gets the same budget whichever nodes they use; if
/// that node goes down, the next one takes over with a fresh (full) bucket.
final class RateLimiter: Sendable {
    enum Kind: UInt8, Sendable { case send = 1, history = 2 }

    struct Bucket {
        var tokens: Double
        var last: ContinuousClock.Instant
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
            var b = all[key] ?? Bucket(tokens: capacity, last: now)
            let elapsed = Double((now - b.last).components.seconds) + Double((now - b.last).components.attoseconds) / 1e18
            b.tokens = min(capacity, b.tokens + max(0, elapsed) * rate)
            b.last = now
            if all.count >= Self.bucketsMax, all[key] == nil { Self.prune(&all, now: now, rate: rate, capacity: capacity) }
            guard b.tokens >= 1 else {
                all[key] = b
                return max(1, Int(((1 - b.tokens) / rate).rounded(.up)))
            }
            b.tokens -= 1
            all[key] = b
            return nil
        }
    }

    static func prune(_ all: inout [UInt64: Bucket], now: ContinuousClock.Instant, rate: Double, capacity: Double) {
        all = all.filter { _, b in b.tokens + Double((now - b.last).components.seconds) * rate < capacity }
        if all.count >= bucketsMax { all.removeAll(keepingCapacity: true) }
    }

    /// Takes a token for `user` from the node that keeps their buckets; throws 429 with `Retry-After`.
    static func take(_ kind: Kind, user: UInt64, perMinute: Int, through node: WeftNode) async throws {
        let home = Ids.homeShard(user, shards: node.config.shards)
        let me = node.id
        let target = node.config.replicas(of: home).sorted().first { $0 == me || node.transport.reachable($0) } ?? me
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
