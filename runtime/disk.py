"""The disk tier: named files, checksummed: one per disk unit holding its fp32 master weights and AdamW
states ([master | exp_avg | exp_avg_sq], `unitN.bin`), one per layer whose activations go to disk (`actN.bin`).

Files are padded to 4 KiB and moved in 16 MiB pieces by a pool of threads; every piece's CRC32 goes into a
sidecar `NAME.json` written (atomically) after the data and
checked on every read, together with the run id and a write generation, so a corrupt, truncated, stale,
missing or foreign file is a TierError naming the file, never silently read. Files are preallocated when
the tier opens, so a disk too small fails then, with the numbers, not mid-run.

Bytes move through kvikio (its own thread pool; GPUDirect Storage needs device buffers, and these are
host buffers for the CPU AdamW) when it is installed, or through POSIX pread/pwrite with O_DIRECT on
page-aligned buffers (buffered where the filesystem refuses O_DIRECT, e.g. tmpfs).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slideformer.schedule.memory import DISK_ALIGN as ALIGN, GiB, padded

PIECE = 16 * 2**20


@dataclass
class DeferredTensor:
    """A tensor read only when written out (checkpoints of disk-tier units, one unit in RAM at a time)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


class TierError(RuntimeError):
    """A disk-tier problem: the message names the file or directory and what to do."""


def kvikio_available() -> bool:
    try:
        import kvikio  # noqa: F401
    except (ImportError, OSError):  # OSError: the library is there but libcuda is not
        return False
    return True


class PosixIO:
    """pread/pwrite on an O_DIRECT descriptor (page cache bypassed), or a buffered one where refused."""

    def __init__(self) -> None:
        self.method = "posix-odirect"

    def open(self, path: Path, write: bool) -> int:
        flags = (os.O_RDWR if write else os.O_RDONLY) | getattr(os, "O_DIRECT", 0)
        try:
            return os.open(path, flags)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.method = "posix-buffered"
            return os.open(path, flags & ~getattr(os, "O_DIRECT", 0))

    def pread(self, fd: int, view: memoryview, offset: int) -> int:
        return os.preadv(fd, [view], offset)

    def pwrite(self, fd: int, view: memoryview, offset: int) -> int:
        return os.pwrite(fd, view, offset)

    def close(self, fd: int) -> None:
        os.close(fd)


class KvikioIO:
    """kvikio's CuFile, with direct I/O for host buffers where the filesystem allows it."""

    method = "kvikio"

    def __init__(self) -> None:
        import kvikio
        import kvikio.defaults

        self.kvikio = kvikio
        kvikio.defaults.set({"auto_direct_io_read": True, "auto_direct_io_write": True})

    def open(self, path: Path, write: bool):
        return self.kvikio.CuFile(path, "r+" if write else "r")

    def pread(self, f, view: memoryview, offset: int) -> int:
        return f.pread(np.frombuffer(view, np.uint8), len(view), offset, task_size=len(view)).get()

    def pwrite(self, f, view: memoryview, offset: int) -> int:
        return f.pwrite(np.frombuffer(view, np.uint8), len(view), offset, task_size=len(view)).get()

    def close(self, f) -> None:
        f.close()


