import Foundation
import Testing

@testable import WeftServer

/// The hand-written push JSON (PushJSON.swift) must say what `JSONEncoder` said, and the hand-written
/// timestamps what Foundation's ISO 8601 style said.
@Suite struct PushJSONTests {
    struct Frame: Encodable {
        var type = "event"
        var event: MessagingAPI.EventBody
    }

    static let awkward = [
        "", "plain", "quote \" and backslash \\ and slash /", "tab\tnewline\nreturn\r", "\u{0}\u{1}\u{8}\u{b}\u{c}\u{1f}\u{7f}",
        "日本語のメッセージ 😀👍🏽", "\u{2028}\u{2029}", String(repeating: "x", count: 5000), "emoji at the end 🇯🇵",
    ]

    static func object(_ bytes: [UInt8]) throws -> NSDictionary {
        let o = try JSONSerialization.jsonObject(with: Data(bytes))
        return try #require(o as? NSDictionary)
    }

    static func same(_ e: MessagingAPI.EventBody) throws {
        let expected = try object(Array(JSONEncoder().encode(Frame(event: e))))
        let got = try object(e.pushFrame)
        #expect(got == expected, "\(String(decoding: e.pushFrame, as: UTF8.self))")
    }

    @Test func eventsWithAndWithoutOptionals() throws {
        try Self.same(MessagingAPI.EventBody(cursor: "1", type: "contact_accepted", created_at: "2026-12-02T15:22:13.123Z", peer_id: 7))
        try Self.same(
            MessagingAPI.EventBody(
                cursor: "18446744073709551615", type: "group_added", created_at: "x", peer_id: UInt64.max, conversation_id: "g_1", seq: 0,
                from_me: false, group_id: 1 << 40, user_ids: [], user_id: 0, role: "admin", name: "n", notice: ""))
        try Self.same(MessagingAPI.EventBody(cursor: "3", type: "group_added", created_at: "x", peer_id: 1, user_ids: [1, 2, UInt64.max]))
        for (k, text) in Self.awkward.enumerated() {
            let m = MessagingAPI.MessageBody(
                message_id: UInt64(k) * 1_000_003, conversation_id: text, seq: UInt64(k), sender_id: 9, receiver_id: k % 2 == 0 ? 10 : nil,
                group_id: k % 2 == 1 ? 5 << 32 : nil, message_type: "text", content: text, media_url: k % 3 == 0 ? text : nil,
                mime_type: k % 3 == 0 ? "image/png" : nil, size: k % 3 == 0 ? 12345 : nil, created_at: "2026-01-01T00:00:00.000Z",
                recalled: k % 4 == 0, mentions: k % 2 == 1 ? [1, 2, 3] : nil, mention_all: k % 5 == 1 ? true : nil)
            try Self.same(
                MessagingAPI.EventBody(
                    cursor: "\(k)", type: "message", created_at: "t", peer_id: 9, conversation_id: "c", message_id: 1, seq: 2, from_me: k % 2 == 0,
                    note: text, message: m, mention: k % 2 == 1 ? "all" : nil))
        }
    }

    @Test func randomStrings() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            let scalars = (0..<Int.random(in: 0...40, using: &rng)).compactMap { _ -> Character? in
                let pick = Int.random(in: 0..<4, using: &rng)
                let v: UInt32 =
                    pick == 0 ? UInt32.random(in: 0..<0x80, using: &rng) : pick == 1 ? UInt32.random(in: 0x80..<0xD800, using: &rng)
                    : pick == 2 ? UInt32.random(in: 0xE000..<0x10000, using: &rng) : UInt32.random(in: 0x10000..<0x110000, using: &rng)
                return Unicode.Scalar(v).map(Character.init)
            }
            let s = String(scalars)
            try Self.same(MessagingAPI.EventBody(cursor: s, type: "contact_request", created_at: s, peer_id: 1, from_me: false, note: s))
        }
    }

    @Test func timestampsAreFoundationsISO8601() {
        var rng = SystemRandomNumberGenerator()
        var micros: [Int64] = [0, 1, 999, 1000, 999_999, 1_000_000, 951_782_400_000_000, 4_107_542_399_999_999, 1_798_761_599_999_999]
        for _ in 0..<2000 { micros.append(Int64.random(in: 0..<7_258_118_400_000_000, using: &rng)) }  // 1970 to 2200
        for m in micros {
            let expected = MessagingAPI.iso(Date(timeIntervalSince1970: Double(m) / 1_000_000))
            let got = ISOTime.string(micros: m)
            if got != expected {
                // Foundation goes through a Double of seconds (an ulp is ~1 µs by 2200): within a
                // microsecond or two after a millisecond's start it can fall just below it and truncate
                // to the millisecond before. The integer arithmetic is the exact one; nothing else may
                // differ.
                let later = MessagingAPI.iso(Date(timeIntervalSince1970: Double(m + 2) / 1_000_000))
                #expect(m % 1000 < 2 && later == got, "\(m): \(got) vs \(expected)")
            }
        }
        #expect(ISOTime.string(micros: 1_764_688_933_123_456) == "2025-12-02T15:22:13.123Z")
        #expect(ISOTime.string(micros: 951_782_400_000_000) == "2000-02-29T00:00:00.000Z")
        #expect(ISOTime.string(micros: -62_135_596_800_000_000) == "0001-01-01T00:00:00.000Z")
        #expect(ISOTime.string(micros: 253_402_300_799_999_999) == "9999-12-31T23:59:59.999Z")
        #expect(ISOTime.string(micros: -1) == "1969-12-31T23:59:59.999Z")
        // Outside years 1...9999 (a wild clock, a damaged record): Foundation answers, nothing traps.
        for m: Int64 in [-400_000_000_000_000_000, -62_135_596_800_000_001, 253_402_300_800_000_000, 400_000_000_000_000_000] {
            #expect(!ISOTime.string(micros: m).isEmpty)
        }
    }
}
