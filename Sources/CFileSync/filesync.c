#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/vfs.h>
#endif
#include "cfilesync.h"

int weft_sync_file_range(int fd, long long offset, long long count, int wait) {
#ifdef __linux__
    unsigned int flags = wait
        ? (SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
        : SYNC_FILE_RANGE_WRITE;
    return sync_file_range(fd, (off_t)offset, (off_t)count, flags);
#else
    (void)offset;
    (void)count;
    (void)wait;
    return fsync(fd);
#endif
}

long long weft_filesystem_type(const char *path) {
#ifdef __linux__
    struct statfs fs;
    if (statfs(path, &fs) != 0) return -1;
    return (long long)fs.f_type;
#else
    (void)path;
    return -1;
#endif
}
