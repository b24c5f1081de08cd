#ifndef WEFT_CFILESYNC_H
#define WEFT_CFILESYNC_H

/// File-system calls Swift's Glibc module does not export.
///
/// sync_file_range(2), which Swift's Glibc module does not export (it is a GNU extension).
/// `wait` 0: start writing the dirty pages of [offset, offset + count) and return (SYNC_FILE_RANGE_WRITE).
/// `wait` 1: write them and wait until the device has them (WAIT_BEFORE | WRITE | WAIT_AFTER).
/// Neither writes metadata nor flushes the device's cache. Returns 0, or -1 with errno set.
/// Where the call does not exist (not Linux), both fall back to fsync, which is stronger.
int weft_sync_file_range(int fd, long long offset, long long count, int wait);

/// statfs(2)'s f_type (the filesystem's magic number) for `path`, or -1 with errno set. Not Linux: -1.
long long weft_filesystem_type(const char *path);

#endif
