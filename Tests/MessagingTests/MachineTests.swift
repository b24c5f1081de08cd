@testable import Messaging
import ShardState
import Testing
import WeftCore

// MARK: Helpers

/// Records as a shard's log holds them: dense indexes from 1, term 1, seqs counted per stream, timestamps
/// rising (1 ms apart unless a test names the time).
struct TestLog {
    private(set) var index: LogIndex = 0
    private(set) var micros: Int64 = 1_700_000_000_000_000
    private var seqs: [StreamID: StreamSeq] = [:]

    mutating func next(stream: StreamID, type: RecordType, payload: [UInt8], at time: Int64? = nil) -> Record {
        index += 1
        micros = time ?? micros + 1_000
        let seq = (seqs[stream] ?? 0) + 1
        seqs[stream] = seq
        return Record(index: index, term: 1, stream: stream, seq: seq, type: type, timestampMicros: micros, payload: payload)
    }

    /// A messaging record of `op`, in the stream it belongs in.
    mutating func next(_ op: MessagingOp, at time: Int64? = nil) -> Record {
        next(stream: op.stream, type: .messaging, payload: op.encode(), at: time)
    }
}

/// A record applied to a machine, and what apply said.
struct Step {
    var record: Record
    var outcome: ApplyOutcome
}

/// One shard: its machine and its log.
struct TestShard {
    var machine = MessagingMachine()
    var log = TestLog()

    @discardableResult
    mutating func apply(_ op: MessagingOp, at time: Int64? = nil) -> Step {
        run(log.next(op, at: time))
    }

    @discardableResult
    mutating func apply(stream: StreamID, type: RecordType, payload: [UInt8]) -> Step {
        run(log.next(stream: stream, type: type, payload: payload))
    }

    private mutating func run(_ r: Record) -> Step {
        let outcomes = machine.apply([r][...])
        return Step(record: r, outcome: outcomes.count == 1 ? outcomes[0] : .rejected(code: "outcome count \(outcomes.count)", message: ""))
    }
}

extension ApplyOutcome {
    /// The code of a rejection; nil when accepted.
    var rejectionCode: String? {
        if case .rejected(let code, _) = self { return code }
        return nil
    }
    var isAccepted: Bool { rejectionCode == nil }
}

/// The user id of a register's outcome: accepted with 8 bytes, little-endian.
func registeredID(_ o: ApplyOutcome) -> UInt64? {
    guard case .accepted(let b) = o, b.count == 8 else { return nil }
    var v: UInt64 = 0
    for (k, byte) in b.enumerated() { v |= UInt64(byte) << (8 * UInt64(k)) }
    return v
}

