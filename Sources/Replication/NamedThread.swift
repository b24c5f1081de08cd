import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Starts a thread whose operating-system name is `name` (Linux keeps its first 15 bytes), so `top -H`,
/// `perf` and `/proc/<pid>/task/*/comm` tell a node's threads apart. Foundation's `Thread.name` set
/// before `start` does not reach the kernel on Linux (every such thread showed the name of the thread
/// pool it was spawned from).
public enum NamedThread {
    @discardableResult
    public static func start(_ name: String, _ body: @escaping @Sendable () -> Void) -> Thread {
        let t = Thread {
            #if canImport(Glibc)
            // pthread_setname_np is not in the Glibc module; the kernel takes the name from this file too.
            let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
            if fd >= 0 {
                let bytes = Array(name.utf8.prefix(15))
                _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                close(fd)
            }
            #endif
            body()
        }
        t.name = name
        t.start()
        return t
    }
}
