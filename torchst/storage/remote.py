"""Object storage through fsspec: ranged reads into caller memory, streamed multipart writes.

Used only for URLs (``s3://bucket/key``, ``gs://``, ``memory://``, ...; see ``is_url``); local
paths never reach this module, and it imports fsspec only when a URL is used (``torchst[remote]``).

- **Reads**: ``RemoteObject.head`` fetches the first bytes with one ranged GET (the size of the
  object comes back with it on S3); ``read_into`` fills caller memory (tensor bytes) with
  parallel ranged GETs of at most ``CHUNK`` bytes, copying each network buffer straight into
  place, so memory stays bounded and nothing is staged on local disk.  On S3 every GET after
  the first carries ``If-Match`` with the ETag seen first: an object replaced mid-read fails
  with ``CheckpointChangedError`` instead of returning a mix of two versions.
- **Writes**: ``open_writer`` returns a file-like object; on S3 its bytes go out as a multipart
  upload of ``PART_SIZE`` parts, ``MAX_INFLIGHT`` at a time (bounded memory, no staging file),
  each part and the whole object carrying CRC32C so the store verifies what it received.
  Nothing is visible until ``commit()``: a failed or killed upload leaves the previous object.
- **Errors**: missing buckets and keys become ``CheckpointNotFoundError``, refused access and
  other failures a ``RemoteError``; each names the URL.  Transient errors are retried with
  backoff (``RETRIES`` times).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from ..errors import CheckpointChangedError, CheckpointNotFoundError, RemoteError, TorchstError

__all__ = ["CHUNK", "PART_SIZE", "RemoteObject", "RemoteWriter", "is_url", "join", "open_writer", "remote_fs"]

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # one ranged GET reads at most this much
PARALLEL = 16  # ranged GETs in flight per read
PART_SIZE = 8 << 20  # multipart part size (S3 minimum is 5 MiB)
MAX_INFLIGHT = 4  # parts uploading at once: memory stays under (MAX_INFLIGHT + 1) * PART_SIZE
RETRIES = 4
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
T = TypeVar("T")


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path; never imports fsspec.

    >>> is_url("s3://bucket/ckpt"), is_url("/data/ckpt"), is_url("C:\\\\ckpt")
    (True, False, False)
    """
    return isinstance(path, str) and _URL.match(path) is not None


def join(url: str, name: str) -> str:
    """``url`` + ``/`` + ``name`` (URLs always use ``/``)."""
    return url.rstrip("/") + "/" + name