/// Little-endian bytes, as the machine answers with numbers.
private func le(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

/// Usernames (`user0`, `user1`, ...) whose shard of `shards` is `shard`.
private func usernames(inShard shard: UInt64, of shards: Int, count: Int) -> [String] {
    Array((0..<10_000).lazy.map { "user\($0)" }.filter { Ids.usernameShard($0, shards: shards).rawValue == shard }.prefix(count))
}

private let bcrypt: [UInt8] = Array("$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW".utf8)

func text(_ from: UInt64, _ to: UInt64, _ content: String) -> MessagingOp {
    .message(from: from, to: to, kind: .text, content: content, mediaURL: "", mimeType: "", size: 0)
}

private func register(_ name: String, shards: Int, display: String = "Someone") -> MessagingOp {
    .register(
        username: name, displayName: display, passwordHash: bcrypt, shard: Ids.usernameShard(name, shards: shards).rawValue,
        shards: UInt64(shards))
}

/// Makes `a` and `b` contacts (a asks, b accepts).
func befriend(_ shard: inout TestShard, _ a: UInt64, _ b: UInt64) {
    shard.apply(.contactRequest(from: a, to: b, note: ""))
    shard.apply(.contactAccept(by: b, other: a))
}

/// A shard's worth of mixed records: registrations (one refused), account changes (one refused), two
/// pairs (a refused and two accepted messages, a recall, a block and a refused request), inbox events and
/// a read mark, a raw record, garbage and a misfiled operation (both refused). Six refusals in all.
private func mixedRecords(_ log: inout TestLog) -> [Record] {
    var out: [Record] = []
    func add(_ op: MessagingOp) { out.append(log.next(op)) }
    for name in ["alice", "bob", "carol", "alice"] { add(register(name, shards: 4, display: "User \(name)")) }
    let alice = 4 + Ids.usernameShard("alice", shards: 4).rawValue
    add(.profile(user: alice, displayName: "Alice"))
    add(.revokeTokens(user: alice))
    add(.totp(user: alice, state: 1, sealed: [9, 8, 7]))
    add(.profile(user: 999_999, displayName: "Nobody"))
    let (a, b, c): (UInt64, UInt64, UInt64) = (5, 9, 14)
    add(text(a, b, "too early"))
    add(.contactRequest(from: a, to: b, note: "hey"))
    add(.contactAccept(by: b, other: a))
    add(text(a, b, "hello"))
    let hello = log.index
    add(.message(from: b, to: a, kind: .image, content: "", mediaURL: "https://media.example/1.png", mimeType: "image/png", size: 2048))
    add(.recall(by: a, other: b, seq: 2, messageID: Ids.messageID(shard: ShardID(1), index: hello)))
    add(.block(by: c, other: a, on: true))
    add(.contactRequest(from: c, to: a, note: "let me in"))
    add(.inbox(user: a, .contactRequest(peer: b, fromMe: true, note: "")))
    add(.inbox(user: b, .contactRequest(peer: a, fromMe: false, note: "hey")))
    add(.inbox(user: a, .contactAccepted(peer: b)))
    add(.inbox(user: b, .contactAccepted(peer: a)))
    add(.inbox(user: a, .message(peer: b, seq: 2, fromMe: true, messageID: 77)))
    add(.inbox(user: b, .message(peer: a, seq: 2, fromMe: false, messageID: 77)))
    add(.inbox(user: b, .message(peer: a, seq: 3, fromMe: true, messageID: 78)))
    add(.inbox(user: a, .message(peer: b, seq: 3, fromMe: false, messageID: 78)))
    add(.inbox(user: a, .message(peer: b, seq: 4, fromMe: false, messageID: 79)))
    add(.inbox(user: a, .recall(peer: b, seq: 2, fromMe: true, messageID: 77)))
    add(.inbox(user: c, .blocked(peer: a, on: true)))
    add(.readMark(user: a, peer: b, seq: 3))
    out.append(log.next(stream: StreamID(1), type: .data, payload: [1, 2, 3]))
    out.append(log.next(stream: StreamID(2), type: .messaging, payload: [0xEE]))
    out.append(log.next(stream: Ids.inbox(a), type: .messaging, payload: text(a, b, "misfiled").encode()))
    return out
}

// MARK: Records

@Suite struct MessagingOpTests {
    static let allOps: [MessagingOp] = baseOps + messageOps + GroupTests.ops

    static let baseOps: [MessagingOp] = [
        .register(username: "alice", displayName: "Alice A.", passwordHash: bcrypt, shard: 3, shards: 4),
        .register(username: "", displayName: "", passwordHash: [], shard: 0, shards: 0),
        .profile(user: 7, displayName: "Seven ✓"),
        .revokeTokens(user: 7),
        .totp(user: 7, state: 0, sealed: []),
        .totp(user: 7, state: 1, sealed: [1, 2, 3]),
        .totp(user: 7, state: 2, sealed: Array(repeating: 0xAB, count: 40)),
        .contactRequest(from: 7, to: 9, note: "hi, it's me"),
        .contactRequest(from: 9, to: 7, note: ""),
        .contactAccept(by: 9, other: 7),
        .contactRemove(by: 7, other: 9),
        .block(by: 7, other: 9, on: true),
        .block(by: 9, other: 7, on: false),
        .recall(by: 7, other: 9, seq: 42, messageID: Ids.messageID(shard: ShardID(3), index: 1234)),
        .inbox(user: 7, .message(peer: 9, seq: 5, fromMe: true, messageID: 77)),
        .inbox(user: 9, .message(peer: 7, seq: 5, fromMe: false, messageID: UInt64.max)),
        .inbox(user: 9, .recall(peer: 7, seq: 5, fromMe: false, messageID: 77)),
        .inbox(user: 7, .recall(peer: 9, seq: 5, fromMe: true, messageID: 77)),
        .inbox(user: 9, .contactRequest(peer: 7, fromMe: false, note: "note ✉︎")),
        .inbox(user: 7, .contactRequest(peer: 9, fromMe: true, note: "")),
        .inbox(user: 9, .contactAccepted(peer: 7)),
        .inbox(user: 9, .contactRemoved(peer: 7, byMe: true)),
        .inbox(user: 7, .contactRemoved(peer: 9, byMe: false)),
        .inbox(user: 9, .blocked(peer: 7, on: true)),
        .inbox(user: 9, .blocked(peer: 7, on: false)),
        .inbox(user: 9, .read(peer: 7, seq: 99)),
        .readMark(user: 9, peer: 7, seq: 3),
        .pushPreview(user: 9, on: true),
        .pushPreview(user: 9, on: false),
        .delivered(user: 9, seq: 12),
        .notified(user: 9, seq: UInt64.max),
    ]

    static let messageOps: [MessagingOp] = MessageKind.allCases.map { (k: MessageKind) -> MessagingOp in
        let media = k != .text
        return MessagingOp.message(
            from: 7, to: 9, kind: k, content: media ? "" : "héllo 👋", mediaURL: media ? "https://m.example/x" : "",
            mimeType: media ? "application/octet-stream" : "", size: UInt64(k.rawValue) << 40)
    }

    @Test func everyOperationAndInboxEventIsCovered() {
        #expect(Set(Self.allOps.map(\.code)) == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 30])
        // The inbox event's kind byte follows `u8 op | u64 user`.
        let eventKinds = Set(Self.allOps.filter { $0.code == 20 }.map { $0.encode()[9] })
        #expect(eventKinds == Set<UInt8>(1...10))
    }

    @Test func everyOperationRoundTrips() {
        for op in Self.allOps {
            let bytes = op.encode()
            #expect(bytes.first == op.code, "\(op)")
            #expect(MessagingOp.decode(bytes) == op, "\(op)")
        }
    }

    @Test func truncatedPayloadsAndTrailingBytesDecodeToNil() {
        for op in Self.allOps {
            let bytes = op.encode()
            let decodedCuts = (0..<bytes.count).filter { MessagingOp.decode(Array(bytes.prefix($0))) != nil }
            #expect(decodedCuts.isEmpty, "prefixes of \(op) decoded: \(decodedCuts)")
            #expect(MessagingOp.decode(bytes + [0]) == nil, "\(op) with a trailing byte")
            #expect(MessagingOp.decode(bytes + bytes) == nil, "\(op) twice")
        }
    }

    @Test func outOfRangeFieldsDecodeToNil() {
        #expect(MessagingOp.decode([]) == nil)
        for unknown: UInt8 in [0, 6, 16, 24, 255] { #expect(MessagingOp.decode([unknown] + Array(repeating: 0, count: 16)) == nil) }

        var block = MessagingOp.block(by: 7, other: 9, on: true).encode()
        block[block.count - 1] = 2
        #expect(MessagingOp.decode(block) == nil)

        var totp = MessagingOp.totp(user: 7, state: 1, sealed: []).encode()
        totp[9] = 3  // u8 op | u64 user | u8 state
        #expect(MessagingOp.decode(totp) == nil)

        var message = text(7, 9, "x").encode()
        for kind: UInt8 in [0, 6] {
            message[17] = kind  // u8 op | u64 from | u64 to | u8 kind
            #expect(MessagingOp.decode(message) == nil)
        }

        var event = MessagingOp.inbox(user: 7, .contactAccepted(peer: 9)).encode()
        for kind: UInt8 in [0, 11] {
            event[9] = kind
            #expect(MessagingOp.decode(event) == nil)
        }
        var fromMe = MessagingOp.inbox(user: 7, .message(peer: 9, seq: 1, fromMe: true, messageID: 1)).encode()
        fromMe[26] = 2  // u8 op | u64 user | u8 kind | u64 peer | u64 seq | u8 fromMe
        #expect(MessagingOp.decode(fromMe) == nil)

        // Text that is not UTF-8, and a length past the end.
        var profile = MessagingOp.profile(user: 7, displayName: "abc").encode()
        profile[13] = 0xFF  // u8 op | u64 user | u32 length | bytes
        #expect(MessagingOp.decode(profile) == nil)
        var long = MessagingOp.profile(user: 7, displayName: "abc").encode()
        long[9] = 4
        #expect(MessagingOp.decode(long) == nil)
        long[12] = 0xFF
        #expect(MessagingOp.decode(long) == nil)
    }

    @Test func eachOperationNamesItsStream() {
        #expect(MessagingOp.register(username: "alice", displayName: "A", passwordHash: [1], shard: 0, shards: 1).stream == Ids.registry)
        #expect(MessagingOp.profile(user: 7, displayName: "x").stream == Ids.account(7))
        #expect(MessagingOp.revokeTokens(user: 7).stream == Ids.account(7))
        #expect(MessagingOp.totp(user: 7, state: 0, sealed: []).stream == Ids.account(7))
        #expect(MessagingOp.contactRequest(from: 9, to: 7, note: "").stream == Ids.pair(7, 9))
        #expect(MessagingOp.contactAccept(by: 7, other: 9).stream == Ids.pair(7, 9))
        #expect(MessagingOp.contactRemove(by: 9, other: 7).stream == Ids.pair(7, 9))
        #expect(MessagingOp.block(by: 9, other: 7, on: true).stream == Ids.pair(7, 9))
        #expect(MessagingOp.recall(by: 9, other: 7, seq: 1, messageID: 1).stream == Ids.pair(7, 9))
        #expect(text(9, 7, "x").stream == Ids.dm(7, 9))
        #expect(MessagingOp.inbox(user: 9, .read(peer: 7, seq: 1)).stream == Ids.inbox(9))
        #expect(MessagingOp.readMark(user: 9, peer: 7, seq: 1).stream == Ids.inbox(9))
    }
}

// MARK: Ids

@Suite struct IdsTests {
    @Test func dmAndPairStreamsAreSymmetricAndNameTheirUsers() {
        let pairs: [(UInt64, UInt64)] = [(3, 17), (1, 2), (1, Ids.userIDMax), (Ids.userIDMax - 1, Ids.userIDMax)]
        for (a, b) in pairs {
            #expect(Ids.dm(a, b) == Ids.dm(b, a))
            #expect(Ids.pair(a, b) == Ids.pair(b, a))
            #expect(Ids.dm(a, b) != Ids.pair(a, b))
            #expect(Ids.pairKey(a, b) == Ids.pairKey(b, a))
            // Apply voids refused records of dm streams by their kind bits.
            #expect(Ids.dm(a, b).rawValue >> 62 == 2)
            #expect(Ids.pair(a, b).rawValue >> 62 == 3)
            for stream in [Ids.dm(b, a), Ids.pair(b, a)] {
                let users = Ids.users(of: stream)
                #expect(users?.lo == a && users?.hi == b, "\(a), \(b)")
            }
            #expect(Ids.conversationID(b, a) == "d\(a)-\(b)")
            let parsed = Ids.parseConversationID(Ids.conversationID(b, a))
            #expect(parsed?.lo == a && parsed?.hi == b)
        }
        #expect(Ids.dm(3, 17) != Ids.dm(3, 18))
        #expect(Ids.dm(3, 17) != Ids.dm(17, 4))
        #expect(Ids.pair(1, 2) != Ids.pair(2, 3))
        for stream in [Ids.inbox(3), Ids.account(3), Ids.registry, StreamID(5), StreamID.none] {
            #expect(Ids.users(of: stream) == nil, "\(stream)")
        }
        #expect(Ids.inbox(3) != Ids.account(3))
        #expect(Ids.inbox(Ids.userIDMax) != Ids.registry)
    }

    @Test func messageIDsRoundTripAndRefuseAShardOutOfRangeOrIndexZero() throws {
        for shards in [1, 4, Ids.shardsMax] {
            for shard in Set([0, shards / 2, shards - 1]) {
                for index: LogIndex in [1, 2, 123_456, Ids.messageIndexMax] {
                    let id = Ids.messageID(shard: ShardID(UInt64(shard)), index: index)
                    #expect(id < 1 << 53, "a JSON number")
                    let back = try #require(Ids.parseMessageID(id, shards: shards))
                    #expect(back.shard == ShardID(UInt64(shard)))
                    #expect(back.index == index)
                }
            }
        }
        #expect(Ids.parseMessageID(Ids.messageID(shard: ShardID(4), index: 5), shards: 4) == nil)
        #expect(Ids.parseMessageID(Ids.messageID(shard: ShardID(9), index: 5), shards: 4) == nil)
        #expect(Ids.parseMessageID(Ids.messageID(shard: ShardID(1), index: 0), shards: 4) == nil)
        #expect(Ids.parseMessageID(0, shards: 4) == nil)
        #expect(Ids.parseMessageID(Ids.messageID(shard: ShardID(3), index: 5), shards: 4)?.index == 5)
    }

    @Test func conversationIDsParseOnlyInTheirCanonicalForm() {
        let ok = Ids.parseConversationID("d3-17")
        #expect(ok?.lo == 3 && ok?.hi == 17)
        let top = Ids.parseConversationID("d1-2147483647")
        #expect(top?.lo == 1 && top?.hi == Ids.userIDMax)
        for bad in [
            "d17-3", "d3-3", "d03-17", "d3-017", "x3-17", "D3-17", "d3-", "d-3", "d-", "d", "", "3-17", "d3-17-1", "d3_17", "d 3-17", "d3-17 ",
            "d+3-17", "d-3-17", "d0-3", "d3-2147483648", "d3-99999999999", "d٣-17", "d3-1٧",
        ] {
            #expect(Ids.parseConversationID(bad) == nil, "\(bad)")
        }
    }

    @Test func usernamesAreNormalisedOrRefused() {
        #expect(Ids.normalisedUsername("alice") == "alice")
        #expect(Ids.normalisedUsername("Alice") == "alice")
        #expect(Ids.normalisedUsername("ALICE_99.x") == "alice_99.x")
        #expect(Ids.normalisedUsername("abc") == "abc")
        #expect(Ids.normalisedUsername("a.b") == "a.b")
        let longest = "a" + String(repeating: "b", count: 31)
        #expect(Ids.normalisedUsername(longest) == longest)
        for bad in [
            "", "a", "ab", longest + "c", "1abc", "_abc", ".abc", "ab-c", "ab c", "abc!", "abç", "émile", "ab\u{0}c", "日本語です", "abc\n",
        ] {
            #expect(Ids.normalisedUsername(bad) == nil, "\(bad)")
        }
    }

    @Test func theHomeShardIsTheUserModuloTheShards() {
        for shards in [1, 2, 3, 4, 7, Ids.shardsMax] {
            for u: UInt64 in [1, 2, 3, 4, 5, 1023, 1024, 1025, 1_000_003, Ids.userIDMax] {
                #expect(Ids.homeShard(u, shards: shards).rawValue == u % UInt64(shards), "\(u) of \(shards)")
            }
        }
        let pairs: [(UInt64, UInt64)] = [(3, 17), (5, 9), (1, Ids.userIDMax)]
        for (a, b) in pairs {
            #expect(Ids.pairShard(a, b, shards: 4) == Ids.pairShard(b, a, shards: 4))
            #expect(Ids.pairShard(a, b, shards: 4).rawValue < 4)
        }
        #expect(Ids.usernameShard("alice", shards: 1).rawValue == 0)
    }
}

// MARK: Registration and accounts

@Suite struct RegistrationTests {
    @Test func registerAllocatesAnIDOfTheUsernamesShard() throws {
        let shards = 4
        for s in 0..<UInt64(shards) {
            let names = usernames(inShard: s, of: shards, count: 2)
            try #require(names.count == 2)
            var shard = TestShard()

            let first = shard.apply(register(names[0], shards: shards, display: "First"))
            let id = try #require(registeredID(first.outcome))
            #expect(id % UInt64(shards) == s)
            #expect(id == 1 * UInt64(shards) + s)
            #expect(Ids.homeShard(id, shards: shards).rawValue == s)
            #expect(shard.machine.userID(username: names[0]) == id)
            let account = try #require(shard.machine.account(id))
            #expect(account.id == id)
            #expect(account.username == names[0])
            #expect(account.displayName == "First")
            #expect(account.passwordHash == bcrypt)
            #expect(account.tokenVersion == 1)
            #expect(account.totpState == 0)
            #expect(account.createdMicros == first.record.timestampMicros)

            let again = shard.apply(register(names[0], shards: shards, display: "Second"))
            #expect(again.outcome.rejectionCode == "username_taken")
            #expect(shard.machine.account(id)?.displayName == "First")

            let wrongShard = (s + 1) % UInt64(shards)
            let wrong = shard.apply(
                .register(username: names[1], displayName: "X", passwordHash: bcrypt, shard: wrongShard, shards: UInt64(shards)))
            #expect(wrong.outcome.rejectionCode == "malformed")
            #expect(shard.machine.userID(username: names[1]) == nil)

            // Refusals took no id: the next one is the second.
            let second = shard.apply(register(names[1], shards: shards))
            let id2 = try #require(registeredID(second.outcome))
            #expect(id2 == 2 * UInt64(shards) + s)
            #expect(shard.machine.accounts.count == 2)
            #expect(shard.machine.usernames.count == 2)
            #expect(shard.machine.rejectedIndexes == [again.record.index, wrong.record.index])
            // Registry records are not dm records: nothing is voided.
            #expect(shard.machine.pairs.count == 0)
        }
    }

    @Test func registerRefusesWhatCheckRefuses() {
        let name = "alice"
        let s = Ids.usernameShard(name, shards: 4).rawValue
        let bad: [MessagingOp] = [
            .register(username: "Alice", displayName: "A", passwordHash: bcrypt, shard: Ids.usernameShard("Alice", shards: 4).rawValue, shards: 4),
            .register(username: "al", displayName: "A", passwordHash: bcrypt, shard: Ids.usernameShard("al", shards: 4).rawValue, shards: 4),
            .register(username: name, displayName: "A", passwordHash: bcrypt, shard: s, shards: 0),
            .register(username: name, displayName: "A", passwordHash: bcrypt, shard: 0, shards: UInt64(Ids.shardsMax) + 1),
            .register(username: name, displayName: "A", passwordHash: bcrypt, shard: s + 4, shards: 4),
            .register(username: name, displayName: "", passwordHash: bcrypt, shard: s, shards: 4),
            .register(username: name, displayName: String(repeating: "d", count: 65), passwordHash: bcrypt, shard: s, shards: 4),
            .register(username: name, displayName: "A", passwordHash: [], shard: s, shards: 4),
            .register(username: name, displayName: "A", passwordHash: Array(repeating: 1, count: 129), shard: s, shards: 4),
        ]
        var shard = TestShard()
        for op in bad {
            #expect(shard.apply(op).outcome.rejectionCode == "malformed", "\(op)")
        }
        #expect(shard.machine.accounts.count == 0)
        #expect(shard.machine.nextLocal == 1)
        #expect(shard.machine.rejectedIndexes.count == bad.count)
        // The limits themselves are allowed.
        let edge = MessagingOp.register(
            username: name, displayName: String(repeating: "d", count: 64), passwordHash: Array(repeating: 1, count: 128), shard: s, shards: 4)
        #expect(registeredID(shard.apply(edge).outcome) == 4 + s)
    }

    @Test func theLastUserIDIsAllocatedAndThenNoMore() throws {
        let names = usernames(inShard: 1, of: 4, count: 2)
        try #require(names.count == 2)
        var shard = TestShard()
        let last = (Ids.userIDMax - 1) / 4
        shard.machine.nextLocal = last
        let id = try #require(registeredID(shard.apply(register(names[0], shards: 4)).outcome))
        #expect(id == last * 4 + 1)
        #expect(Ids.isUserID(id))
        #expect(shard.apply(register(names[1], shards: 4)).outcome.rejectionCode == "ids_exhausted")
        #expect(shard.machine.userID(username: names[1]) == nil)
        #expect(shard.machine.nextLocal == last + 1)
    }

    @Test func accountOperationsChangeTheAccountOrAreRefused() throws {
        var shard = TestShard()
        let id = try #require(registeredID(shard.apply(register("alice", shards: 1)).outcome))
        #expect(id == 1)
        #expect(shard.apply(.profile(user: id, displayName: "Alice Liddell")).outcome.isAccepted)
        #expect(shard.machine.account(id)?.displayName == "Alice Liddell")
        #expect(shard.apply(.revokeTokens(user: id)).outcome.isAccepted)
        #expect(shard.machine.account(id)?.tokenVersion == 2)
        // Enrolling keeps sessions; turning TOTP on or off revokes them.
        #expect(shard.apply(.totp(user: id, state: 1, sealed: [1, 2, 3])).outcome.isAccepted)
        var account = try #require(shard.machine.account(id))
        #expect(account.totpState == 1 && account.totpSealed == [1, 2, 3] && account.tokenVersion == 2)
        #expect(shard.apply(.totp(user: id, state: 2, sealed: [1, 2, 3])).outcome.isAccepted)
        #expect(shard.machine.account(id)?.tokenVersion == 3)
        #expect(shard.apply(.totp(user: id, state: 0, sealed: [])).outcome.isAccepted)
        account = try #require(shard.machine.account(id))
        #expect(account.totpState == 0 && account.totpSealed.isEmpty && account.tokenVersion == 4)

        #expect(shard.apply(.profile(user: id + 1, displayName: "Nobody")).outcome.rejectionCode == "unknown_user")
        #expect(shard.apply(.revokeTokens(user: id + 1)).outcome.rejectionCode == "unknown_user")
        #expect(shard.apply(.totp(user: id + 1, state: 2, sealed: [])).outcome.rejectionCode == "unknown_user")
        #expect(shard.apply(.profile(user: id, displayName: "")).outcome.rejectionCode == "malformed")
        #expect(shard.apply(.totp(user: id, state: 1, sealed: Array(repeating: 0, count: 257))).outcome.rejectionCode == "malformed")
        #expect(shard.apply(.revokeTokens(user: 0)).outcome.rejectionCode == "malformed")
        #expect(shard.machine.account(id)?.displayName == "Alice Liddell")
        #expect(shard.machine.account(id)?.tokenVersion == 4)
    }
}

// MARK: Pairs: contacts, messages, recalls

@Suite struct PairTests {
    @Test func messagesNeedAnAcceptedContactAndNoBlock() throws {
        var shard = TestShard()
        let alice: UInt64 = 12
        let bob: UInt64 = 5  // the pair's lo
        var rejected: [LogIndex] = []

        let early = shard.apply(text(alice, bob, "hi?"))
        #expect(early.outcome.rejectionCode == "not_allowed")
        #expect(early.record.stream == Ids.dm(bob, alice) && early.record.seq == 1)
        rejected.append(early.record.index)
        var pair = try #require(shard.machine.pair(alice, bob))
        #expect(pair.void == [1])
        #expect(pair.isVoid(1))
        #expect(pair.lastSeq == 1)
        #expect(pair.relation == Pair.Relation.none)
        #expect(pair.recent.isEmpty)
        #expect(shard.machine.rejectedIndexes == rejected)
        #expect(shard.machine.relayRejected == rejected)

        // The answer says whether the request made them contacts (0: no).
        #expect(shard.apply(.contactRequest(from: alice, to: bob, note: "it's alice")).outcome == .accepted([0]))
        pair = try #require(shard.machine.pair(bob, alice))
        #expect(pair.relation == .requestedByHi)
        #expect(pair.note == "it's alice")

        let pending = shard.apply(text(alice, bob, "well?"))
        #expect(pending.outcome.rejectionCode == "not_allowed")
        rejected.append(pending.record.index)
        let selfAccept = shard.apply(.contactAccept(by: alice, other: bob))
        #expect(selfAccept.outcome.rejectionCode == "no_request")
        rejected.append(selfAccept.record.index)

        #expect(shard.apply(.contactAccept(by: bob, other: alice)).outcome.isAccepted)
        pair = try #require(shard.machine.pair(alice, bob))
        #expect(pair.relation == .contacts)
        #expect(pair.note == "")

        let hello = shard.apply(text(alice, bob, "hello"))
        // The answer is the message's time.
        #expect(hello.outcome == .accepted(le(UInt64(bitPattern: hello.record.timestampMicros))))
        #expect(hello.record.seq == 3)
        pair = try #require(shard.machine.pair(alice, bob))
        #expect(pair.lastSeq == 3)
        #expect(pair.recent == [Pair.RecentMessage(seq: 3, sender: alice, micros: hello.record.timestampMicros)])
        #expect(pair.void == [1, 2])
        #expect(!pair.isVoid(3))
        #expect(shard.apply(text(bob, alice, "hi alice")).outcome.isAccepted)

        // Blocked by bob (lo): neither may write.
        #expect(shard.apply(.block(by: bob, other: alice, on: true)).outcome.isAccepted)
        pair = try #require(shard.machine.pair(alice, bob))
        #expect(pair.blockedByLo && !pair.blockedByHi && pair.isBlocked())
        #expect(pair.relation == .contacts)
        let blockedA = shard.apply(text(alice, bob, "hello?"))
        let blockedB = shard.apply(text(bob, alice, "go away"))
        #expect(blockedA.outcome.rejectionCode == "not_allowed")
        #expect(blockedB.outcome.rejectionCode == "not_allowed")
        rejected += [blockedA.record.index, blockedB.record.index]

        #expect(shard.apply(.block(by: bob, other: alice, on: false)).outcome.isAccepted)
        let again = shard.apply(text(alice, bob, "friends again"))
        #expect(again.outcome.isAccepted)

        // Blocked by alice (hi).
        #expect(shard.apply(.block(by: alice, other: bob, on: true)).outcome.isAccepted)
        pair = try #require(shard.machine.pair(alice, bob))
        #expect(!pair.blockedByLo && pair.blockedByHi)
        let blockedC = shard.apply(text(bob, alice, "?"))
        #expect(blockedC.outcome.rejectionCode == "not_allowed")
        rejected.append(blockedC.record.index)

        pair = try #require(shard.machine.pair(alice, bob))
        #expect(pair.void == [1, 2, blockedA.record.seq, blockedB.record.seq, blockedC.record.seq])
        #expect(!pair.isVoid(again.record.seq))
        #expect(pair.lastSeq == blockedC.record.seq)
        #expect(shard.machine.rejectedIndexes == rejected)
        #expect(shard.machine.relayRejected == rejected)
        #expect(shard.machine.pairs.count == 1)
    }

    @Test func contactRequestsAcceptsRemovalsAndBlocks() throws {
        var shard = TestShard()
        let (a, b, c): (UInt64, UInt64, UInt64) = (3, 8, 20)
        #expect(shard.apply(.contactRequest(from: a, to: a, note: "")).outcome.rejectionCode == "invalid")
        #expect(shard.apply(.contactRemove(by: a, other: b)).outcome.rejectionCode == "not_contacts")
        #expect(shard.apply(.contactRequest(from: a, to: b, note: String(repeating: "n", count: 257))).outcome.rejectionCode == "malformed")
        #expect(shard.apply(.contactRequest(from: a, to: 0, note: "")).outcome.rejectionCode == "malformed")

        // Both ask: contacts.
        #expect(shard.apply(.contactRequest(from: a, to: b, note: "one")).outcome == .accepted([0]))
        #expect(shard.machine.pair(a, b)?.relation == .requestedByLo)
        #expect(shard.machine.pair(a, b)?.note == "one")
        #expect(shard.apply(.contactRequest(from: b, to: a, note: "two")).outcome == .accepted([1]))
        #expect(shard.machine.pair(a, b)?.relation == .contacts)
        #expect(shard.machine.pair(a, b)?.note == "")
        #expect(shard.apply(.contactRequest(from: a, to: b, note: "")).outcome.rejectionCode == "already_contacts")
        #expect(shard.apply(.contactAccept(by: a, other: b)).outcome.rejectionCode == "no_request")
        #expect(shard.apply(.contactRemove(by: b, other: a)).outcome.isAccepted)
        #expect(shard.machine.pair(a, b)?.relation == Pair.Relation.none)
        #expect(shard.apply(text(a, b, "still there?")).outcome.rejectionCode == "not_allowed")

        // A pending request cannot be accepted once either side blocks; a blocked pair takes no requests.
        #expect(shard.apply(.contactRequest(from: c, to: a, note: "x")).outcome.isAccepted)
        #expect(shard.machine.pair(a, c)?.relation == .requestedByHi)
        #expect(shard.apply(.block(by: a, other: c, on: true)).outcome.isAccepted)
        #expect(shard.apply(.contactAccept(by: a, other: c)).outcome.rejectionCode == "no_request")
        #expect(shard.apply(.contactRequest(from: a, to: c, note: "")).outcome.rejectionCode == "not_allowed")
        #expect(shard.apply(.contactRequest(from: c, to: a, note: "")).outcome.rejectionCode == "not_allowed")
        // Withdrawing the pending request is still allowed.
        #expect(shard.apply(.contactRemove(by: c, other: a)).outcome.isAccepted)
        let pair = try #require(shard.machine.pair(a, c))
        #expect(pair.relation == Pair.Relation.none && pair.blockedByLo && !pair.blockedByHi)
        // Blocking a stranger makes a pair.
        #expect(shard.apply(.block(by: 40, other: 30, on: true)).outcome.isAccepted)
        #expect(shard.machine.pair(30, 40)?.blockedByHi == true)
        #expect(shard.machine.pair(30, 40)?.relation == Pair.Relation.none)
    }

    @Test func onlyTheSenderRecallsAndOnlyWithinTwoMinutes() throws {
        var shard = TestShard()
        let alice: UInt64 = 12
        let bob: UInt64 = 5
        befriend(&shard, alice, bob)
        let m1 = shard.apply(text(alice, bob, "oops"))
        let m2 = shard.apply(text(alice, bob, "oops again"))
        #expect(m1.outcome.isAccepted && m2.outcome.isAccepted)
        func recall(_ by: UInt64, _ other: UInt64, _ m: Step) -> MessagingOp {
            .recall(by: by, other: other, seq: m.record.seq, messageID: Ids.messageID(shard: ShardID(0), index: m.record.index))
        }

        #expect(shard.apply(recall(bob, alice, m1)).outcome.rejectionCode == "not_recallable")
        #expect(shard.machine.pair(alice, bob)?.isRecalled(m1.record.seq) == false)
        #expect(shard.apply(recall(alice, bob, m2)).outcome.isAccepted)
        // Exactly two minutes after it was sent is still within the window.
        let atEdge = shard.apply(recall(alice, bob, m1), at: m1.record.timestampMicros + MessagingLimits.recallWindowMicros)
        #expect(atEdge.outcome.isAccepted)
        var pair = try #require(shard.machine.pair(alice, bob))
        #expect(pair.isRecalled(m1.record.seq) && pair.isRecalled(m2.record.seq))
        #expect(pair.recalled == [m1.record.seq, m2.record.seq])
        #expect(shard.apply(recall(alice, bob, m1)).outcome.rejectionCode == "not_recallable")
        #expect(
            shard.apply(.recall(by: alice, other: bob, seq: 99, messageID: Ids.messageID(shard: ShardID(0), index: 99))).outcome.rejectionCode
                == "not_recallable")

        // 121 s later is too late.
        let m3 = shard.apply(text(alice, bob, "slow"))
        #expect(m3.outcome.isAccepted)
        let late = shard.apply(recall(alice, bob, m3), at: m3.record.timestampMicros + 121_000_000)
        #expect(late.outcome.rejectionCode == "not_recallable")
        pair = try #require(shard.machine.pair(alice, bob))
        #expect(!pair.isRecalled(m3.record.seq))
        #expect(pair.recalled == [m1.record.seq, m2.record.seq])
        // Messages older than the window leave `recent` when the next message is applied.
        #expect(!pair.recent.contains { $0.seq == m1.record.seq })
        #expect(pair.recent.last?.seq == m3.record.seq)

        // A refused message is not recallable.
        #expect(shard.apply(.block(by: bob, other: alice, on: true)).outcome.isAccepted)
        let refused = shard.apply(text(alice, bob, "blocked"))
        #expect(refused.outcome.rejectionCode == "not_allowed")
        #expect(shard.apply(recall(alice, bob, refused)).outcome.rejectionCode == "not_recallable")
    }
}

// MARK: Admission

@Suite struct AdmitTests {
    @Test func admitRefusesWhatApplyRefusesAndChangesNothing() throws {
        let shards = 4
        let names = usernames(inShard: 2, of: shards, count: 2)
        try #require(names.count == 2)
        var shard = TestShard()
        #expect(registeredID(shard.apply(register(names[0], shards: shards)).outcome) == 6)
        let (a, b, c): (UInt64, UInt64, UInt64) = (5, 9, 14)
        befriend(&shard, a, b)
        shard.apply(.contactRequest(from: c, to: b, note: ""))
        let sent = shard.apply(text(a, b, "x"))
        #expect(sent.outcome.isAccepted)
        let before = shard.machine.snapshot()
        let hashBefore = shard.machine.stateHash

        let cases: [(MessagingOp, String?)] = [
            (register(names[0], shards: shards), "username_taken"),
            (.register(username: names[1], displayName: "X", passwordHash: bcrypt, shard: 3, shards: 4), "malformed"),
            (.register(username: "User0", displayName: "X", passwordHash: bcrypt, shard: 0, shards: 1), "malformed"),
            (text(a, c, "not a contact"), "not_allowed"),
            (text(a, a, "me"), "invalid"),
            (.message(from: a, to: b, kind: .text, content: "", mediaURL: "", mimeType: "", size: 0), "malformed"),
            (.message(from: a, to: b, kind: .image, content: "", mediaURL: "", mimeType: "image/png", size: 1), "malformed"),
            (.contactAccept(by: a, other: c), "no_request"),
            (.contactAccept(by: c, other: b), "no_request"),
            (.contactRemove(by: a, other: c), "not_contacts"),
            (.contactRequest(from: b, to: a, note: ""), "already_contacts"),
            (.recall(by: b, other: a, seq: sent.record.seq, messageID: 0), "not_recallable"),
            (.profile(user: 0, displayName: "x"), "malformed"),
            (.inbox(user: 0, .read(peer: a, seq: 1)), "malformed"),
            (register(names[1], shards: shards), nil),
            (text(b, a, "y"), nil),
            (.recall(by: a, other: b, seq: sent.record.seq, messageID: 0), nil),
            (.contactAccept(by: b, other: c), nil),
            (.contactRequest(from: a, to: c, note: "n"), nil),
            (.block(by: c, other: a, on: true), nil),
            (.inbox(user: a, .read(peer: b, seq: 1)), nil),
        ]
        for (op, expected) in cases {
            let admitted = shard.machine.admit(type: .messaging, stream: op.stream, payload: op.encode())
            #expect(admitted?.rejectionCode == expected, "admit \(op)")
            if let admitted { #expect(admitted.rejectionCode != nil, "admit answers only with refusals: \(op)") }
            var copy = shard
            #expect(copy.apply(op).outcome.rejectionCode == expected, "apply \(op)")
        }
        #expect(shard.machine.snapshot() == before)
        #expect(shard.machine.stateHash == hashBefore)

        // Not messaging: nothing to say.
        #expect(shard.machine.admit(type: .data, stream: StreamID(1), payload: [0xFF]) == nil)
        #expect(shard.machine.admit(type: .data, stream: Ids.dm(a, c), payload: text(a, c, "raw").encode()) == nil)
        #expect(shard.machine.admit(type: .noop, stream: StreamID.none, payload: []) == nil)
        // Messaging, but not an operation, or in another stream.
        #expect(shard.machine.admit(type: .messaging, stream: StreamID(1), payload: [0xEE])?.rejectionCode == "malformed")
        #expect(shard.machine.admit(type: .messaging, stream: Ids.inbox(a), payload: text(a, b, "misfiled").encode())?.rejectionCode == "malformed")
        #expect(shard.machine.snapshot() == before)
    }
}

// MARK: Inboxes

@Suite struct InboxTests {
    @Test func relationEventsShowInThePeerList() throws {
        var home = TestShard()
        let me: UInt64 = 9
        let (ann, ben, cat): (UInt64, UInt64, UInt64) = (4, 6, 11)

        home.apply(.inbox(user: me, .contactRequest(peer: ann, fromMe: false, note: "hello")))
        var view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.relation == .incoming)
        #expect(view.note == "hello")

        let outgoing = home.apply(.inbox(user: me, .contactRequest(peer: ben, fromMe: true, note: "")))
        view = try #require(home.machine.peers(of: me)[ben])
        #expect(view.relation == .outgoing)
        #expect(view.sinceMicros == outgoing.record.timestampMicros)

        let accepted = home.apply(.inbox(user: me, .contactAccepted(peer: ann)))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.relation == .contact)
        #expect(view.note == "")
        #expect(view.sinceMicros == accepted.record.timestampMicros)

        home.apply(.inbox(user: me, .contactRemoved(peer: ben, byMe: true)))
        #expect(home.machine.peers(of: me)[ben]?.relation == PeerView.Relation.none)
        home.apply(.inbox(user: me, .contactRemoved(peer: ann, byMe: false)))
        #expect(home.machine.peers(of: me)[ann]?.relation == PeerView.Relation.none)

        // Both asked: contacts.
        home.apply(.inbox(user: me, .contactRequest(peer: cat, fromMe: false, note: "n")))
        home.apply(.inbox(user: me, .contactRequest(peer: cat, fromMe: true, note: "")))
        #expect(home.machine.peers(of: me)[cat]?.relation == .contact)
        #expect(home.machine.peers(of: me)[cat]?.note == "")

        // A removal by a peer never seen adds nothing; a block marks the peer.
        home.apply(.inbox(user: me, .contactRemoved(peer: 77, byMe: false)))
        #expect(home.machine.peers(of: me)[77] == nil)
        home.apply(.inbox(user: me, .blocked(peer: ben, on: true)))
        #expect(home.machine.peers(of: me)[ben]?.blocked == true)
        home.apply(.inbox(user: me, .blocked(peer: ben, on: false)))
        #expect(home.machine.peers(of: me)[ben]?.blocked == false)

        #expect(home.machine.peers(of: me).count == 3)
        #expect(home.machine.peers(of: ann).isEmpty)
        #expect(home.machine.rejectedIndexes.isEmpty)
    }

    @Test func messageEventsKeepTheLastMessageAndUnreadCount() throws {
        var home = TestShard()
        let me: UInt64 = 9
        let ann: UInt64 = 4
        func message(_ seq: StreamSeq, fromMe: Bool) -> MessagingOp {
            .inbox(user: me, .message(peer: ann, seq: seq, fromMe: fromMe, messageID: 100 + seq))
        }

        let m1 = home.apply(message(1, fromMe: false))
        var view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.lastSeq == 1 && view.lastMessageID == 101 && !view.lastFromMe)
        #expect(view.lastMicros == m1.record.timestampMicros)
        #expect(view.unread == [1] && view.unreadCount == 1)

        home.apply(message(2, fromMe: false))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unread == [1, 2] && view.unreadCount == 2 && view.lastMessageID == 102)

        // Sending is reading.
        home.apply(message(3, fromMe: true))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unread.isEmpty && view.unreadCount == 0)
        #expect(view.readSeq == 3 && view.lastSeq == 3 && view.lastMessageID == 103 && view.lastFromMe)

        home.apply(message(4, fromMe: false))
        home.apply(message(5, fromMe: false))
        #expect(home.machine.peers(of: me)[ann]?.unread == [4, 5])
        home.apply(.readMark(user: me, peer: ann, seq: 4))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unread == [5] && view.unreadCount == 1 && view.readSeq == 4)
        // A read mark never goes back.
        home.apply(.readMark(user: me, peer: ann, seq: 2))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unread == [5] && view.readSeq == 4)
        home.apply(.inbox(user: me, .read(peer: ann, seq: 5)))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unread.isEmpty && view.unreadCount == 0 && view.readSeq == 5)

        // A recalled message is no longer unread; if it was the last one, the list says so.
        home.apply(message(6, fromMe: false))
        #expect(home.machine.peers(of: me)[ann]?.unreadCount == 1)
        home.apply(.inbox(user: me, .recall(peer: ann, seq: 6, fromMe: false, messageID: 106)))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unreadCount == 0 && view.lastRecalled && view.lastSeq == 6)
        home.apply(message(7, fromMe: false))
        #expect(home.machine.peers(of: me)[ann]?.lastRecalled == false)

        // A read mark for a peer never seen adds nothing.
        home.apply(.readMark(user: me, peer: 99, seq: 3))
        #expect(home.machine.peers(of: me)[99] == nil)
    }

    @Test func unreadPastTheKeptMaximumIsCountedExactly() throws {
        var home = TestShard()
        let me: UInt64 = 9
        let (ann, ben): (UInt64, UInt64) = (4, 6)
        let kept = MessagingLimits.unreadKeptMax
        let total = UInt64(kept + 5)
        for seq in 1...total {
            home.apply(.inbox(user: me, .message(peer: ann, seq: seq, fromMe: false, messageID: seq)))
            home.apply(.inbox(user: me, .message(peer: ben, seq: seq, fromMe: false, messageID: seq)))
        }
        var view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unreadCount == total)
        #expect(view.unread.count == kept)
        #expect(view.unread.first == 6 && view.unread.last == total)
        #expect(view.unread == view.unread.sorted())
        #expect(view.unreadDropped == 5)
        #expect(view.lastSeq == total)

        // Reading past every dropped seq counts exactly again.
        home.apply(.readMark(user: me, peer: ann, seq: 500))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unreadCount == total - 500)
        #expect(view.unreadDropped == 0)
        home.apply(.readMark(user: me, peer: ann, seq: total))
        view = try #require(home.machine.peers(of: me)[ann])
        #expect(view.unreadCount == 0)
        #expect(view.unread.isEmpty)

        // Replying through the last seq reads them all too.
        #expect(home.machine.peers(of: me)[ben]?.unreadCount == total)
        home.apply(.inbox(user: me, .message(peer: ben, seq: total + 1, fromMe: true, messageID: total + 1)))
        view = try #require(home.machine.peers(of: me)[ben])
        #expect(view.unreadCount == 0)
        #expect(view.unreadDropped == 0)
        #expect(view.readSeq == total + 1)
    }
}

