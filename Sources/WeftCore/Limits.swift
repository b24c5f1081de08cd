/// Hard limits. Every queue, buffer and size in Weft has one; decoders check them before allocating.
public enum Limits {
    /// Largest payload of a single record (a message body; media live elsewhere and are referenced).
    public static let recordPayloadBytesMax = 4 * 1024 * 1024
    /// Largest uncompressed block a decoder will accept. A block holds at least one record, so this
    /// must exceed one maximal record.
    public static let blockRawBytesMax = 8 * 1024 * 1024
    /// Largest number of records one append batch may carry.
    public static let appendBatchCountMax = 64 * 1024
}
