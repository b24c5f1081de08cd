import Foundation

/// The JSON of what the WebSocket sessions push, written by hand (Docs/delivery.md, "Cost of a push").
///
/// A push frame is rendered once per session and event: at 500 members a group message is 500 of them.
/// Foundation's `JSONEncoder` spent ~40 µs on each (12 % of the servers' CPU in a 500-member group
/// benchmark, measured with perf); this writer produces the same objects (same keys, same values, absent
/// optionals left out) by appending bytes. `PushJSONTests` checks it against `JSONEncoder` field by field.
struct JSONWriter {
    var bytes: [UInt8] = []
    /// Whether the object being written has a member yet (one level per open object).
    private var hasMember: [Bool] = []

    init(capacity: Int = 512) { bytes.reserveCapacity(capacity) }

    mutating func open() {
        bytes.append(UInt8(ascii: "{"))
        hasMember.append(false)
    }

    mutating func close() {
        bytes.append(UInt8(ascii: "}"))
        _ = hasMember.popLast()
    }

    /// `"name":` (with the comma before it when needed). Names are ASCII literals without escapes.
    mutating func key(_ name: StaticString) {
        if hasMember.last == true { bytes.append(UInt8(ascii: ",")) }
        if !hasMember.isEmpty { hasMember[hasMember.count - 1] = true }
        bytes.append(UInt8(ascii: "\""))
        name.withUTF8Buffer { bytes.append(contentsOf: $0) }
        bytes.append(UInt8(ascii: "\""))
        bytes.append(UInt8(ascii: ":"))
    }

    mutating func string(_ s: String) {
        bytes.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): bytes.append(contentsOf: [0x5C, 0x22])
            case UInt8(ascii: "\\"): bytes.append(contentsOf: [0x5C, 0x5C])
            case 0x0A: bytes.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: bytes.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: bytes.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0..<0x20:
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                bytes.append(contentsOf: [0x5C, UInt8(ascii: "u"), 0x30, 0x30, hex[Int(b >> 4)], hex[Int(b & 15)]])
            default: bytes.append(b)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }

    mutating func number(_ v: UInt64) {
        if v == 0 { return bytes.append(UInt8(ascii: "0")) }
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var n = 0
        var x = v
        withUnsafeMutableBytes(of: &digits) { d in
            while x > 0 {
                d[n] = UInt8(ascii: "0") + UInt8(x % 10)
                x /= 10
                n += 1
            }
            for i in stride(from: n - 1, through: 0, by: -1) { bytes.append(d[i]) }
        }
    }

    mutating func bool(_ v: Bool) { bytes.append(contentsOf: v ? Array("true".utf8) : Array("false".utf8)) }

    mutating func field(_ name: StaticString, _ v: String) {
        key(name)
        string(v)
    }

    mutating func field(_ name: StaticString, _ v: UInt64) {
        key(name)
        number(v)
    }

    mutating func field(_ name: StaticString, _ v: Bool) {
        key(name)
        bool(v)
    }

    mutating func field(_ name: StaticString, _ v: String?) { if let v { field(name, v) } }
    mutating func field(_ name: StaticString, _ v: UInt64?) { if let v { field(name, v) } }
    mutating func field(_ name: StaticString, _ v: Bool?) { if let v { field(name, v) } }

    mutating func field(_ name: StaticString, _ v: [UInt64]?) {
        guard let v else { return }
        key(name)
        bytes.append(UInt8(ascii: "["))
        for (i, x) in v.enumerated() {
            if i > 0 { bytes.append(UInt8(ascii: ",")) }
            number(x)
        }
        bytes.append(UInt8(ascii: "]"))
    }
}

extension MessagingAPI.MessageBody {
    func write(to w: inout JSONWriter) {
        w.open()
        w.field("message_id", message_id)
        w.field("conversation_id", conversation_id)
        w.field("seq", seq)
        w.field("sender_id", sender_id)
        w.field("receiver_id", receiver_id)
        w.field("group_id", group_id)
        w.field("message_type", message_type)
        w.field("content", content)
        w.field("media_url", media_url)
        w.field("mime_type", mime_type)
        w.field("size", size)
        w.field("created_at", created_at)
        w.field("recalled", recalled)
        w.field("mentions", mentions)
        w.field("mention_all", mention_all)
        w.close()
    }
}

extension MessagingAPI.EventBody {
    func write(to w: inout JSONWriter) {
        w.open()
        w.field("cursor", cursor)
        w.field("type", type)
        w.field("created_at", created_at)
        w.field("peer_id", peer_id)
        w.field("conversation_id", conversation_id)
        w.field("message_id", message_id)
        w.field("seq", seq)
        w.field("from_me", from_me)
        w.field("note", note)
        if let message {
            w.key("message")
            message.write(to: &w)
        }
        w.field("group_id", group_id)
        w.field("mention", mention)
        w.field("user_ids", user_ids)
        w.field("user_id", user_id)
        w.field("role", role)
        w.field("name", name)
        w.field("notice", notice)
        w.close()
    }

    /// The WebSocket frame of this event: `{"type":"event","event":{…}}`.
    var pushFrame: [UInt8] {
        var w = JSONWriter()
        w.open()
        w.field("type", "event")
        w.key("event")
        write(to: &w)
        w.close()
        return w.bytes
    }
}

/// RFC 3339 UTC timestamps with milliseconds (`2026-12-02T15:22:13.123Z`), the API's one time format,
/// without Foundation's format styles (a few µs each, and every pushed event has one or two).
enum ISOTime {
    /// Years 1…9999 only: outside them (a wild clock, a damaged record) Foundation's formatter answers.
    static let microsRange: ClosedRange<Int64> = -62_135_596_800_000_000...253_402_300_799_999_999

    static func string(micros: Int64) -> String {
        guard microsRange.contains(micros) else { return MessagingAPI.iso(Date(timeIntervalSince1970: Double(micros) / 1_000_000)) }
        // Floor division, so instants before 1970 also land on the right day and millisecond.
        let millis = micros >= 0 ? micros / 1000 : (micros - 999) / 1000
        let daysSinceEpoch = millis >= 0 ? millis / 86_400_000 : (millis - 86_399_999) / 86_400_000
        let msOfDay = millis - daysSinceEpoch * 86_400_000
        // Days to a civil date (proleptic Gregorian), after Howard Hinnant's `civil_from_days`.
        let z = daysSinceEpoch + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        var out: [UInt8] = []
        out.reserveCapacity(24)
        func put(_ v: Int64, _ width: Int) {
            var d = [UInt8](repeating: UInt8(ascii: "0"), count: width)
            var x = v
            var i = width - 1
            while i >= 0 {
                d[i] = UInt8(ascii: "0") + UInt8(x % 10)
                x /= 10
                i -= 1
            }
            out.append(contentsOf: d)
        }
        put(year, 4)
        out.append(UInt8(ascii: "-"))
        put(month, 2)
        out.append(UInt8(ascii: "-"))
        put(day, 2)
        out.append(UInt8(ascii: "T"))
        put(msOfDay / 3_600_000, 2)
        out.append(UInt8(ascii: ":"))
        put(msOfDay / 60_000 % 60, 2)
        out.append(UInt8(ascii: ":"))
        put(msOfDay / 1000 % 60, 2)
        out.append(UInt8(ascii: "."))
        put(msOfDay % 1000, 3)
        out.append(UInt8(ascii: "Z"))
        return String(decoding: out, as: UTF8.self)
    }
}
