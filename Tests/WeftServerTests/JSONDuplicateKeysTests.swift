import Foundation
import Testing

@testable import WeftServer

/// A key repeated in one JSON object is found however it is spelled; the same key in different objects,
/// and key-like text inside strings, are not repeats.
@Suite struct JSONDuplicateKeysTests {
    func first(_ s: String) -> String? { JSONDuplicateKeys.first(in: Array(s.utf8)) }

    @Test func repeatsInOneObjectAreFound() {
        #expect(first(#"{"a":1,"a":2}"#) == "a")
        #expect(first(#"{"type":"send","message":{"to":1},"message":{"to":2}}"#) == "message")
        #expect(first(#"{"m":{"x":1,"y":{"z":[1,{"q":1,"q":2}]}}}"#) == "q")
        #expect(first(#" { "a" : 1 , "b" : [ ] , "a" : null } "#) == "a")
    }

    @Test func escapedAndEquivalentSpellingsAreTheSameKey() {
        #expect(first(#"{"content":"x","\u0063ontent":"y"}"#) == "content")
        #expect(first(#"{"a\/b":1,"a/b":2}"#) == "a/b")
        #expect(first(#"{"\ud83d\ude00":1,"😀":2}"#) == "😀")
        // é precomposed and as e + combining acute: equal as Swift strings, as both parsers see keys.
        #expect(first("{\"caf\u{E9}\":1,\"cafe\u{301}\":2}") != nil)
        #expect(first(#"{"a\"b":1,"a\u0022b":2}"#) == "a\"b")
    }

    @Test func distinctKeysAreNotRepeats() {
        #expect(first(#"{"a":1,"b":2}"#) == nil)
        // The same key in sibling and nested objects.
        #expect(first(#"{"a":{"a":1},"b":[{"a":1},{"a":2}]}"#) == nil)
        // Values that look like keys, braces and quotes inside strings.
        #expect(first(#"{"a":"a","b":"\",\"a\":1,{","c":"}"}"#) == nil)
        #expect(first(#"["a","a",{"a":1}]"#) == nil)
        // Lone surrogates read as U+FFFD, so these two keys count as one: the scanner errs toward refusing
        // (Foundation's parsers refuse such text before the scanner runs, so no body gets here).
        #expect(first(#"{"\ud800":1,"\ud801":2}"#) != nil)
        #expect(first(#"{}"#) == nil)
    }

    /// UTF-16 JSON, which Foundation's parsers read but the check (reading UTF-8) would not see through,
    /// is refused before either looks at it.
    @Test func aFrameInUTF16IsRefused() throws {
        let frame = #"{"type":"send","request_id":"r","message":{"receiver_id":2,"message_type":"text","content":null,"\u0063ontent":"x"}}"#
        let utf16 = try #require(frame.data(using: .utf16LittleEndian))
        guard case .malformed = DeliverySocket.parse(String(decoding: utf16, as: UTF8.self)) else {
            Issue.record("a UTF-16 frame was taken")
            return
        }
        guard case .send(_, _, let refused?) = DeliverySocket.parse(frame.replacingOccurrences(of: "null", with: #""y""#)) else {
            Issue.record("a repeated key in a UTF-8 send frame was not refused")
            return
        }
        #expect(refused.code == "duplicate_field")
    }
}
