import WeftCore

/// Deterministic chat-like records: JSON message bodies of about 200 bytes with realistic text (short
/// sentences, mixed English and Japanese, the odd emoji and media message), spread over many
/// conversations with a skewed (few busy, many quiet) distribution.
public struct ChatCorpus {
    var rng: BenchRNG
    public let streamCount: Int
    /// Next seq per stream (index = stream id - 1).
    var nextSeq: [UInt64]
    var messageID: UInt64 = 1_000_000

    static let english = """
        ok sure thanks see you tomorrow lol what time are we meeting I'll be there in ten minutes did you \
        get my message can you send the photo again the meeting moved to three pm happy birthday running \
        late sorry traffic is terrible call me when you're free sounds good to me let's grab lunch \
        where are you now just landed my phone is almost dead I love it haha that's hilarious \
        don't forget the tickets the kids are asleep finally good night have a great weekend \
        the project deadline is friday please review the document before the call \
        I'm at the station waiting for the train
        """.split(separator: " ").map(String.init)

    static let japanese = [
        "了解です", "ありがとう", "また明日", "今どこ？", "もうすぐ着きます", "お疲れさまでした", "写真送って",
        "会議は三時からです", "遅れてごめん", "おやすみ", "週末どうする？", "いいね！", "駅で待ってる",
        "誕生日おめでとう", "資料を確認してください", "電車が遅れています", "ランチ行こう",
    ]
    static let emoji = ["😂", "👍", "❤️", "🎉", "🙏", "😅", "🔥"]
    static let kinds = ["image", "video", "audio", "file"]

    public init(seed: UInt64, streams: Int) {
        rng = BenchRNG(seed: seed)
        streamCount = max(1, streams)
        nextSeq = [UInt64](repeating: 1, count: streamCount)
    }

    /// A stream id, skewed: a quarter of the streams get about three quarters of the traffic.
    mutating func pickStream() -> Int {
        let u = Double(rng.next() % 1_000_000) / 1_000_000
        return min(streamCount - 1, Int(u * u * Double(streamCount)))
    }

    mutating func sentence() -> String {
        if rng.next() % 4 == 0 {
            var s = Self.japanese[Int(rng.next() % UInt64(Self.japanese.count))]
            if rng.next() % 2 == 0 { s += Self.japanese[Int(rng.next() % UInt64(Self.japanese.count))] }
            return s
        }
        let n = 4 + Int(rng.next() % 14)
        var words = [String]()
        for _ in 0..<n { words.append(Self.english[Int(rng.next() % UInt64(Self.english.count))]) }
        var s = words.joined(separator: " ")
        if rng.next() % 5 == 0 { s += " " + Self.emoji[Int(rng.next() % UInt64(Self.emoji.count))] }
        return s
    }

    /// The next record of the log at `index`.
    public mutating func next(index: LogIndex, term: Term, timestampMicros: Int64) -> Record {
        let s = pickStream()
        let seq = nextSeq[s]
        nextSeq[s] += 1
        messageID += 1 + rng.next() % 7
        let from = 10_000 + rng.next() % 90_000
        let to = 10_000 + rng.next() % 90_000
        var body: String
        if rng.next() % 10 == 0 {
            let kind = Self.kinds[Int(rng.next() % UInt64(Self.kinds.count))]
            let key = String(rng.next(), radix: 36)
            body = #"{"message_id":\#(messageID),"sender_id":\#(from),"receiver_id":\#(to),"message_type":"\#(kind)","media_url":"media/\#(kind)/\#(key)","content":""}"#
        } else {
            body = #"{"message_id":\#(messageID),"sender_id":\#(from),"receiver_id":\#(to),"message_type":"text","content":"\#(sentence())"}"#
        }
        return Record(
            index: index, term: term, stream: StreamID(UInt64(s + 1)), seq: seq, type: .data,
            timestampMicros: timestampMicros, payload: Array(body.utf8))
    }
}

/// SplitMix64, so a benchmark run is reproducible.
struct BenchRNG {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