class DiskTier:
    """Files of `file_bytes` (name -> bytes) in `directory`, created and preallocated here."""

    def __init__(self, directory: str | Path, file_bytes: dict[str, int], io: str = "auto", threads: int = 8) -> None:
        self.dir = Path(directory)
        self.file_bytes = file_bytes
        self.run = uuid.uuid4().hex
        self.generation = dict.fromkeys(file_bytes, 0)
        if io == "auto":
            io = "kvikio" if kvikio_available() else "posix"
        if io not in ("kvikio", "posix"):
            raise TierError(f"disk tier io must be 'auto', 'kvikio' or 'posix', not {io!r}")
        self.io = KvikioIO() if io == "kvikio" else PosixIO()
        self._open_directory()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slideformer-disk")

    @property
    def method(self) -> str:
        return self.io.method

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.bin"

    def _open_directory(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TierError(f"disk tier directory {self.dir}: cannot create it ({e.strerror})") from e
        if not os.access(self.dir, os.W_OK):
            raise TierError(f"disk tier directory {self.dir} is not writable")
        # One run per directory: a second run would overwrite the first one's states.
        self.lock = open(self.dir / "tier.lock", "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TierError(f"disk tier directory {self.dir} is in use by another run; give each run its own") from None
        need = sum(padded(n) for n in self.file_bytes.values())
        have = sum(self.path(n).stat().st_size for n in self.file_bytes if self.path(n).exists())
        free = shutil.disk_usage(self.dir).free + have
        if need > free:
            raise TierError(
                f"disk tier needs {need / GiB:.1f} GiB in {self.dir}, but only {free / GiB:.1f} GiB "
                "are free: free space, choose another directory, or lower the disk budget"
            )
        for name, nbytes in self.file_bytes.items():
            fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, padded(nbytes))
            except OSError as e:
                raise TierError(
                    f"disk tier: preallocating {padded(nbytes) / GiB:.2f} GiB for {self.path(name)} "
                    f"failed ({e.strerror})"
                ) from e
            finally:
                os.close(fd)
            self._sidecar(name).unlink(missing_ok=True)

    def _sidecar(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _pieces(self, buf: torch.Tensor, name: str) -> tuple[memoryview, list[tuple[int, int]]]:
        n = padded(self.file_bytes[name])
        if buf.dtype != torch.uint8 or buf.numel() < n or buf.data_ptr() % ALIGN:
            raise ValueError(f"{name} needs a {ALIGN}-aligned uint8 buffer of at least {n} bytes")
        view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
        return view, [(start, min(start + PIECE, n)) for start in range(0, n, PIECE)]

    def write(self, name: str, buf: torch.Tensor) -> None:
        """Write the file's bytes from `buf` (page aligned), then its sidecar of piece checksums."""
        view, pieces = self._pieces(buf, name)
        path = self.path(name)
        handle = self._open(path, write=True)

        def put(span: tuple[int, int]) -> int:
            piece = view[span[0] : span[1]]
            try:
                done = self.io.pwrite(handle, piece, span[0])
            except (OSError, RuntimeError) as e:  # kvikio raises RuntimeError
                what = "the disk is full" if getattr(e, "errno", None) == errno.ENOSPC else str(e)
                raise TierError(f"writing {path} failed: {what}") from e
            if done != len(piece):
                raise TierError(f"writing {path}: {done} of {len(piece)} bytes at offset {span[0]} written")
            return zlib.crc32(piece)

        try:
            crcs = list(self.pool.map(put, pieces))
        finally:
            self.io.close(handle)
        self.generation[name] += 1
        record = {
            "run": self.run,
            "file": name,
            "bytes": self.file_bytes[name],
            "generation": self.generation[name],
            "piece": PIECE,
            "crc32": crcs,
        }
        tmp = self._sidecar(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._sidecar(name))

    def read(self, name: str, buf: torch.Tensor) -> None:
        """Read the file's bytes into `buf` (page aligned), verifying every piece against the sidecar."""
        view, pieces = self._pieces(buf, name)
        path, sidecar = self.path(name), self._sidecar(name)
        try:
            record = json.loads(sidecar.read_text())
        except FileNotFoundError:
            raise TierError(
                f"{sidecar} is missing: the disk tier was changed or cleaned during the run; "
                "resume from the last checkpoint"
            ) from None
        expected = {"run": self.run, "file": name, "bytes": self.file_bytes[name], "generation": self.generation[name]}
        got = {k: record.get(k) for k in expected}
        if got != expected:
            raise TierError(
                f"{sidecar} does not belong to this run's latest write of {name} "
                f"(found {got}, expected {expected}); resume from the last checkpoint"
            )
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise TierError(f"{path} is missing; resume from the last checkpoint") from None
        if size < padded(self.file_bytes[name]):
            raise TierError(
                f"{path} is truncated: {size} bytes, expected {padded(self.file_bytes[name])}; "
                "resume from the last checkpoint"
            )
        handle = self._open(path, write=False)

        def get(item: tuple[int, tuple[int, int]]) -> None:
            i, (start, end) = item
            piece = view[start:end]
            try:
                done = self.io.pread(handle, piece, start)
            except (OSError, RuntimeError) as e:
                raise TierError(f"reading {path} failed: {e}") from e
            if done != len(piece):
                raise TierError(f"{path}: read {done} of {len(piece)} bytes at offset {start} (truncated?)")
            if zlib.crc32(piece) != record["crc32"][i]:
                raise TierError(
                    f"{path}: checksum mismatch in bytes [{start}, {end}): the file is corrupt; "
                    "resume from the last checkpoint"
                )

        try:
            list(self.pool.map(get, enumerate(pieces)))
        finally:
            self.io.close(handle)

    def _open(self, path: Path, write: bool):
        try:
            return self.io.open(path, write)
        except FileNotFoundError:
            raise TierError(f"{path} is missing; resume from the last checkpoint") from None
        except (OSError, RuntimeError) as e:
            raise TierError(f"opening {path} failed: {e}") from e

    def close(self) -> None:
        """Remove the tier's files (scratch: a run resumes from its checkpoints) and release the directory."""
        self.pool.shutdown()
        for name in self.file_bytes:
            self.path(name).unlink(missing_ok=True)
            self._sidecar(name).unlink(missing_ok=True)
        (self.dir / "tier.lock").unlink(missing_ok=True)
        self.lock.close()
