/// Finds a key that appears twice in one JSON object. Foundation's two parsers disagree on such input —
/// `JSONSerialization` keeps the last value, `JSONDecoder` the first — and the API checks fields on the
/// one and decodes the other, so a body with a repeated key is refused instead (`duplicate_field`).
///
/// Runs over text a parser has already accepted as JSON: one pass, no tree. Keys are compared as Swift
/// strings after their escapes are undone, as both parsers compare them (so `"a"` and `"\u0061"`, or two
/// canonically equivalent spellings, are the same key).
enum JSONDuplicateKeys {
    /// The first repeated key (in document order of its second appearance), or nil.
    static func first(in bytes: some Collection<UInt8>) -> String? {
        let b = Array(bytes)
        // One entry per open object or array: the keys seen (objects), and whether a key comes next.
        var stack: [(isObject: Bool, keys: Set<String>, keyNext: Bool)] = []
        var i = 0
        while i < b.count {
            switch b[i] {
            case UInt8(ascii: "{"):
                stack.append((true, [], true))
            case UInt8(ascii: "["):
                stack.append((false, [], false))
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                if !stack.isEmpty { stack.removeLast() }
            case UInt8(ascii: ","):
                if let top = stack.last, top.isObject { stack[stack.count - 1].keyNext = true }
            case UInt8(ascii: "\""):
                let isKey = stack.last.map { $0.isObject && $0.keyNext } ?? false
                let (text, end) = string(b, from: i + 1, decode: isKey)
                i = end
                if isKey, let key = text {
                    stack[stack.count - 1].keyNext = false
                    if !stack[stack.count - 1].keys.insert(key).inserted { return key }
                }
            default:
                break
            }
            i += 1
        }
        return nil
    }

    /// The string starting after its opening quote at `start`: its text with escapes undone (when
    /// `decode`), and the index of its closing quote.
    static func string(_ b: [UInt8], from start: Int, decode: Bool) -> (String?, Int) {
        var i = start
        var out: [UInt8] = []
        var pendingHigh: UInt32?
        func put(_ scalar: UInt32) {
            let s = Unicode.Scalar(scalar) ?? "\u{FFFD}"
            out.append(contentsOf: Array(String(Character(s)).utf8))
        }
        while i < b.count, b[i] != UInt8(ascii: "\"") {
            guard b[i] == UInt8(ascii: "\\"), i + 1 < b.count else {
                if decode {
                    if let h = pendingHigh { put(h) }
                    pendingHigh = nil
                    out.append(b[i])
                }
                i += 1
                continue
            }
            let e = b[i + 1]
            i += 2
            guard decode else {
                if e == UInt8(ascii: "u") { i += 4 }
                continue
            }
            if e == UInt8(ascii: "u"), i + 4 <= b.count, let v = UInt32(String(decoding: b[i..<i + 4], as: UTF8.self), radix: 16) {
                i += 4
                if (0xD800...0xDBFF).contains(v) {
                    if let h = pendingHigh { put(h) }
                    pendingHigh = v
                } else if (0xDC00...0xDFFF).contains(v), let h = pendingHigh {
                    pendingHigh = nil
                    put(0x10000 + ((h - 0xD800) << 10) + (v - 0xDC00))
                } else {
                    if let h = pendingHigh { put(h) }
                    pendingHigh = nil
                    put(v)
                }
                continue
            }
            if let h = pendingHigh { put(h) }
            pendingHigh = nil
            switch e {
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            default: out.append(e)  // \" \\ \/
            }
        }
        if let h = pendingHigh { put(h) }
        return (decode ? String(decoding: out, as: UTF8.self) : nil, i)
    }
}