def remote_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem serving ``url`` and the path inside it."""
    try:
        import fsspec
    except ImportError:
        raise RemoteError(
            errno.EPROTONOSUPPORT,
            f"{url}: reading or writing URLs needs fsspec: pip install 'torchst[remote]' (adds fsspec and s3fs)",
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise RemoteError(
            errno.EPROTONOSUPPORT,
            f"{url}: no fsspec filesystem for this URL ({e}); install its package (s3fs, gcsfs, ...)",
        ) from None
    return fs, path


def _is_s3(fs: Any) -> bool:
    return type(fs).__module__.startswith("s3fs")


def _key(fs: Any, path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _translate(e: BaseException, url: str, what: str) -> BaseException:
    """``e`` as the torchst error callers catch, naming ``url``."""
    if isinstance(e, TorchstError):
        return e
    text = str(e)
    if isinstance(e, _Truncated):
        return RemoteError(
            errno.EIO, f"{url}: cannot {what}: the object ended early ({text}); it was truncated or replaced"
        )
    if isinstance(e, FileNotFoundError) or "NoSuchKey" in text or "NoSuchBucket" in text:
        where = "bucket" if "NoSuchBucket" in text or "bucket" in text.lower() else "object"
        return CheckpointNotFoundError(
            f"{url}: cannot {what}: no such {where} ({text or type(e).__name__}); check the bucket and key"
        )
    if "PreconditionFailed" in text:
        return CheckpointChangedError(
            f"{url}: the object was replaced while it was being read ({text}); a writer re-saved it, load again"
        )
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return RemoteError(
            errno.EACCES, f"{url}: cannot {what}: access denied ({text}); check the credentials and bucket policy"
        )
    code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
    return RemoteError(code, f"{url}: cannot {what}: {type(e).__name__}: {text}")


_TRANSIENT = (
    "SlowDown",
    "reduce your request rate",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    " 500",
    " 502",
    " 503",
    " 504",
)


def _transient(e: BaseException) -> bool:
    if isinstance(e, (TorchstError, FileNotFoundError, PermissionError)):
        return False
    text = str(e)
    if any(s in text for s in ("NoSuch", "AccessDenied", "Forbidden", "PreconditionFailed", "InvalidRange")):
        return False
    transport = isinstance(e, (asyncio.TimeoutError, ConnectionError, _Truncated)) or type(e).__module__.startswith(
        ("aiohttp", "botocore", "urllib3")
    )
    return transport or isinstance(e, OSError) or any(s in text for s in _TRANSIENT)


class _Truncated(Exception):
    """A response body shorter than the range asked for (retried, then reported)."""


def _retry(fn: Callable[[], T], url: str, what: str) -> T:
    for attempt in range(RETRIES):
        try:
            return fn()
        except Exception as e:
            if attempt + 1 < RETRIES and _transient(e):
                log.debug("%s: %s failed (%s), retrying", url, what, e)
                time.sleep(0.05 * 2**attempt)
                continue
            raise _translate(e, url, what) from e
    raise AssertionError("unreachable")


async def _aretry(fn: Callable[[], Awaitable[T]], url: str, what: str) -> T:
    for attempt in range(RETRIES):
        try:
            return await fn()
        except Exception as e:
            if attempt + 1 < RETRIES and _transient(e):
                log.debug("%s: %s failed (%s), retrying", url, what, e)
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            raise _translate(e, url, what) from e
    raise AssertionError("unreachable")


def _run(fs: Any, coro: Awaitable[T]) -> T:
    from fsspec.asyn import sync

    result: T = sync(fs.loop, lambda: coro)
    return result


def _crc32c_b64(data: bytes | bytearray | memoryview, crc: int = 0) -> str:
    from crc32c import crc32c

    return base64.b64encode(crc32c(data, crc).to_bytes(4, "big")).decode()


class RemoteObject:
    """One object of a store, read by byte ranges.

    >>> with open_writer("memory://bucket/blob") as w:
    ...     _ = w.write(b"0123456789"); w.commit()
    >>> obj = RemoteObject("memory://bucket/blob")
    >>> obj.head(4), obj.size      # one GET on S3; the size comes with it
    (b'0123', 10)
    >>> buf = bytearray(3); obj.read_into([(5, memoryview(buf))]); bytes(buf)
    b'567'

    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = remote_fs(url)
        self.s3 = _is_s3(self.fs)
        self.size: int | None = None
        self.etag: str | None = None

    # -- S3: raw GETs so the body is copied straight into place and the ETag is pinned --------
    async def _s3_get(self, start: int, end: int, into: memoryview | None) -> bytes | None:
        bucket, key = _key(self.fs, self.path)
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if self.etag is not None:
            kw["IfMatch"] = self.etag
        resp = await self.fs._call_s3("get_object", **kw)
        body = resp["Body"]
        try:
            if self.size is None:
                total = str(resp.get("ContentRange", "")).rpartition("/")[2]
                self.size = int(total) if total.isdigit() else None
                self.etag = resp.get("ETag")
            if into is None:
                data: bytes = await body.read()
                return data
            pos = 0
            stream = body.content if hasattr(body, "content") else None
            if stream is None:
                chunk = await body.read()
                into[: len(chunk)] = chunk
                pos = len(chunk)
            else:
                while pos < len(into):
                    chunk = await stream.readany()
                    if not chunk:
                        break
                    n = min(len(chunk), len(into) - pos)
                    into[pos : pos + n] = chunk[:n]  # the one copy: network buffer -> tensor memory
                    pos += n
            if pos != len(into):
                raise _Truncated(f"got {pos:,} of {len(into):,} bytes at offset {start:,}")
            return None
        finally:
            body.close()

    def head(self, nbytes: int) -> bytes:
        """The first ``nbytes`` bytes (fewer if the object is smaller); sets ``size``."""
        if self.s3:

            async def go() -> bytes:
                data = await self._s3_get(0, nbytes, None)
                assert data is not None
                if self.size is None:  # a 0-byte object answers without Content-Range
                    self.size = len(data)
                return data

            return _run(self.fs, _aretry(go, self.url, "read"))

        def plain() -> bytes:
            self.size = int(self.fs.size(self.path))
            data: bytes = self.fs.cat_file(self.path, start=0, end=min(nbytes, self.size))
            return data

        return _retry(plain, self.url, "read")

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``."""
        buf = bytearray(end - start)
        self.read_into([(start, memoryview(buf))])
        return bytes(buf)

    def read_into(self, targets: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(offset, view)`` with the object's bytes there: parallel ranged GETs of ≤ ``CHUNK``."""
        pieces = list(_chunks(targets))
        if not pieces:
            return
        if self.s3:

            async def one(off: int, mv: memoryview) -> None:
                await _aretry(lambda: self._s3_get(off, off + len(mv), mv), self.url, "read")

            async def all_() -> None:
                gate = asyncio.Semaphore(PARALLEL)

                async def gated(off: int, mv: memoryview) -> None:
                    async with gate:
                        await one(off, mv)

                await asyncio.gather(*(gated(o, m) for o, m in pieces))

            _run(self.fs, all_())
            return
        from .buffers import io_pool

        def plain(off: int, mv: memoryview) -> None:
            def get() -> None:
                data = self.fs.cat_file(self.path, start=off, end=off + len(mv))
                if len(data) != len(mv):
                    raise _Truncated(f"got {len(data):,} of {len(mv):,} bytes at offset {off:,}")
                mv[:] = data

            _retry(get, self.url, "read")

        futures = [io_pool().submit(plain, o, m) for o, m in pieces]
        for f in futures:
            f.result()


