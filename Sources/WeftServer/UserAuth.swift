import ClusterConfig
import Crypto
import Foundation
import HummingbirdBcrypt
import JWTKit
import Messaging
import NIOConcurrencyHelpers
import NIOPosix
import WeftCore

/// What a user's bearer token says (JWT HS256, Docs/security.md).
struct UserClaims: JWTPayload {
    var sub: SubjectClaim
    var exp: ExpirationClaim
    var iat: IssuedAtClaim
    /// The account's token version when it was issued: a logout (or a second factor turned on or off)
    /// bumps the account's version and every older token stops working.
    var ver: UInt64

    func verify(using algorithm: some JWTAlgorithm) async throws {
        try exp.verifyNotExpired()
    }
}

/// Users' passwords and tokens: bcrypt on a small bounded pool (never on the event loops or a shard
/// thread), JWTs signed with a key derived from the cluster secret (every node can check every token).
final class UserAuth: Sendable {
    let keys: JWTKeyCollection
    let bcryptCost: Int
    let tokenTTL: TimeInterval
    /// Key that seals TOTP secrets at rest (derived from the cluster secret).
    let sealKey: SymmetricKey
    let pool: BcryptPool
    /// A hash of a random password: login runs bcrypt against it for unknown usernames, so the time
    /// taken does not tell which usernames exist.
    let decoyHash: String

    init(config: ClusterConfiguration) async {
        let secret = SymmetricKey(data: Array(config.secret.utf8))
        let jwtKey = HMAC<SHA256>.authenticationCode(for: Array("weft user tokens v1".utf8), using: secret)
        sealKey = SymmetricKey(data: HMAC<SHA256>.authenticationCode(for: Array("weft totp seal v1".utf8), using: secret))
        keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: Array(jwtKey)), digestAlgorithm: .sha256)
        bcryptCost = config.messaging.bcryptCost
        tokenTTL = TimeInterval(config.messaging.tokenTTLSeconds)
        pool = BcryptPool(threads: 2, queuedMax: 64)
        decoyHash = Bcrypt.hash(UUID().uuidString, cost: UInt8(config.messaging.bcryptCost))
    }

    func hash(_ password: String) async throws -> String {
        let cost = UInt8(bcryptCost)
        return try await pool.run { Bcrypt.hash(password, cost: cost) }
    }

    func verify(_ password: String, hash: String?) async throws -> Bool {
        let h = hash ?? decoyHash
        let ok = try await pool.run { Bcrypt.verify(password, hash: h) }
        return ok && hash != nil
    }

    func issue(user: UInt64, version: UInt64) async throws -> (token: String, expires: Date) {
        let now = Date()
        let expires = now.addingTimeInterval(tokenTTL)
        let claims = UserClaims(sub: SubjectClaim(value: "\(user)"), exp: ExpirationClaim(value: expires), iat: IssuedAtClaim(value: now), ver: version)
        return (try await keys.sign(claims), expires)
    }

    /// The token's user and version; nil when it is not a valid, unexpired token of this cluster.
    func check(_ token: String) async -> (user: UInt64, version: UInt64)? {
        guard token.utf8.count <= 4096 else { return nil }
        let now = Date()
        if let hit = verified.get(token, now: now) { return hit }
        guard let claims = try? await keys.verify(token, as: UserClaims.self),
            let user = UInt64(claims.sub.value), Ids.isUserID(user)
        else { return nil }
        verified.put(token, user: user, version: claims.ver, expires: claims.exp.value, now: now)
        return (user, claims.ver)
    }

    /// Tokens whose signature was checked, with their claims (`VerifiedTokens`).
    let verified = VerifiedTokens(capacity: 16_384)

    /// A TOTP secret sealed for the log (AES-GCM under the seal key, bound to the user id).
    func seal(_ secret: [UInt8], user: UInt64) throws -> [UInt8] {
        let box = try AES.GCM.seal(secret, using: sealKey, authenticating: Array("user \(user)".utf8))
        guard let combined = box.combined else { throw WriteError.invalid("sealing failed") }
        return Array(combined)
    }

    func unseal(_ sealed: [UInt8], user: UInt64) -> [UInt8]? {
        guard let box = try? AES.GCM.SealedBox(combined: sealed),
            let plain = try? AES.GCM.open(box, using: sealKey, authenticating: Array("user \(user)".utf8))
        else { return nil }
        return Array(plain)
    }
}

/// Bearer tokens already verified, exact string → claims, until the token expires: a device's every
/// send and every HTTP request carry the same token, and checking its HMAC and decoding its JSON again
/// each time was ~4 % of a busy node's CPU (Docs/benchmarks.md). Only the signature check is skipped:
/// expiry is checked on every hit, and the caller still compares the version with the account's
/// (a logout is seen at once). Bounded: when full, the whole table is dropped (a token then costs one
/// verification again), so a flood of distinct valid tokens costs at most `capacity` entries.
final class VerifiedTokens: Sendable {
    struct Entry { var user: UInt64; var version: UInt64; var expires: Date }
    let capacity: Int
    let table = NIOLockedValueBox([String: Entry]())

    init(capacity: Int) { self.capacity = capacity }

    func get(_ token: String, now: Date) -> (user: UInt64, version: UInt64)? {
        guard let e = table.withLockedValue({ $0[token] }), now < e.expires else { return nil }
        return (e.user, e.version)
    }

    func put(_ token: String, user: UInt64, version: UInt64, expires: Date, now: Date) {
        guard now < expires else { return }
        table.withLockedValue { t in
            if t.count >= capacity { t.removeAll(keepingCapacity: true) }
            t[token] = Entry(user: user, version: version, expires: expires)
        }
    }

    var count: Int { table.withLockedValue { $0.count } }
}

/// Runs CPU-heavy work (bcrypt) on `threads` threads with at most `queuedMax` jobs admitted: past that
/// a job is refused at once (`Busy`), so a flood of logins costs a bounded amount of CPU and memory.
final class BcryptPool: Sendable {
    let threads: NIOThreadPool
    let admitted = NIOLockedValueBox(0)
    let queuedMax: Int

    init(threads: Int, queuedMax: Int) {
        self.threads = NIOThreadPool(numberOfThreads: threads)
        self.threads.start()
        self.queuedMax = queuedMax
    }

    struct Busy: Error {}

    func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async throws -> T {
        let ok = admitted.withLockedValue { n -> Bool in
            guard n < queuedMax else { return false }
            n += 1
            return true
        }
        guard ok else { throw Busy() }
        defer { admitted.withLockedValue { $0 -= 1 } }
        return try await threads.runIfActive(body)
    }
}