// MARK: Snapshots and determinism

@Suite struct SnapshotTests {
    @Test func aSnapshotRestoresTheSameStateAndBytes() throws {
        var log = TestLog()
        let records = mixedRecords(&log)
        var m = MessagingMachine()
        let outcomes = m.apply(records[...])
        #expect(outcomes.count == records.count)
        #expect(outcomes.filter { $0.rejectionCode != nil }.count == 6)
        #expect(m.rejectedIndexes.count == 6)
        #expect(m.accounts.count == 3)
        #expect(m.pairs.count == 2)
        #expect(m.peers.count == 3)

        let bytes = m.snapshot()
        let back = try MessagingMachine(snapshot: bytes)
        #expect(back.snapshot() == bytes)
        #expect(back.stateHash == m.stateHash)
        #expect(back.clockMicros == m.clockMicros)
        #expect(back.nextLocal == m.nextLocal)
        #expect(back.rejectedIndexes == m.rejectedIndexes)
        #expect(back.relayRejected == m.relayRejected)
        let alice = 4 + Ids.usernameShard("alice", shards: 4).rawValue
        #expect(back.userID(username: "alice") == alice)
        #expect(back.account(alice) == m.account(alice))
        #expect(back.account(alice)?.displayName == "Alice")
        #expect(back.pair(5, 9) == m.pair(5, 9))
        #expect(back.pair(5, 14) == m.pair(5, 14))
        for u: UInt64 in [5, 9, 14] { #expect(back.peers(of: u) == m.peers(of: u)) }
        #expect(back.peers(of: 5)[9]?.unread == [4])

        // The restored machine goes on exactly like the original (usernames are rebuilt).
        let more = [
            log.next(register("alice", shards: 4)), log.next(register("dave", shards: 4)), log.next(text(9, 5, "after")),
            log.next(.inbox(user: 5, .message(peer: 9, seq: 5, fromMe: false, messageID: 80))),
        ]
        var original = m
        var restored = back
        let a = original.apply(more[...])
        try #require(a.count == more.count)
        #expect(restored.apply(more[...]) == a)
        #expect(a.first?.rejectionCode == "username_taken")
        #expect(registeredID(a[1]) != nil)
        #expect(restored.stateHash == original.stateHash)
        #expect(restored.snapshot() == original.snapshot())
    }

    /// Pairs without messages are 35 bytes in a snapshot (u64 key | u8 relation | u32 note length | two
    /// flags | u64 lastSeq | three u32 counts): a restore must take what `snapshot()` wrote.
    @Test func aSnapshotOfPairsWithoutMessagesRestores() throws {
        var shard = TestShard()
        for other: UInt64 in [20, 30, 40] { befriend(&shard, 10, other) }
        shard.apply(.block(by: 50, other: 60, on: true))
        #expect(shard.machine.pairs.count == 4)
        let bytes = shard.machine.snapshot()
        let back = try MessagingMachine(snapshot: bytes)
        #expect(back.snapshot() == bytes)
        #expect(back.pair(10, 30)?.relation == .contacts)
        #expect(back.pair(50, 60)?.blockedByLo == true)
    }

    @Test func anEmptyMachineRoundTrips() throws {
        let empty = MessagingMachine()
        let back = try MessagingMachine(snapshot: empty.snapshot())
        #expect(back.snapshot() == empty.snapshot())
        #expect(back.stateHash == empty.stateHash)
    }

    @Test func damagedSnapshotBytesAreRefusedNotMisread() throws {
        var m = MessagingMachine()
        var log = TestLog()
        _ = m.apply(mixedRecords(&log)[...])
        let bytes = m.snapshot()
        let n = bytes.count
        try #require(n > 200)
        for cut in Set([0, 1, 3, 4, 11, 12, 19, 20, 23, 24, 31, n / 4, n / 3, n / 2, 2 * n / 3, 3 * n / 4, n - 9, n - 8, n - 1]).sorted() {
            #expect(throws: StateDecodeError.self, "cut at \(cut) of \(n)") { try MessagingMachine(snapshot: Array(bytes.prefix(cut))) }
        }
        #expect(throws: StateDecodeError.self) { try MessagingMachine(snapshot: bytes + [0]) }
        var version = bytes
        version[0] = 4
        #expect(throws: StateDecodeError.self) { try MessagingMachine(snapshot: version) }

        // Counts flipped to numbers the bytes cannot hold: refused before anything is reserved.
        var rejected = bytes
        for k in 20..<24 { rejected[k] = 0xFF }  // u32 version | i64 clock | u64 nextLocal | u32 R
        #expect(throws: StateDecodeError.self) { try MessagingMachine(snapshot: rejected) }
        let accountsAt = 24 + 8 * m.rejectedIndexes.count
        var accounts = bytes
        accounts[accountsAt + 7] ^= 0x80
        #expect(throws: StateDecodeError.self) { try MessagingMachine(snapshot: accounts) }
        for k in accountsAt..<(accountsAt + 8) { accounts[k] = 0xFF }
        #expect(throws: StateDecodeError.self) { try MessagingMachine(snapshot: accounts) }
        var fewer = bytes
        fewer[20] ^= 0x01  // one rejected index more or less: everything after is misaligned
        #expect(throws: StateDecodeError.self) { try MessagingMachine(snapshot: fewer) }

        // Any single damaged byte: an error or a state, never a crash.
        for k in bytes.indices {
            var damaged = bytes
            damaged[k] ^= 0xFF
            if let restored = try? MessagingMachine(snapshot: damaged) { _ = restored.snapshot() }
        }
    }

    @Test func batchSplitsAndRestoresDoNotChangeTheState() throws {
        var log = TestLog()
        let records = mixedRecords(&log)
        var whole = MessagingMachine()
        let expected = whole.apply(records[...])
        for chunk in [1, 2, 3, 5, 7] {
            var m = MessagingMachine()
            var outcomes: [ApplyOutcome] = []
            for start in stride(from: 0, to: records.count, by: chunk) {
                outcomes += m.apply(records[start..<min(start + chunk, records.count)])
            }
            #expect(outcomes == expected, "batches of \(chunk)")
            #expect(m.stateHash == whole.stateHash, "batches of \(chunk)")
            #expect(m.snapshot() == whole.snapshot(), "batches of \(chunk)")
        }
        for split in [1, records.count / 2, records.count - 1] {
            var m = MessagingMachine()
            var outcomes = m.apply(records[..<split])
            var restored = try MessagingMachine(snapshot: m.snapshot())
            outcomes += restored.apply(records[split...])
            #expect(outcomes == expected, "restored at \(split)")
            #expect(restored.stateHash == whole.stateHash, "restored at \(split)")
        }
        // A different history gives a different hash.
        var other = MessagingMachine()
        _ = other.apply(records.dropLast(5))
        #expect(other.stateHash != whole.stateHash)
    }
}

// MARK: Relay

@Suite struct InboxRelayTests {
    @Test func aMessageGoesToBothHomeShardsAndABlockToTheBlockerOnly() throws {
        let shards = 4
        let from: UInt64 = 7  // home 3
        let to: UInt64 = 10  // home 2
        var log = TestLog()
        _ = log.next(stream: StreamID(1), type: .data, payload: [])
        let r = log.next(text(from, to, "hi"))
        let derived = InboxRelay.derive(r, source: ShardID(2), shards: shards)
        #expect(derived.count == 2)
        let id = Ids.messageID(shard: ShardID(2), index: r.index)
        let parsed = Ids.parseMessageID(id, shards: shards)
        #expect(parsed?.shard == ShardID(2) && parsed?.index == r.index)

        let toSender = try #require(derived.first { $0.stream == Ids.inbox(from) })
        #expect(toSender.shard == Ids.homeShard(from, shards: shards))
        #expect(toSender.shard == ShardID(3))
        #expect(MessagingOp.decode(toSender.payload) == .inbox(user: from, .message(peer: to, seq: r.seq, fromMe: true, messageID: id)))
        let toRecipient = try #require(derived.first { $0.stream == Ids.inbox(to) })
        #expect(toRecipient.shard == Ids.homeShard(to, shards: shards))
        #expect(toRecipient.shard == ShardID(2))
        #expect(MessagingOp.decode(toRecipient.payload) == .inbox(user: to, .message(peer: from, seq: r.seq, fromMe: false, messageID: id)))

        let block = log.next(.block(by: to, other: from, on: true))
        #expect(
            InboxRelay.derive(block, source: ShardID(2), shards: shards) == [
                InboxRelay.Derived(
                    shard: ShardID(2), stream: Ids.inbox(to), payload: MessagingOp.inbox(user: to, .blocked(peer: from, on: true)).encode())
            ])

