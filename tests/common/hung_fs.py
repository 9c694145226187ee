"""A FUSE filesystem whose files answer every lookup and stat but never a
read, nor the flush of a close: a file on a network or FUSE mount that
stopped answering. Mounted
read-only at argv[1]; prints "mounted" once the kernel has it. Used by
tests/stalled_reads.rs; killing the process fails the reads still waiting.
"""

import errno
import stat
import sys
import threading

from fusepy import FUSE, FuseOSError, Operations

SIZE = 64 << 20
FILES = {
    "/disk", "/vmlinux", "/initrd", "/kernel.deb", "/archive.tar", "/closing",
    "/layout/oci-layout", "/layout/index.json",
}
DIRS = {"/", "/layout"}


class Hung(Operations):
    def init(self, path):
        print("mounted", flush=True)

    def getattr(self, path, fh=None):
        if path in DIRS:
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
        if path in FILES:
            return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=SIZE, st_blocks=SIZE // 512)
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        names = [p.rsplit("/", 1)[1] for p in FILES | DIRS if p != "/" and p.rsplit("/", 1)[0] == path.rstrip("/")]
        return [".", ".."] + names

    def open(self, path, flags):
        return 0

    def read(self, path, size, offset, fh):
        threading.Event().wait()

    def flush(self, path, fh):
        threading.Event().wait()


if __name__ == "__main__":
    FUSE(Hung(), sys.argv[1], foreground=True, ro=True)
