"""The job's results, sent to the host while it runs, so that a crash keeps them.

Everything the job writes under ``protocol.RESULTS`` travels to the host as one tar
stream on ``protocol.PORT_RESULTS``, which QEMU writes to ``results.tar`` in the run
directory. A file goes once it has settled (the same size and modification time at two
scans a heartbeat apart), and again whenever it changes and settles anew; at the end of
the job everything not yet sent goes, and the archive is closed. A guest that panics
or hangs after that point in the job has already handed over its settled files, and
the host unpacks every whole member of a cut-off archive.

Each member is written straight to the port as ``add`` returns: tarfile's stream mode
would hold the tail of a member in its buffer, which a crash would lose.
"""

import os
import tarfile
import threading


class _Port:
    """A file object over a virtio-serial port: unbuffered writes, and the ``tell``
    that tarfile asks of an archive it writes."""

    def __init__(self, fd: int):
        self.fd = fd
        self.offset = 0

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset


class Streamer:
    """Sends the files under ``root`` as they settle; ``scan`` each heartbeat, ``close`` at the end."""

    def __init__(self, root: str, port: int):
        self.root = root
        self.tar = tarfile.open(fileobj=_Port(os.dup(port)), mode="w", format=tarfile.PAX_FORMAT)
        self.sent: dict[str, tuple[int, int]] = {}
        self.seen: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()
        self.closed = False

    def scan(self, final: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            now = dict(self._files())
            for relative, state in sorted(now.items()):
                settled = final or self.seen.get(relative) == state
                if settled and self.sent.get(relative) != state:
                    self._send(relative, state)
            self.seen = now

    def close(self) -> None:
        """Send what has not gone yet and end the archive (the host reads a whole tar)."""
        self.scan(final=True)
        with self.lock:
            self.closed = True
            self.tar.close()
            os.close(self.tar.fileobj.fd)

    def _files(self):
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue  # gone between the listing and the look
                yield os.path.relpath(path, self.root), (info.st_size, info.st_mtime_ns)

    def _send(self, relative: str, state: tuple[int, int]) -> None:
        try:
            self.tar.add(os.path.join(self.root, relative), arcname=relative, recursive=False)
        except OSError:
            return  # removed or unreadable meanwhile: the next scan sees what is there
        self.sent[relative] = state