        // Only the recipient sees the request's note.
        let request = log.next(.contactRequest(from: from, to: to, note: "psst"))
        let requests = InboxRelay.derive(request, source: ShardID(2), shards: shards).compactMap { MessagingOp.decode($0.payload) }
        #expect(requests.count == 2)
        #expect(requests.contains(.inbox(user: from, .contactRequest(peer: to, fromMe: true, note: ""))))
        #expect(requests.contains(.inbox(user: to, .contactRequest(peer: from, fromMe: false, note: "psst"))))

        // A recall names the message it recalls.
        let recall = log.next(.recall(by: from, other: to, seq: r.seq, messageID: id))
        let recalls = InboxRelay.derive(recall, source: ShardID(2), shards: shards).compactMap { MessagingOp.decode($0.payload) }
        #expect(recalls.count == 2)
        #expect(recalls.contains(.inbox(user: from, .recall(peer: to, seq: r.seq, fromMe: true, messageID: id))))
        #expect(recalls.contains(.inbox(user: to, .recall(peer: from, seq: r.seq, fromMe: false, messageID: id))))

        // Nothing from a register, an account or inbox record, another type, a misfiled op or garbage.
        #expect(InboxRelay.derive(log.next(register("alice", shards: shards)), source: ShardID(2), shards: shards).isEmpty)
        #expect(InboxRelay.derive(log.next(.profile(user: from, displayName: "x")), source: ShardID(2), shards: shards).isEmpty)
        #expect(InboxRelay.derive(log.next(.readMark(user: from, peer: to, seq: 1)), source: ShardID(2), shards: shards).isEmpty)
        #expect(
            InboxRelay.derive(log.next(.inbox(user: from, .read(peer: to, seq: 1))), source: ShardID(2), shards: shards).isEmpty)
        let raw = log.next(stream: Ids.dm(from, to), type: .data, payload: text(from, to, "raw").encode())
        #expect(InboxRelay.derive(raw, source: ShardID(2), shards: shards).isEmpty)
        let misfiled = log.next(stream: Ids.dm(from, 11), type: .messaging, payload: text(from, to, "misfiled").encode())
        #expect(InboxRelay.derive(misfiled, source: ShardID(2), shards: shards).isEmpty)
        let garbage = log.next(stream: Ids.dm(from, to), type: .messaging, payload: [14, 1, 2])
        #expect(InboxRelay.derive(garbage, source: ShardID(2), shards: shards).isEmpty)
    }

    @Test func relayedEventsBuildBothUsersViews() throws {
        let shards = 4
        let alice: UInt64 = 6  // home 2
        let bob: UInt64 = 13  // home 1
        let source = Ids.pairShard(alice, bob, shards: shards)
        var pairShard = TestShard()
        var steps: [Step] = []
        steps.append(pairShard.apply(text(alice, bob, "too early")))
        steps.append(pairShard.apply(.contactRequest(from: alice, to: bob, note: "hi bob")))
        steps.append(pairShard.apply(.contactAccept(by: bob, other: alice)))
        steps.append(pairShard.apply(text(alice, bob, "hello")))
        steps.append(pairShard.apply(text(bob, alice, "hey")))
        let last = pairShard.apply(text(bob, alice, "there"))
        steps.append(last)
        steps.append(
            pairShard.apply(
                .recall(by: bob, other: alice, seq: last.record.seq, messageID: Ids.messageID(shard: source, index: last.record.index))))
        #expect(steps.filter { $0.outcome.rejectionCode != nil }.map(\.record.index) == pairShard.machine.relayRejected)
        #expect(pairShard.machine.relayRejected == [steps[0].record.index])

        var homes: [ShardID: TestShard] = [:]
        var relayed = 0
        for step in steps where !pairShard.machine.relayRejected.contains(step.record.index) {
            for d in InboxRelay.derive(step.record, source: source, shards: shards) {
                let applied = homes[d.shard, default: TestShard()].apply(stream: d.stream, type: .messaging, payload: d.payload)
                #expect(applied.outcome.isAccepted)
                relayed += 1
            }
        }
        #expect(relayed == 12)
        #expect(Set(homes.keys) == [ShardID(2), ShardID(1)])

        let aliceView = try #require(homes[Ids.homeShard(alice, shards: shards)]?.machine.peers(of: alice)[bob])
        #expect(aliceView.relation == .contact)
        #expect(aliceView.lastSeq == last.record.seq)
        #expect(aliceView.lastMessageID == Ids.messageID(shard: source, index: last.record.index))
        #expect(aliceView.lastRecalled)
        #expect(!aliceView.lastFromMe)
        #expect(aliceView.unread == [last.record.seq - 1])
        #expect(aliceView.unreadCount == 1)

        let bobView = try #require(homes[Ids.homeShard(bob, shards: shards)]?.machine.peers(of: bob)[alice])
        #expect(bobView.relation == .contact)
        #expect(bobView.lastSeq == last.record.seq)
        #expect(bobView.lastFromMe)
        #expect(bobView.unreadCount == 0)
        #expect(bobView.readSeq == last.record.seq)
    }
}

