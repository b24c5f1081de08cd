import ClusterConfig
import Foundation
import Testing
import WeftTesting

@testable import WeftServer

/// The offline-push webhook client against a real receiver process (`Tools/webhook-receiver.py`): http
/// over a kept-alive connection; https trusted only through `[push] ca_file` and only for the name its
/// certificate carries; redirects not followed; the status alone decides, however long or slow the body.
@Suite(.serialized) struct WebhookClientTests {
    static let secret = "webhook-secret-0123456789"

    /// A client shut down on every path (AsyncHTTPClient traps on one that is not).
    func withClient<T>(_ text: String, caFile: String? = nil, _ body: (WebhookClient) async throws -> T) async throws -> T {
        let url = try #require(WebhookURL(text))
        let client = WebhookClient(url: url, tls: try WebhookClient.tls(caFile: caFile))
        do {
            let r = try await body(client)
            await client.shutdown()
            return r
        } catch {
            await client.shutdown()
            throw error
        }
    }

    func post(_ client: WebhookClient, _ text: String) async throws -> Int {
        try await client.post(body: Array("{\"text\":\"\(text)\"}".utf8), headers: [("Content-Type", "application/json")])
    }

    func texts(_ rx: WebhookReceiver) -> [String] { rx.all.compactMap { ($0["body"] as? [String: Any])?["text"] as? String } }

    @Test(.timeLimit(.minutes(1))) func anHTTPWebhookGetsEveryPOSTOverOneKeptConnection() async throws {
        let rx = try WebhookReceiver(secret: Self.secret, failFirst: 1)
        defer { rx.stop() }
        let statuses = try await withClient("http://127.0.0.1:\(rx.port)/hooks/weft") { client in
            var statuses: [Int] = []
            for k in 1...3 { statuses.append(try await post(client, "p\(k)")) }
            return statuses
        }
        #expect(statuses == [503, 200, 200], "the receiver's status comes back as it is")
        let got = rx.all
        #expect(texts(rx) == ["p1", "p2", "p3"])
        #expect(got.allSatisfy { $0["path"] as? String == "/hooks/weft" })
        #expect(Set(got.compactMap { $0["client_port"] as? Int }).count == 1, "one connection, kept alive: \(got.map { $0["client_port"] ?? "" })")
    }

    @Test(.timeLimit(.minutes(1))) func anHTTPSWebhookIsTrustedOnlyThroughItsCertificate() async throws {
        let rx = try WebhookReceiver(secret: Self.secret, tls: true)
        defer { rx.stop() }
        let ca = try #require(rx.certificate)
        let url = "https://localhost:\(rx.port)/hooks/weft"

        // The system's trust store does not know a self-signed receiver: the handshake fails, nothing is sent.
        let untrusted = await #expect(throws: (any Error).self) { try await withClient(url) { try await post($0, "untrusted") } }
        #expect("\(untrusted.map { "\($0)" } ?? "")".contains("CERTIFICATE_VERIFY_FAILED"))
        #expect(rx.all.isEmpty, "nothing reached a receiver whose certificate was not trusted")

        // Trusted through ca_file: delivered over TLS.
        #expect(try await withClient(url, caFile: ca) { try await post($0, "trusted") } == 200)
        #expect(texts(rx) == ["trusted"])

        // The right CA but an address the certificate does not name (it names localhost only, and an IP
        // address is matched against the certificate's IP entries): refused as well.
        let wrongHost = await #expect(throws: (any Error).self) {
            try await withClient("https://127.0.0.1:\(rx.port)/hooks/weft", caFile: ca) { try await post($0, "wrong-host") }
        }
        #expect("\(wrongHost.map { "\($0)" } ?? "")".contains("failedToValidateHostname"))
        #expect(rx.all.count == 1)
    }

    /// A redirect is an answer, not a place to go: its status comes back (not 2xx: retried later) and
    /// nothing is sent to where it points.
    @Test(.timeLimit(.minutes(1))) func aRedirectIsNotFollowed() async throws {
        let rx = try WebhookReceiver(secret: Self.secret, answer: "redirect")
        defer { rx.stop() }
        #expect(try await withClient("http://127.0.0.1:\(rx.port)/hooks/weft") { try await post($0, "r") } == 307)
        #expect(rx.all.map { $0["path"] as? String } == ["/hooks/weft"])
    }

    /// The status decides, whatever follows it: a body too long to read, or one that trickles in for
    /// ever, does not turn an accepted notification into a failure (which would send it again and
    /// again), nor hold the POST past the drain time.
    @Test(.timeLimit(.minutes(1)), arguments: ["big", "trickle"])
    func theStatusDecidesWhateverTheBody(answer: String) async throws {
        let rx = try WebhookReceiver(secret: Self.secret, answer: answer)
        defer { rx.stop() }
        let statuses = try await withClient("http://127.0.0.1:\(rx.port)/hooks/weft") { client in
            [try await post(client, "a"), try await post(client, "b")]
        }
        #expect(statuses == [200, 200])
        #expect(texts(rx) == ["a", "b"])
    }

    @Test func aCAFileWithoutCertificatesIsNamed() throws {
        let error = #expect(throws: (any Error).self) { try WebhookClient.tls(caFile: "/etc/passwd") }
        #expect("\(error.map { "\($0)" } ?? "")".contains("/etc/passwd"))
    }

    @Test func aURLTheClientWouldNotTakeIsRefusedBeforeTheStart() throws {
        for good in ["http://127.0.0.1:8080/p", "https://push.internal/hooks", "https://[::1]:8443/p"] {
            #expect(throws: Never.self, "\(good)") { try WebhookClient.check(try #require(WebhookURL(good))) }
        }
    }

    @Test(.timeLimit(.minutes(1))) func aReceiverThatIsNotThereFailsThePOSTAtOnce() async throws {
        // A port nothing listens on: the receiver's, once it is gone.
        let rx = try WebhookReceiver(secret: Self.secret)
        let port = rx.port
        rx.stop()
        let error = await #expect(throws: (any Error).self) { try await withClient("http://127.0.0.1:\(port)/") { try await post($0, "nobody") } }
        #expect("\(error.map { "\($0)" } ?? "")".contains("refused"))
    }
}
