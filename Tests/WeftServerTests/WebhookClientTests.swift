import ClusterConfig
import Foundation
import Testing
import WeftTesting

@testable import WeftServer

/// The offline-push webhook client against a real receiver process (`Tools/webhook-receiver.py`): http
/// over a kept-alive connection, and https trusted only through `[push] ca_file` and only for the host
/// name its certificate names.
@Suite(.serialized) struct WebhookClientTests {
    static let secret = "webhook-secret-0123456789"

    func post(_ client: WebhookClient, _ text: String) async throws -> Int {
        try await client.post(body: Array("{\"text\":\"\(text)\"}".utf8), headers: [("Content-Type", "application/json")])
    }

    @Test(.timeLimit(.minutes(1))) func anHTTPWebhookGetsEveryPOSTOverOneKeptConnection() async throws {
        let rx = try WebhookReceiver(secret: Self.secret, failFirst: 1)
        defer { rx.stop() }
        let url = try #require(WebhookURL("http://127.0.0.1:\(rx.port)/hooks/weft"))
        let client = WebhookClient(url: url, tls: try WebhookClient.tls(caFile: nil))
        var statuses: [Int] = []
        for k in 1...3 { statuses.append(try await post(client, "p\(k)")) }
        await client.shutdown()
        #expect(statuses == [503, 200, 200], "the receiver's status comes back as it is")
        let got = rx.all
        #expect(got.compactMap { ($0["body"] as? [String: Any])?["text"] as? String } == ["p1", "p2", "p3"])
        #expect(got.allSatisfy { $0["path"] as? String == "/hooks/weft" })
        #expect(Set(got.compactMap { $0["client_port"] as? Int }).count == 1, "one connection, kept alive: \(got.map { $0["client_port"] ?? "" })")
    }

    @Test(.timeLimit(.minutes(1))) func anHTTPSWebhookIsTrustedOnlyThroughItsCertificate() async throws {
        let rx = try WebhookReceiver(secret: Self.secret, tls: true)
        defer { rx.stop() }
        let ca = try #require(rx.certificate)
        let url = try #require(WebhookURL("https://localhost:\(rx.port)/hooks/weft"))

        // The system's trust store does not know a self-signed receiver: the handshake fails, nothing is sent.
        let untrusted = WebhookClient(url: url, tls: try WebhookClient.tls(caFile: nil))
        await #expect { _ = try await post(untrusted, "untrusted") } throws: { "\($0)".contains("CERTIFICATE_VERIFY_FAILED") }
        await untrusted.shutdown()
        #expect(rx.all.isEmpty, "nothing reached a receiver whose certificate was not trusted")

        // Trusted through ca_file: delivered over TLS.
        let trusted = WebhookClient(url: url, tls: try WebhookClient.tls(caFile: ca))
        #expect(try await post(trusted, "trusted") == 200)
        await trusted.shutdown()
        #expect(rx.all.compactMap { ($0["body"] as? [String: Any])?["text"] as? String } == ["trusted"])

        // The right CA but an address the certificate does not name (it names localhost only, and an IP
        // address is matched against the certificate's IP entries): refused as well.
        let otherName = try #require(WebhookURL("https://127.0.0.1:\(rx.port)/hooks/weft"))
        let wrongHost = WebhookClient(url: otherName, tls: try WebhookClient.tls(caFile: ca))
        await #expect { _ = try await post(wrongHost, "wrong-host") } throws: { "\($0)".contains("failedToValidateHostname") }
        await wrongHost.shutdown()
        #expect(rx.all.count == 1)
    }

    @Test func aCAFileWithoutCertificatesIsNamed() throws {
        #expect {
            _ = try WebhookClient.tls(caFile: "/etc/passwd")
        } throws: { error in
            "\(error)".contains("/etc/passwd")
        }
    }

    @Test(.timeLimit(.minutes(1))) func aReceiverThatIsNotThereFailsThePOST() async throws {
        // A port nothing listens on: bind one, note it, close it.
        let rx = try WebhookReceiver(secret: Self.secret)
        let port = rx.port
        rx.stop()
        let client = WebhookClient(url: try #require(WebhookURL("http://127.0.0.1:\(port)/")), tls: try WebhookClient.tls(caFile: nil))
        await #expect { _ = try await post(client, "nobody") } throws: { "\($0)".contains("refused") }
        await client.shutdown()
    }
}