// MARK: Offline push positions

@Suite struct PushStateTests {
    /// Events from someone else make a user owed a notification from their record time; an ack or a
    /// notification past them clears it; marks never pass the inbox; the state survives a snapshot.
    @Test func owedEventsDeliveredAndNotifiedMarks() throws {
        var shard = TestShard()
        let bob = registeredID(shard.apply(register("bob", shards: 1)).outcome) ?? 0
        let alice: UInt64 = 99
        let t0: Int64 = 1_800_000_000_000_000
        // Bob's own events (a request he sent, a message he sent) owe him nothing.
        shard.apply(.inbox(user: bob, .contactRequest(peer: alice, fromMe: true, note: "")), at: t0)
        shard.apply(.inbox(user: bob, .message(peer: alice, seq: 1, fromMe: true, messageID: 1)), at: t0 + 1)
        #expect(shard.machine.pushDue(nowMicros: t0 + 10_000_000, delayMicros: 0, limit: 10).isEmpty)
        // A message from alice at t0+2: owed from then.
        shard.apply(.inbox(user: bob, .message(peer: alice, seq: 2, fromMe: false, messageID: 2)), at: t0 + 2)
        #expect(shard.machine.pushDue(nowMicros: t0 + 1_000, delayMicros: 5_000, limit: 10).isEmpty, "not before the delay")
        let due = shard.machine.pushDue(nowMicros: t0 + 5_002, delayMicros: 5_000, limit: 10)
        #expect(due == [PushDue(user: bob, fromSeq: 1, pushableLast: 3, owingSinceMicros: t0 + 2, preview: false)])
        #expect(shard.machine.pushDue(nowMicros: t0 + 5_002, delayMicros: 5_000, limit: 10, skip: [bob]).isEmpty, "backing off")
        // A device acknowledged up to 3: nothing owed.
        #expect(shard.apply(.delivered(user: bob, seq: 3), at: t0 + 3).outcome.isAccepted)
        #expect(shard.machine.owing.count == 0)
        // Two more; the worker notified the first: still owed, since the mark moved.
        shard.apply(.inbox(user: bob, .message(peer: alice, seq: 3, fromMe: false, messageID: 3)), at: t0 + 4)
        shard.apply(.inbox(user: bob, .contactRequest(peer: 7, fromMe: false, note: "hi")), at: t0 + 5)
        shard.apply(.notified(user: bob, seq: 4), at: t0 + 6)
        #expect(shard.machine.pushDue(nowMicros: t0 + 6, delayMicros: 0, limit: 10).map(\.fromSeq) == [5])
        #expect(shard.machine.push[bob]?.owingSinceMicros == t0 + 6)
        // A mark past the inbox stops at its end (a later event is owed again).
        shard.apply(.notified(user: bob, seq: 1_000), at: t0 + 7)
        #expect(shard.machine.push[bob]?.notified == 5)
        shard.apply(.inbox(user: bob, .message(peer: alice, seq: 4, fromMe: false, messageID: 4)), at: t0 + 8)
        #expect(shard.machine.pushDue(nowMicros: t0 + 8, delayMicros: 0, limit: 10).map(\.fromSeq) == [6])
        // Opting in to previews shows in the due list; unknown users are refused.
        shard.apply(.pushPreview(user: bob, on: true))
        #expect(shard.machine.pushDue(nowMicros: t0 + 8, delayMicros: 0, limit: 10).first?.preview == true)
        #expect(shard.apply(.delivered(user: 123_456_789, seq: 1)).outcome.rejectionCode == "unknown_user")
        // A snapshot carries it all, the owed set included.
        let back = try MessagingMachine(snapshot: shard.machine.snapshot())
        #expect(back.snapshot() == shard.machine.snapshot())
        #expect(back.push[bob] == shard.machine.push[bob])
        #expect(back.owing[bob] == t0 + 8)
        #expect(back.accounts[bob]?.pushPreview == true)
    }