def _chunks(targets: Sequence[tuple[int, memoryview]]) -> Iterator[tuple[int, memoryview]]:
    for off, mv in targets:
        mv = mv.cast("B") if mv.format != "B" else mv
        for pos in range(0, len(mv), CHUNK):
            yield off + pos, mv[pos : pos + CHUNK]


def read_bytes(url: str) -> bytes:
    """A whole (small) object: an index or a manifest."""
    obj = RemoteObject(url)
    return _retry(lambda: bytes(obj.fs.cat_file(obj.path)), url, "read")


def exists(url: str) -> bool:
    """Whether an object is at ``url`` (asked of the store, never of a listing cache)."""
    fs, path = remote_fs(url)

    def check() -> bool:
        try:
            fs.info(path, refresh=True) if _is_s3(fs) else fs.info(path)
        except FileNotFoundError:
            return False
        return True

    return _retry(check, url, "check")


def listdir(url: str) -> list[str]:
    """Names directly under ``url`` (an empty list for a prefix with nothing under it)."""
    fs, path = remote_fs(url)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False, refresh=True) if _is_s3(fs) else fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})

    return _retry(ls, url, "list")


def delete(url: str) -> None:
    fs, path = remote_fs(url)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    _retry(rm, url, "delete")


def write_bytes(url: str, data: bytes) -> None:
    """Put a whole (small) object in one request (atomic on every object store)."""
    with open_writer(url) as w:
        w.write(data)
        w.commit()


