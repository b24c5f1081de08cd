import Crypto
import Foundation
import HummingbirdOTP
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Issue 11: the messaging API's authorization matrix, bad input, rate limits and TOTP, on real processes.
extension Clusters {
    @Suite(.serialized) struct MessagingAPITests {
        static let secret = "test-secret-0123456789abcdef"

        /// A token signed like the cluster's (HS256 under the key derived from the cluster secret), with
        /// any claims: for expired tokens. `key`: another key, for forged ones.
        static func mint(sub: UInt64, exp: Int, ver: Int, key: [UInt8]? = nil) -> String {
            func b64(_ d: Data) -> String {
                d.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
            }
            let header = b64(Data(#"{"alg":"HS256","typ":"JWT"}"#.utf8))
            let now = Int(Date().timeIntervalSince1970)
            let payload = b64(Data(#"{"sub":"\#(sub)","exp":\#(exp),"iat":\#(now - 600),"ver":\#(ver)}"#.utf8))
            let signingKey = key ?? Array(HMAC<SHA256>.authenticationCode(for: Array("weft user tokens v1".utf8), using: SymmetricKey(data: Array(secret.utf8))))
            let mac = HMAC<SHA256>.authenticationCode(for: Array("\(header).\(payload)".utf8), using: SymmetricKey(data: signingKey))
            return "\(header).\(payload).\(b64(Data(mac)))"
        }

        static func base32Decode(_ s: String) -> [UInt8] {
            let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
            var bits = 0
            var value = 0
            var out: [UInt8] = []
            for ch in s where ch != "=" {
                guard let v = alphabet.firstIndex(of: ch) else { return [] }
                value = value << 5 | v
                bits += 5
                if bits >= 8 {
                    out.append(UInt8((value >> (bits - 8)) & 0xFF))
                    bits -= 8
                }
            }
            return out
        }

        @Test(.timeLimit(.minutes(4))) func authorizationBadInputAndRateLimits() async throws {
            let c = try ClusterProcess(name: "authz", nodes: 3, shards: 2, messaging: "bcrypt_cost = 4\nsends_per_minute = 5\nhistory_reads_per_minute = 6")
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let alice = try #require(await c.register("alice"))
            let bob = try #require(await c.register("bob", via: 2))
            let carol = try #require(await c.register("carol", via: 3))
            let a = try #require(await c.login("alice"))
            let b = try #require(await c.login("bob", via: 2))
            let cc = try #require(await c.login("carol", via: 3))
            #expect(await c.befriend((alice, a), (bob, b)))
            let sent = await c.call(1, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "secret plans"])
            #expect(sent.status == 200)
            let mid = try #require(sent.u64("message_id"))
            let cid = "d\(min(alice, bob))-\(max(alice, bob))"

            // Every user route × tokens that must not work.
            let old = try #require(await c.login("alice", via: 2))
            let logout = await c.call(3, "POST", "/api/v1/auth/logout", token: old)
            #expect(logout.status == 204)
            let fresh = try #require(await c.login("alice", via: 3))
            var tampered = Array(fresh)
            tampered[tampered.count - 3] = tampered[tampered.count - 3] == "A" ? "B" : "A"
            let now = Int(Date().timeIntervalSince1970)
            let badTokens: [(String?, String)] = [
                (nil, "unauthorized"), ("not-a-jwt", "invalid_token"), (String(tampered), "invalid_token"),
                (Self.mint(sub: alice, exp: now - 60, ver: 1), "invalid_token"),
                (Self.mint(sub: alice, exp: now + 600, ver: 1, key: Array(repeating: 7, count: 32)), "invalid_token"),
                (old, "token_revoked"), (a, "token_revoked"),
            ]
            let routes: [(String, String, [String: Any]?)] = [
                ("GET", "/api/v1/users/me", nil), ("PATCH", "/api/v1/users/me", ["display_name": "x"]), ("GET", "/api/v1/users/\(bob)", nil),
                ("GET", "/api/v1/users?username=bob", nil), ("POST", "/api/v1/contacts/requests", ["user_id": carol]),
                ("POST", "/api/v1/contacts/requests/\(bob)/accept", nil), ("GET", "/api/v1/contacts", nil), ("DELETE", "/api/v1/contacts/\(bob)", nil),
                ("POST", "/api/v1/contacts/\(bob)/block", nil), ("DELETE", "/api/v1/contacts/\(bob)/block", nil),
                ("POST", "/api/v1/messages", ["receiver_id": bob, "message_type": "text", "content": "x"]),
                ("GET", "/api/v1/messages?receiver_id=\(bob)", nil), ("DELETE", "/api/v1/messages/\(mid)", nil), ("GET", "/api/v1/sync", nil),
                ("GET", "/api/v1/conversations", nil), ("POST", "/api/v1/conversations/\(cid)/read", ["message_id": mid]),
                ("POST", "/api/v1/auth/logout", nil), ("POST", "/api/v1/auth/totp/enable", nil),
            ]
            for (token, code) in badTokens {
                for (method, path, body) in routes {
                    let r = await c.call(2, method, path, token: token, json: body)
                    #expect(r.status == 401 && r.errorCode == code, "\(method) \(path) with \(code) case: \(r.status) \(r.errorCode ?? "")")
                }
            }
            // The revoked token (a) stays revoked on every node once their replicas applied the logout.
            for n in c.nodes { #expect(await c.call(n, "GET", "/api/v1/users/me", token: a).status == 401) }

            // Another user: others' messages and conversations are not found; her own empty view only.
            #expect(await c.call(1, "DELETE", "/api/v1/messages/\(mid)", token: cc).status == 404)
            #expect(await c.call(1, "POST", "/api/v1/conversations/\(cid)/read", token: cc, json: ["message_id": mid]).status == 404)
            let peek = await c.call(1, "GET", "/api/v1/messages?receiver_id=\(alice)", token: cc)
            #expect(peek.status == 200 && (peek["messages"] as? [Any])?.isEmpty == true)
            let hers = await c.syncAll(1, token: cc)
            #expect(hers?.isEmpty == true)
            // A user token opens no operator route; the operator token opens no user route.
            #expect(await c.call(1, "GET", "/api/v1/cluster/status", token: fresh).status == 401)
            #expect(await c.call(1, "GET", "/api/v1/users/me", token: ClusterProcess.token).status == 401)

            // Bad input: a clear 4xx, nothing written.
            let send = "/api/v1/messages"
            let cases: [(String, String, Data?, [String: Any]?, Int, String)] = [
                ("POST", send, Data("{\"receiver_id\":".utf8), nil, 400, "malformed_json"),
                ("POST", send, Data("[1,2]".utf8), nil, 400, "malformed_json"),
                ("POST", send, Data([0x7B, 0x22, 0xFF, 0xFE, 0x22, 0x3A, 0x31, 0x7D]), nil, 400, "malformed_json"),
                ("POST", send, nil, ["receiver_id": bob, "message_type": "text", "content": "x", "colour": "red"], 400, "unknown_field"),
                // A repeated key: JSONSerialization (the field checks) keeps the last, JSONDecoder the first.
                ("POST", send, Data(#"{"receiver_id":\#(bob),"message_type":"text","content":"x","content":null}"#.utf8), nil, 400, "duplicate_field"),
                ("POST", send, Data(#"{"receiver_id":\#(bob),"message_type":"text","content":"x","\u0063ontent":"y"}"#.utf8), nil, 400, "duplicate_field"),
                // The same in UTF-16LE, which Foundation's parsers read too: refused as not UTF-8.
                ("POST", send, Data(#"{"receiver_id":\#(bob),"message_type":"text","content":null,"\u0063ontent":"x"}"#.data(using: .utf16LittleEndian) ?? Data()), nil, 400, "malformed_json"),
                ("POST", send, nil, ["receiver_id": "\(bob)", "message_type": "text", "content": "x"], 400, "wrong_type"),
                ("POST", send, nil, ["receiver_id": -1, "message_type": "text", "content": "x"], 400, "wrong_type"),
                ("POST", send, nil, ["message_type": "text", "content": "x"], 400, "invalid_receiver"),
                ("POST", send, nil, ["receiver_id": bob, "group_id": 4_294_967_296, "message_type": "text", "content": "x"], 400, "invalid_receiver"),
                ("POST", send, nil, ["receiver_id": bob, "message_type": "text", "content": "x", "mentions": [bob]], 400, "unexpected_mentions"),
                ("POST", send, nil, ["group_id": 7, "message_type": "text", "content": "x"], 404, "unknown_group"),
                ("POST", send, nil, ["receiver_id": bob, "message_type": "sticker", "content": "x"], 400, "invalid_message_type"),
                ("POST", send, nil, ["receiver_id": bob, "message_type": "text", "content": String(repeating: "x", count: 4097)], 400, "content_too_long"),
                ("POST", send, nil, ["receiver_id": bob, "message_type": "image", "content": ""], 400, "missing_media"),
                ("POST", send, nil, ["receiver_id": bob, "message_type": "text", "content": "x", "client_msg_id": ""], 400, "invalid_client_msg_id"),
                ("POST", send, Data(String(repeating: " ", count: 20_000).utf8), nil, 413, "body_too_large"),
                ("POST", send, nil, ["receiver_id": 99_999, "message_type": "text", "content": "x"], 403, "not_allowed"),
                ("GET", "/api/v1/messages?receiver_id=\(bob)&cursor=abc", nil, nil, 400, "invalid_cursor"),
                ("GET", "/api/v1/messages?receiver_id=\(bob)&cursor=01", nil, nil, 400, "invalid_cursor"),
                ("GET", "/api/v1/messages?receiver_id=\(bob)&limit=0", nil, nil, 400, "invalid_limit"),
                ("GET", "/api/v1/messages?receiver_id=\(bob)&limit=101", nil, nil, 400, "invalid_limit"),
                ("GET", "/api/v1/messages?receiver_id=\(bob)&colour=red", nil, nil, 400, "unknown_parameter"),
                ("GET", "/api/v1/sync?cursor=-1", nil, nil, 400, "invalid_cursor"),
                // Past the end of the inbox: not a cursor this account was given.
                ("GET", "/api/v1/sync?cursor=999999", nil, nil, 400, "invalid_cursor"),
                ("GET", "/api/v1/users/99999", nil, nil, 404, "unknown_user"),
                ("GET", "/api/v1/users/0", nil, nil, 404, "unknown_user"),
                ("GET", "/api/v1/users/abc", nil, nil, 404, "unknown_user"),
                ("DELETE", "/api/v1/messages/18446744073709551615", nil, nil, 404, "unknown_message"),
                ("DELETE", "/api/v1/messages/0", nil, nil, 404, "unknown_message"),
                ("POST", "/api/v1/conversations/d1-1/read", nil, ["message_id": mid], 404, "unknown_conversation"),
                ("PATCH", "/api/v1/users/me", nil, ["display_name": ""], 400, "invalid_display_name"),
                ("POST", "/api/v1/contacts/requests", nil, ["user_id": alice], 400, "invalid_user"),
                ("POST", "/api/v1/contacts/requests", nil, ["user_id": 99_999], 404, "unknown_user"),
            ]
            for (method, path, raw, json, status, code) in cases {
                let r = await c.call(1, method, path, token: fresh, json: json, body: raw)
                #expect(r.status == status && r.errorCode == code, "\(method) \(path) \(json.map { "\($0)" } ?? ""): \(r.status) \(r.errorCode ?? "")")
            }
            let register: [([String: Any], String)] = [
                (["username": "x", "password": "password-123"], "invalid_username"), (["username": "dave", "password": "short"], "invalid_password"),
                (["username": "dave", "password": String(repeating: "p", count: 73)], "invalid_password"),
                (["username": "alice", "password": "password-123"], "username_taken"), (["username": "ALICE", "password": "password-123"], "username_taken"),
            ]
            for (body, code) in register {
                let r = await c.call(2, "POST", "/api/v1/auth/register", json: body)
                #expect(r.errorCode == code, "\(body): \(r.status) \(r.errorCode ?? "")")
            }
            let wrong = await c.call(2, "POST", "/api/v1/auth/login", json: ["username": "alice", "password": "wrong-password"])
            let nobody = await c.call(2, "POST", "/api/v1/auth/login", json: ["username": "nobody", "password": "wrong-password"])
            #expect(wrong.status == 401 && nobody.status == 401 && wrong.data == nobody.data, "the same answer for a wrong password and an unknown user: \(String(decoding: wrong.data, as: UTF8.self)) vs \(String(decoding: nobody.data, as: UTF8.self))")
            // Nothing above was written: the conversation still holds its one message.
            #expect(await c.history(3, token: b, peer: alice)?.count == 1)

            // Rate limits, per user across nodes: 5 sends a minute. Two are used above: the first message, and
            // the refused send to a stranger (an attempt counts, or refusals would be a free probe).
            var statuses: [Int] = []
            for k in 0..<5 {
                let r = await c.call(1 + k % 3, "POST", send, token: fresh, json: ["receiver_id": bob, "message_type": "text", "content": "n\(k)"])
                statuses.append(r.status)
                if r.status == 429 { #expect(Int(r.headers["retry-after"] ?? "") ?? 0 >= 1) }
            }
            #expect(statuses == [200, 200, 200, 429, 429], "\(statuses)")
            // Bob has his own budget.
            #expect(await c.call(2, "POST", send, token: b, json: ["receiver_id": alice, "message_type": "text", "content": "hi"]).status == 200)
            // History reads: 6 a minute (one used above by the bad-input check? no: those were refused before the limit).
            var reads: [Int] = []
            for k in 0..<8 { reads.append(await c.call(1 + k % 3, "GET", "/api/v1/messages?receiver_id=\(alice)", token: b).status) }
            #expect(reads.filter { $0 == 429 }.count >= 2, "\(reads)")
        }

        @Test(.timeLimit(.minutes(3))) func totpSecondFactor() async throws {
            let c = try ClusterProcess(name: "totp", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            _ = try #require(await c.register("dana"))
            let t = try #require(await c.login("dana"))
            let enable = await c.call(1, "POST", "/api/v1/auth/totp/enable", token: t)
            #expect(enable.status == 200)
            let b32 = try #require(enable["secret"] as? String)
            #expect((enable["otpauth_uri"] as? String)?.hasPrefix("otpauth://totp/") == true)
            let totp = TOTP(secret: String(decoding: Self.base32Decode(b32), as: UTF8.self))
            func code() -> String { String(format: "%06d", totp.compute()) }
            #expect(await c.call(2, "POST", "/api/v1/auth/totp/confirm", token: t, json: ["code": "000000" == code() ? "111111" : "000000"]).errorCode == "invalid_totp")
            #expect(await c.call(2, "POST", "/api/v1/auth/totp/confirm", token: t, json: ["code": code()]).status == 204)
            // Turning it on ended the session.
            #expect(await c.call(3, "GET", "/api/v1/users/me", token: t).errorCode == "token_revoked")
            let without = await c.call(3, "POST", "/api/v1/auth/login", json: ["username": "dana", "password": "password-123"])
            #expect(without.status == 401 && without.errorCode == "totp_required")
            let wrongCode = await c.call(3, "POST", "/api/v1/auth/login", json: ["username": "dana", "password": "password-123", "totp_code": "12345"])
            #expect(wrongCode.errorCode == "invalid_totp")
            let t2 = try #require(await c.login("dana", via: 2, totp: code()))
            let me = await c.call(1, "GET", "/api/v1/users/me", token: t2)
            #expect(me["totp_enabled"] as? Bool == true)
            #expect(me.json?.keys.contains { $0.contains("secret") || $0.contains("hash") } == false)
            #expect(await c.call(1, "POST", "/api/v1/auth/totp/disable", token: t2, json: ["code": code()]).status == 204)
            #expect(await c.login("dana", via: 1) != nil)
        }
    }
}