    /// The due list is the longest-waiting users first, at most `limit`.
    /// A user whose inbox has events from before push tracking (an older version's log or snapshot) is
    /// tracked from the first event seen: the history is not notified.
    @Test func trackingStartsAtTheFirstEventSeenNotTheHistory() {
        var shard = TestShard()
        let bob = registeredID(shard.apply(register("bob", shards: 1)).outcome) ?? 0
        for k in 1...3 { shard.apply(.inbox(user: bob, .message(peer: 99, seq: UInt64(k), fromMe: false, messageID: UInt64(k)))) }
        shard.machine.push = BucketedMap()
        shard.machine.owing = BucketedMap()
        shard.apply(.inbox(user: bob, .message(peer: 99, seq: 4, fromMe: false, messageID: 4)))
        #expect(shard.machine.push[bob]?.notified == 3)
        #expect(shard.machine.pushDue(nowMicros: 1 << 62, delayMicros: 0, limit: 10).map(\.fromSeq) == [4])
    }

    @Test func dueUsersComeLongestWaitingFirst() {
        var shard = TestShard()
        var users: [UInt64] = []
        for k in 0..<5 { users.append(registeredID(shard.apply(register("user\(k)", shards: 1)).outcome) ?? 0) }
        for (k, u) in users.reversed().enumerated() {
            shard.apply(.inbox(user: u, .message(peer: 1, seq: 1, fromMe: false, messageID: 1)), at: 1_000 + Int64(k))
        }
        #expect(shard.machine.pushDue(nowMicros: 2_000, delayMicros: 0, limit: 3).count == 3, "at most the limit")
        #expect(shard.machine.pushDue(nowMicros: 2_000, delayMicros: 0, limit: 10).map(\.user) == users.reversed())
        #expect(shard.machine.pushDue(nowMicros: 1_002, delayMicros: 0, limit: 10).count == 3, "only those owed long enough")
    }
}

/// The upgrade check (Docs/messaging.md, upgrade note): a pair held on a shard other than its lower
/// user's home shard is found (as a version before stop 30 would have left it, by a hash of the pair);
/// one on its own shard is not; an empty state has none.
@Test func aConversationOffItsLowerUsersHomeShardIsFound() {
    let shards = 4
    let (a, b, c): (UInt64, UInt64, UInt64) = (1_000_001, 1_000_006, 1_000_009)  // homes 1, 2, 1
    var own = TestShard()
    befriend(&own, a, b)
    befriend(&own, c, a)
    #expect(own.machine.misplacedPair(shard: ShardID(1), shards: shards) == nil, "both pairs' lower user (a) is homed on 1")
    var elsewhere = TestShard()
    befriend(&elsewhere, b, c)  // lower user c: home 1, held on 3
    let found = elsewhere.machine.misplacedPair(shard: ShardID(3), shards: shards)
    #expect(found.map { [$0.0, $0.1] } == [c, b].sorted())
    #expect(MessagingMachine().misplacedPair(shard: ShardID(0), shards: shards) == nil)
    #expect(own.machine.misplacedPair(shard: ShardID(0), shards: 1) == nil, "one shard: everything is in place")
}