class RemoteWriter:
    """A write-only stream to one object; visible only after ``commit()``, discarded otherwise.

    >>> with open_writer("memory://bucket/out.bin") as w:
    ...     _ = w.write(b"header"); _ = w.write(memoryview(b"tensor bytes")); w.commit()
    >>> read_bytes("memory://bucket/out.bin")
    b'headertensor bytes'
    """

    def __init__(self, url: str, *, part_size: int = PART_SIZE) -> None:
        self.url = url
        self.fs, self.path = remote_fs(url)
        self.s3 = _is_s3(self.fs)
        self.part_size = max(part_size, 5 << 20) if self.s3 else part_size
        self.position = 0
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._done = False
        self._file: Any = None
        if not self.s3:
            self._file = _retry(lambda: self.fs.open(self.path, "wb", autocommit=False), url, "write")

    def seekable(self) -> bool:
        return False  # checksums are computed ahead: nothing is written twice

    def tell(self) -> int:
        return self.position

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        self.position += n
        if not self.s3:
            self._file.write(view)
            return n
        pos = 0
        while pos < n:
            take = min(n - pos, self.part_size - len(self._buf))
            self._buf += view[pos : pos + take]  # bounded buffer: the part being filled
            pos += take
            if len(self._buf) >= self.part_size:
                self._send_part()
        return n

    def _send_part(self) -> None:
        bucket, key = _key(self.fs, self.path)
        if self._upload_id is None:

            async def create() -> str:
                resp = await self.fs._call_s3(
                    "create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C"
                )
                return str(resp["UploadId"])

            self._upload_id = _run(self.fs, _aretry(create, self.url, "start an upload to"))
        # Bound memory: wait for the oldest part before a new one goes out.
        while sum(not f.done() for f in self._parts) >= MAX_INFLIGHT:
            next(f for f in self._parts if not f.done()).exception()
        for f in self._parts:
            if f.done() and f.exception() is not None:
                f.result()
        number, body = len(self._parts) + 1, bytes(self._buf)
        self._buf = bytearray()
        upload_id = self._upload_id

        async def part() -> dict[str, Any]:
            checksum = _crc32c_b64(body)
            resp = await self.fs._call_s3(
                "upload_part",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32C",
                ChecksumCRC32C=checksum,
            )
            return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumCRC32C": checksum}

        self._parts.append(asyncio.run_coroutine_threadsafe(_aretry(part, self.url, "upload a part of"), self.fs.loop))

    def commit(self) -> None:
        """Make the object visible (complete the upload); before this nothing was."""
        if self._done:
            return
        self.fs.invalidate_cache(self.path)
        if not self.s3:
            _retry(self._file.commit, self.url, "write")
            self._done = True
            return
        bucket, key = _key(self.fs, self.path)
        if self._upload_id is None:  # small: one PUT with its checksum
            body = bytes(self._buf)

            async def put() -> None:
                await self.fs._call_s3(
                    "put_object",
                    Bucket=bucket,
                    Key=key,
                    Body=body,
                    ChecksumAlgorithm="CRC32C",
                    ChecksumCRC32C=_crc32c_b64(body),
                )

            _run(self.fs, _aretry(put, self.url, "write"))
            self._done = True
            return
        if self._buf:
            self._send_part()
        parts = [f.result() for f in self._parts]
        upload_id = self._upload_id

        async def complete() -> None:
            await self.fs._call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )

        _run(self.fs, _aretry(complete, self.url, "complete the upload of"))
        self._done = True

    def prepare(self) -> None:
        """Upload every byte written so far and wait for it (the commit itself is then one request)."""
        if self.s3 and self._upload_id is not None:
            if self._buf:
                self._send_part()
            for f in self._parts:
                f.result()

    def abort(self) -> None:
        """Discard everything written; the previous object (if any) stays as it was."""
        if self._done:
            return
        self._done = True
        if not self.s3:
            try:
                self._file.discard()
            except Exception:
                log.debug("%s: discarding the upload failed", self.url, exc_info=True)
            return
        for f in self._parts:
            f.cancel()
            with contextlib.suppress(BaseException):  # cancelled or failed parts are dropped anyway
                f.exception()
        if self._upload_id is not None:
            bucket, key = _key(self.fs, self.path)
            upload_id = self._upload_id

            async def abort() -> None:
                await self.fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

            try:
                _run(self.fs, abort())
            except Exception:  # noqa: BLE001 - an unfinished upload is invisible; lifecycle rules reap it
                log.warning("%s: could not abort multipart upload %s", self.url, upload_id)

    def __enter__(self) -> RemoteWriter:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def open_writer(url: str, *, part_size: int = PART_SIZE) -> RemoteWriter:
    """A ``RemoteWriter`` for ``url``: write, then ``commit()``; leaving the block uncommitted discards it."""
    return RemoteWriter(url, part_size=part_size)
