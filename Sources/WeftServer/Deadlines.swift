import Foundation
import Replication

/// One timer thread for every request deadline of the process (forwarded writes, local proposals).
///
/// Each write used to start a `Task` that slept until its deadline and was cancelled when the answer
/// came: a task, a dispatch timer and a cancellation per request, on the hot path of every write. Here a
/// deadline is an entry in a table; the thread sleeps until the earliest one and fires what is due.
/// Cancelling removes the entry. Deadlines fire at most `slack` early (due ones are collected together).
final class Deadlines: @unchecked Sendable {
    /// The process-wide instance.
    static let shared = Deadlines()

    /// How early a deadline may fire (due entries are collected together).
    let slack: Duration = .milliseconds(5)
    /// Guards everything below.
    private let condition = NSCondition()
    private var entries: [UInt64: (due: ContinuousClock.Instant, fire: @Sendable () -> Void)] = [:]
    private var nextID: UInt64 = 1
    /// No entry is due before this (an entry removed early can leave it earlier than needed: one extra scan).
    private var earliest: ContinuousClock.Instant?
    private var started = false

    /// Runs `fire` (on the timer thread) at `due` unless cancelled first; returns the id to cancel with.
    func schedule(_ due: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) -> UInt64 {
        condition.lock()
        defer { condition.unlock() }
        if !started {
            started = true
            NamedThread.start("deadlines") { [self] in run() }
        }
        let id = nextID
        nextID += 1
        entries[id] = (due, fire)
        if earliest.map({ due < $0 }) ?? true {
            earliest = due
            condition.signal()
        }
        return id
    }

    /// Removes a deadline that has not fired (no effect after it fired).
    func cancel(_ id: UInt64) {
        condition.lock()
        entries.removeValue(forKey: id)
        condition.unlock()
    }

    /// Deadlines waiting (tests).
    var count: Int {
        condition.lock()
        defer { condition.unlock() }
        return entries.count
    }

    private func run() {
        let clock = ContinuousClock()
        while true {
            condition.lock()
            while true {
                guard let e = earliest else {
                    condition.wait()
                    continue
                }
                let now = clock.now
                if now >= e { break }
                // At most 50 ms at a time: the wait is on the wall clock, which may step; the deadlines
                // are on the monotonic one.
                let left = min(e - now, .milliseconds(50))
                let secs = Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18
                _ = condition.wait(until: Date(timeIntervalSinceNow: secs))
            }
            let now = clock.now + slack
            var dueIDs: [UInt64] = []
            var next: ContinuousClock.Instant?
            for (id, e) in entries {
                if e.due <= now {
                    dueIDs.append(id)
                } else if next.map({ e.due < $0 }) ?? true {
                    next = e.due
                }
            }
            let due = dueIDs.compactMap { entries.removeValue(forKey: $0)?.fire }
            earliest = next
            condition.unlock()
            for f in due { f() }
        }
    }
}
