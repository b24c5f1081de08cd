import Foundation
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// A messaging API client for tests: JSON over URLSession against one node of a `ClusterProcess`.
struct Reply: @unchecked Sendable {
    var status: Int
    var data: Data
    var headers: [String: String]
    /// The body as a JSON object (nil for other bodies).
    var json: [String: Any]? { try? JSONSerialization.jsonObject(with: data) as? [String: Any] }
    var errorCode: String? { (json?["error"] as? [String: Any])?["code"] as? String }
    subscript(_ key: String) -> Any? { json?[key] }
    func u64(_ key: String) -> UInt64? { (json?[key] as? NSNumber)?.uint64Value }
}

extension ClusterProcess {
    /// One request; status 0 when no answer came (node down, timeout).
    func call(
        _ node: Int, _ method: String, _ path: String, token: String? = nil, json: Any? = nil, body: Data? = nil,
        contentType: String = "application/json", timeout: Double = 8
    ) async -> Reply {
        guard let port = apiPorts[node], let url = URL(string: "http://127.0.0.1:\(port)\(path)") else { return Reply(status: 0, data: Data(), headers: [:]) }
        var req = URLRequest(url: url)
        req.httpMethod = method
        req.timeoutInterval = timeout
        if let token { req.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
        if let json {
            req.httpBody = try? JSONSerialization.data(withJSONObject: json)
            req.setValue(contentType, forHTTPHeaderField: "Content-Type")
        } else if let body {
            req.httpBody = body
            req.setValue(contentType, forHTTPHeaderField: "Content-Type")
        }
        guard let (data, resp) = try? await URLSession.shared.data(for: req), let http = resp as? HTTPURLResponse else {
            return Reply(status: 0, data: Data(), headers: [:])
        }
        var headers: [String: String] = [:]
        for (k, v) in http.allHeaderFields { headers["\(k)".lowercased()] = "\(v)" }
        return Reply(status: http.statusCode, data: data, headers: headers)
    }

    /// Retries `body` until it gives a non-nil value or `seconds` pass (for conditions that become true
    /// as a cluster recovers or a relay catches up: polled, never slept on blindly).
    func eventually<T>(seconds: Double = 15, _ body: () async -> T?) async -> T? {
        let end = Date().addingTimeInterval(seconds)
        repeat {
            if let v = await body() { return v }
            try? await Task.sleep(for: .milliseconds(100))
        } while Date() < end
        return nil
    }

    /// Registers a user (retrying through elections); returns the user id.
    func register(_ name: String, password: String = "password-123", via node: Int = 1) async -> UInt64? {
        await eventually {
            let r = await call(node, "POST", "/api/v1/auth/register", json: ["username": name, "password": password])
            if r.status == 201 { return r.u64("user_id") }
            if r.errorCode == "username_taken" {
                // An earlier attempt landed (its answer was lost): look the id up.
                let l = await call(node, "POST", "/api/v1/auth/login", json: ["username": name, "password": password])
                return l.status == 200 ? l.u64("user_id") : nil
            }
            return nil
        }
    }

    func login(_ name: String, password: String = "password-123", via node: Int = 1, totp: String? = nil) async -> String? {
        await eventually {
            var body: [String: Any] = ["username": name, "password": password]
            if let totp { body["totp_code"] = totp }
            let r = await call(node, "POST", "/api/v1/auth/login", json: body)
            return r.status == 200 ? r["token"] as? String : nil
        }
    }

    /// Makes two users contacts (a asks, b accepts).
    func befriend(_ a: (id: UInt64, token: String), _ b: (id: UInt64, token: String), via node: Int = 1) async -> Bool {
        let asked = await eventually {
            let r = await call(node, "POST", "/api/v1/contacts/requests", token: a.token, json: ["user_id": b.id, "note": "hi"])
            return r.status == 202 || r.status == 200 || r.errorCode == "already_requested" ? true : nil
        }
        guard asked == true else { return false }
        let accepted = await eventually {
            let r = await call(node, "POST", "/api/v1/contacts/requests/\(a.id)/accept", token: b.token)
            return r.status == 200 || r.errorCode == "already_contacts" ? true : nil
        }
        return accepted == true
    }

    /// Every message of a conversation as `token`'s user sees it, newest first, following `next_cursor`.
    func history(_ node: Int, token: String, peer: UInt64, limit: Int = 7) async -> [[String: Any]]? {
        var out: [[String: Any]] = []
        var cursor: String?
        for _ in 0..<1000 {
            var path = "/api/v1/messages?receiver_id=\(peer)&limit=\(limit)"
            if let cursor { path += "&cursor=\(cursor)" }
            let r = await call(node, "GET", path, token: token)
            guard r.status == 200, let page = r["messages"] as? [[String: Any]] else { return nil }
            out += page
            guard let next = r["next_cursor"] as? String else { return out }
            cursor = next
        }
        return nil
    }

    /// Every inbox event of `token`'s user from cursor 0.
    func syncAll(_ node: Int, token: String) async -> [[String: Any]]? {
        var out: [[String: Any]] = []
        var cursor = "0"
        for _ in 0..<1000 {
            let r = await call(node, "GET", "/api/v1/sync?cursor=\(cursor)&limit=50", token: token)
            guard r.status == 200, let events = r["events"] as? [[String: Any]], let next = r["next_cursor"] as? String else { return nil }
            if events.isEmpty { return out }
            out += events
            cursor = next
        }
        return nil
    }
}
