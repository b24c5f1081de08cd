/// A key with a hash that is the same in every process (bucket choice must not depend on `Hasher`'s
/// per-process seed, or replicas would lay out and serialise state differently).
public protocol StableHashable: Hashable, Sendable {
    var stableHash: UInt64 { get }
}

extension Array: StableHashable where Element == UInt8 {
    @inlinable public var stableHash: UInt64 { FNV1a.hash(self) }
}

extension UInt64: StableHashable {
    @inlinable public var stableHash: UInt64 {
        var h = FNV1a()
        h.add(self)
        return h.value
    }
}

/// A dictionary split into `bucketCount` dictionaries by a stable hash of the key.
///
/// Why: state machines are values, and a snapshot is a copy of the value serialised on another thread.
/// With one big `Dictionary`, the first write after the copy duplicates the whole table on the shard
/// thread (a stop proportional to the state: ~100 ms for a million entries). Here the first write to a
/// bucket after a copy duplicates that bucket only (1/256 of the state), and a bucket is copied at most
/// once per snapshot.
///
/// `@inlinable` throughout: it is used from other modules on the apply path of every record, and an
/// unspecialised generic looks up its type metadata at run time on every call.
@frozen
public struct BucketedMap<Key: StableHashable, Value: Sendable>: Sendable {
    @inlinable public static var bucketCount: Int { 256 }
    @usableFromInline var buckets: [[Key: Value]]
    /// Entries in all buckets.
    public var count: Int { storedCount }
    @usableFromInline var storedCount = 0

    @inlinable public init() {
        buckets = Array(repeating: [:], count: Self.bucketCount)
    }

    @inlinable @inline(__always) static func bucket(_ key: Key) -> Int { Int(truncatingIfNeeded: key.stableHash >> 56) & (bucketCount - 1) }

    @inlinable public subscript(key: Key) -> Value? {
        get { buckets[Self.bucket(key)][key] }
        set {
            let b = Self.bucket(key)
            if let newValue {
                if buckets[b].updateValue(newValue, forKey: key) == nil { storedCount += 1 }
            } else if buckets[b].removeValue(forKey: key) != nil {
                storedCount -= 1
            }
        }
    }

    /// Mutates the entry of `key` in place (nil: absent; set it to nil to remove, to a value to insert).
    /// In place: a value held only here is not copied (as `dictionary[key]` read, changed and written back would).
    @inlinable public mutating func update<R>(_ key: Key, _ body: (inout Value?) throws -> R) rethrows -> R {
        let b = Self.bucket(key)
        let had = buckets[b][key] != nil
        let r = try body(&buckets[b][key])
        let has = buckets[b][key] != nil
        if had != has { storedCount += has ? 1 : -1 }
        return r
    }

    /// Every entry, bucket by bucket; within a bucket in `Dictionary` order (seeded per process: do not
    /// let it reach state, outcomes or a hash that must agree across replicas).
    @inlinable public func forEach(_ body: (Key, Value) throws -> Void) rethrows {
        for b in buckets {
            for (k, v) in b { try body(k, v) }
        }
    }

    /// Room for `count` entries in all, spread over the buckets (a restore that knows its size does not
    /// grow and rehash every bucket ~20 times on the way).
    @inlinable public mutating func reserveCapacity(_ count: Int) {
        let per = count / Self.bucketCount + count / (Self.bucketCount * 8) + 1
        for b in buckets.indices where buckets[b].capacity < per { buckets[b].reserveCapacity(per) }
    }

    /// The entries of one bucket (for serialising bucket by bucket).
    @inlinable public func entries(inBucket b: Int) -> [Key: Value] { buckets[b] }
}
