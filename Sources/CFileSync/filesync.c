#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
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
