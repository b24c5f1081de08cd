#!/usr/bin/env python3
"""What a small durable write costs on this disk (Docs/benchmarks.md, stop 24).

Usage: python3 Tools/fsync-probe.py [DIR] [BLOCK_DEVICE] [shared]   (defaults: . and vda)

For each mode and pace, N writes each followed by a sync; prints block write requests per sync (from
/sys/block/<dev>/stat), wall time and this process's CPU per operation. Modes:
  append    300-byte pwrite at the end of a growing file, then fdatasync
  zeroed    the same into a file written ahead with zeros (what the segment store does)
  direct    4 KiB O_DIRECT pwrite into a zeroed file, then fdatasync
  dsync     4 KiB O_DIRECT|O_DSYNC pwrite into a zeroed file
With "shared" (stop 25): k files (1 or 4, as a driver lane's shards), a 300-byte pwrite into each per
turn, then one of
  fdatasync   fdatasync of each file
  sfr         sync_file_range(WRITE) of each, sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER) of each, then
              one fdatasync (the device flush shared by the files)
  syncfs      one syncfs
"""
import mmap, os, sys, time

DIR = sys.argv[1] if len(sys.argv) > 1 else "."
DEV = sys.argv[2] if len(sys.argv) > 2 else "vda"
N = 300


def writes():
    return int(open(f"/sys/block/{DEV}/stat").read().split()[4])


def run(mode, gap):
    path = os.path.join(DIR, "fsync-probe.tmp")
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if mode != "append":
        os.write(fd, b"\0" * (N * 4096 + 8192))
        os.fdatasync(fd)
    os.close(fd)
    flags = os.O_RDWR
    if mode in ("direct", "dsync"):
        flags |= os.O_DIRECT
    if mode == "dsync":
        flags |= os.O_DSYNC
    fd = os.open(path, flags)
    page = mmap.mmap(-1, 4096)
    page.write(b"y" * 4096)
    w0, t0, c0 = writes(), time.perf_counter(), time.process_time()
    for i in range(N):
        if mode in ("append", "zeroed"):
            os.pwrite(fd, b"x" * 300, i * 300)
        else:
            os.pwritev(fd, [page], (i // 4) * 4096)  # the tail page again, as small appends would
        if mode != "dsync":
            os.fdatasync(fd)
        if gap:
            time.sleep(gap)
    wall = time.perf_counter() - t0 - N * gap
    cpu = time.process_time() - c0
    print(f"{mode:7} every {gap * 1000:3.0f} ms: {(writes() - w0) / N:.2f} block writes per op, "
          f"{wall / N * 1e6:4.0f} us wall, {cpu / N * 1e6:4.0f} us CPU")
    os.close(fd)
    os.remove(path)


def shared(mode, k, gap):
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    libc.syncfs.argtypes = [ctypes.c_int]
    wait_before, write, wait_after = 1, 2, 4
    fds = []
    for j in range(k):
        path = os.path.join(DIR, f"fsync-probe-{j}.tmp")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"\0" * (N * 300 + 8192))
        os.fsync(fd)
        fds.append(fd)
    os.sync()
    w0, t0, c0 = writes(), time.perf_counter(), time.process_time()
    for i in range(N):
        for fd in fds:
            os.pwrite(fd, b"x" * 300, i * 300)
        if mode == "fdatasync":
            for fd in fds:
                os.fdatasync(fd)
        elif mode == "sfr":
            for fd in fds:
                libc.sync_file_range(fd, i * 300, 300, write)
            for fd in fds:
                libc.sync_file_range(fd, i * 300, 300, wait_before | write | wait_after)
            os.fdatasync(fds[0])
        else:
            libc.syncfs(fds[0])
        if gap:
            time.sleep(gap)
    wall = time.perf_counter() - t0 - N * gap
    cpu = time.process_time() - c0
    print(f"{mode:9} {k} files, every {gap * 1000:3.0f} ms: {(writes() - w0) / N:.2f} block writes per turn, "
          f"{wall / N * 1e6:4.0f} us wall, {cpu / N * 1e6:4.0f} us CPU")
    for j, fd in enumerate(fds):
        os.close(fd)
        os.remove(os.path.join(DIR, f"fsync-probe-{j}.tmp"))


if len(sys.argv) > 3 and sys.argv[3] == "shared":
    for gap in (0, 0.002):
        for k in (1, 4):
            for mode in ("fdatasync", "sfr", "syncfs"):
                shared(mode, k, gap)
else:
    for gap in (0, 0.002):
        for mode in ("append", "zeroed", "direct", "dsync"):
            run(mode, gap)
