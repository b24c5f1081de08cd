import Foundation
import NIOConcurrencyHelpers
import Testing

@testable import WeftServer

/// A read this node's replica serves is asked of the other replicas too when it waits (`WeftNode.hedged`):
/// a replica just cut off from its leader still counts as serving for two election timeouts, and its
/// read would wait out the whole deadline. No test here depends on how long anything takes: a read that
/// must not finish waits on a gate.
@Suite struct HedgedReadTests {
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

    @Test func aReadWaitingOnItsReplicaIsAnsweredByTheOthers() async {
        let gate = Gate()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .milliseconds(10),
            local: { _ in
                await gate.wait()
                return .failure(.unavailable("the replica never got the record"))
            }, remote: { _ in .success(2) })
        #expect(r == .success(2))
        gate.open()
    }

    @Test func aQuickLocalAnswerAsksNoOneElse() async throws {
        let remote = Calls()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .seconds(20), local: { _ in .success(1) },
            remote: { _ in
                remote.note()
                return .success(2)
            })
        #expect(r == .success(1))
        #expect(remote.count == 0)
    }

    @Test(.timeLimit(.minutes(1))) func aLocalFailureAsksTheOthersAtOnce() async {
        // The hedge's own timer is far past the test's limit: only the failure can start the second read.
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(300), after: .seconds(200), local: { _ in .failure(.unavailable("no leader")) },
            remote: { _ in .success(3) })
        #expect(r == .success(3))
    }

    @Test func twoFailuresGiveAFailure() async {
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .seconds(20), local: { _ in .failure(.unavailable("here")) },
            remote: { _ in .failure(.unavailable("there")) })
        // Either failure: the second read can answer before the first's failure is counted.
        #expect(r == .failure(.unavailable("there")) || r == .failure(.unavailable("here")))
    }

    @Test func aFailureEveryReplicaWouldGiveIsNotAskedAgain() async {
        let remote = Calls()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .seconds(20), local: { _ in .failure(.invalid("index 99 is past the log")) },
            remote: { _ in
                remote.note()
                return .success(2)
            })
        #expect(r == .failure(.invalid("index 99 is past the log")))
        #expect(remote.count == 0)
    }

    /// The other replicas failing first does not end a read this replica can still answer.
    @Test func aFailureElsewhereWaitsForThisReplica() async {
        let gate = Gate()
        let r: Answer = await WeftNode.hedged(
            timeout: .seconds(30), after: .milliseconds(10),
            local: { _ in
                await gate.wait()
                return .success(1)
            },
            remote: { _ in
                gate.open()
                return .failure(.unavailable("the leader is cut off"))
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
                        timeout: .seconds(30), after: .microseconds(k % 7 * 100),
                        local: { _ in
                            if k % 3 == 0 { await Task.yield() }
                            return k % 5 == 0 ? .failure(.unavailable("here")) : .success(k)
                        },
                        remote: { _ in
                            if k % 2 == 0 { await Task.yield() }
                            return .success(k)
                        })
                    return (k, r)
                }
            }
            var seen = 0
            for await (k, r) in g {
                #expect(r == .success(k))
                seen += 1
            }
            #expect(seen == 200)
        }
    }
}
