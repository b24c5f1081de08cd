import Foundation
import NIOConcurrencyHelpers
import Testing

@testable import WeftServer

/// A read this node's replica serves is asked of the other replicas too when it waits (`WeftNode.hedged`):
/// a replica just cut off from its leader still counts as serving for two election timeouts, and its
/// read would wait out the whole deadline. No test here depends on how long anything takes: a read that
/// must not finish waits on a gate, and a hedge that must not fire is an hour away (in the whole suite
/// the cooperative pool can be busy for over a minute before a test's first task runs).
@Suite(.timeLimit(.minutes(10))) struct HedgedReadTests {
    typealias Answer = Result<Int, WeftNode.ReadFailure>

    /// Opened once; waiters before and after go on.
    final class Gate: Sendable {
        let state = NIOLockedValueBox<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))
        func wait() async {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now = state.withLockedValue { s -> Bool in
                    if s.open { return true }
                    s.waiters.append(c)
                    return false
                }
                if now { c.resume() }
            }
        }
        func open() {
            let ws = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                s.open = true
                defer { s.waiters = [] }
                return s.waiters
            }
            for w in ws { w.resume() }
        }
    }

    final class Calls: Sendable {
        let n = NIOLockedValueBox(0)
        func note() { n.withLockedValue { $0 += 1 } }
        var count: Int { n.withLockedValue { $0 } }
    }

    static let never: Duration = .seconds(3600)

    /// Counts its calls; says `answers[k]` on call k (the last one after).
    final class Doubt: Sendable {
        let calls = NIOLockedValueBox(0)
        let answers: [Bool]
        let gate = Gate()
        let openAt: Int
        init(_ answers: [Bool], openGateAt: Int = Int.max) {
            self.answers = answers
            self.openAt = openGateAt
        }
        func ask() -> Bool {
            let k = calls.withLockedValue { c -> Int in
                c += 1
                return c
            }
            if k >= openAt { gate.open() }
            return answers[min(k, answers.count) - 1]
        }
        var count: Int { calls.withLockedValue { $0 } }
    }

    @Test func aReadWaitingOnACutOffReplicaIsAnsweredByTheOthers() async {
        let gate = Gate()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .milliseconds(10), inDoubt: { true },
            local: { _ in
                await gate.wait()
                return .failure(.unavailable("the replica never got the record"))
            }, remote: { _ in .success(2) })
        #expect(r == .success(2))
        gate.open()
    }

    /// A slow read on a replica that hears its leader stays there: two checks said no, then it answered.
    @Test func aSlowReadOnAReplicaWithItsLeaderIsNotPassedOn() async {
        let doubt = Doubt([false], openGateAt: 2)
        let remote = Calls()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .milliseconds(5), inDoubt: { doubt.ask() },
            local: { _ in
                await doubt.gate.wait()
                return .success(1)
            },
            remote: { _ in
                remote.note()
                return .success(2)
            })
        #expect(r == .success(1))
        #expect(remote.count == 0)
        #expect(doubt.count >= 2)
    }

    /// The check repeats while the read waits: a replica that loses its leader later is passed on then.
    @Test func aReplicaThatLosesItsLeaderDuringTheReadPassesItOn() async {
        let doubt = Doubt([false, false, true])
        let gate = Gate()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .milliseconds(5), inDoubt: { doubt.ask() },
            local: { _ in
                await gate.wait()
                return .success(1)
            }, remote: { _ in .success(2) })
        #expect(r == .success(2))
        #expect(doubt.count == 3)
        gate.open()
    }

    @Test func aQuickLocalAnswerAsksNoOneElse() async throws {
        let remote = Calls()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(7200), after: Self.never, inDoubt: { true }, local: { _ in .success(1) },
            remote: { _ in
                remote.note()
                return .success(2)
            })
        #expect(r == .success(1))
        #expect(remote.count == 0)
    }

    /// The hedge's own timer is an hour away: only the failure can start the second read.
    @Test(arguments: [WeftNode.ReadFailure.read(.damaged("block 3")), .read(.unavailable("stopped")), .noReplica])
    func aFailureOfThisReplicaAsksTheOthersAtOnce(_ failure: WeftNode.ReadFailure) async {
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(7200), after: Self.never, inDoubt: { false }, local: { _ in .failure(failure) },
            remote: { _ in .success(3) })
        #expect(r == .success(3))
    }

    /// `.unavailable` can be load (a full waiter table): passed on only by a replica that may be cut off.
    @Test(arguments: [false, true]) func aFailureThatMayBeLoadIsPassedOnOnlyInDoubt(_ inDoubt: Bool) async {
        let remote = Calls()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(7200), after: Self.never, inDoubt: { inDoubt }, local: { _ in .failure(.unavailable("65 536 reads wait")) },
            remote: { _ in
                remote.note()
                return .success(3)
            })
        #expect(r == (inDoubt ? .success(3) : .failure(.unavailable("65 536 reads wait"))))
        #expect(remote.count == (inDoubt ? 1 : 0))
    }

    @Test func twoFailuresGiveThisReplicasFailure() async {
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(7200), after: Self.never, inDoubt: { true }, local: { _ in .failure(.unavailable("here")) },
            remote: { _ in .failure(.unavailable("there")) })
        #expect(r == .failure(.unavailable("here")))
    }

    @Test(arguments: [WeftNode.ReadFailure.invalid("index 99 is past the log"), .read(.compacted(first: 40))])
    func aFailureEveryReplicaWouldGiveIsNotAskedAgain(_ failure: WeftNode.ReadFailure) async {
        let remote = Calls()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(7200), after: Self.never, inDoubt: { true }, local: { _ in .failure(failure) },
            remote: { _ in
                remote.note()
                return .success(2)
            })
        #expect(r == .failure(failure))
        #expect(remote.count == 0)
    }

    /// The other replicas failing first — even with `.invalid`, which a replica far behind or a peer of
    /// another version can say — does not end a read this replica can still answer.
    @Test(arguments: [WeftNode.ReadFailure.invalid("a malformed read answer"), .unavailable("the leader is cut off")])
    func aFailureElsewhereWaitsForThisReplica(_ failure: WeftNode.ReadFailure) async {
        let gate = Gate()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .milliseconds(5), inDoubt: { true },
            local: { _ in
                await gate.wait()
                return .success(1)
            },
            remote: { _ in
                gate.open()
                return .failure(failure)
            })
        #expect(r == .success(1))
    }

    /// Many reads at once, each answered by one side or the other, each exactly once (a continuation
    /// resumed twice traps).
    @Test func everyReadGetsOneAnswer() async {
        await withTaskGroup(of: (Int, Answer).self) { g in
            for k in 0..<200 {
                g.addTask {
                    let r: Answer = await WeftNode.hedged(
                        timeout: .seconds(30), after: .microseconds(k % 7 * 100), inDoubt: { k % 4 != 0 },
                        local: { _ in
                            if k % 3 == 0 { await Task.yield() }
                            return k % 5 == 0 ? .failure(.unavailable("here")) : .success(k)
                        },
                        remote: { _ in
                            if k % 2 == 0 { await Task.yield() }
                            return .success(k + 1000)
                        })
                    return (k, r)
                }
            }
            var seen = 0
            for await (k, r) in g {
                // A local failure with no doubt is the answer (k % 20 == 0); else either read's.
                if k % 20 == 0 {
                    #expect(r == .failure(.unavailable("here")))
                } else {
                    #expect(r == .success(k) || r == .success(k + 1000))
                }
                seen += 1
            }
            #expect(seen == 200)
        }
    }
}
