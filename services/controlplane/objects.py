"""Reading an upload bundle out of a JetStream object store into a file, in bounded memory and disk.

nats-py's `ObjectStore.get` is not fit for objects a hostile deployer wrote: it assembles the object in memory
(quadratically, `bytes += chunk`), believes the object's meta (its size, and its `nuid`, which names the chunk
subject: a nuid of `>` would read every object's chunks), and follows a link into another bucket. Here the meta is
only a claim: its size is checked against the limit before anything is read, the chunks are fetched one message at
a time (a JetStream message get, next message on the chunk subject) and written to a file, the real bytes and chunks
are counted against the limit while reading, and the digest is verified. The object is removed from the store once
read or refused, whatever the outcome.

The bucket (and its stream, `OBJ_<bucket>` by nats' convention) are parameters: which store holds a deployer's
bundles is the caller's business.

Reads are message gets answered by the stream's leader, not direct gets (which nats' object stores allow and nats-py
uses): with a replicated store (AUBE_KV_REPLICAS=3) a direct get may be answered by a follower that has not yet
applied a bundle put a moment ago. On a 3-node cluster, 23 of 150 bundles fetched through another node right after
their put were "not there" or short that way; none with message gets (tests/faults/test_replicated_state.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from pathlib import Path

import anyio
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from aube.shared.errors import AubeError, InvalidBundle, InvalidRequest, ServiceUnavailable

log = logging.getLogger(__name__)

STREAM_TEMPLATE = "OBJ_{bucket}"
_META_SUBJECT = "$O.{bucket}.M.{key}"
_CHUNK_SUBJECT = "$O.{bucket}.C.{nuid}"
_DIGEST_PREFIX = "SHA-256="
# nats' nuids are 22 base62 characters; anything else in a meta is forged, and a wildcard would widen the subject.
_NUID = re.compile(r"[A-Za-z0-9]{1,64}")
MAX_KEY_CHARS = 1024
# An object in many tiny chunks costs a request per chunk: allow one chunk per this many bytes of the limit (nats
# clients write 128 KiB chunks), plus a few for a small object's last chunk.
MIN_AVERAGE_CHUNK = 8 * 1024
_SPARE_CHUNKS = 64
REQUEST_TIMEOUT = 5.0


class _Link(msgspec.Struct, kw_only=True):
    bucket: str = ""
    name: str | None = None


class _Options(msgspec.Struct, kw_only=True):
    link: _Link | None = None


class ObjectMeta(msgspec.Struct, kw_only=True):
    """What is read of nats' object info JSON (its other fields are ignored)."""

    name: str = ""
    nuid: str = ""
    size: int = 0
    chunks: int = 0
    digest: str = ""
    deleted: bool = False
    options: _Options | None = None


class FetchedObject(msgspec.Struct, frozen=True, kw_only=True):
    size: int
    chunks: int


def _too_large(message: str) -> InvalidBundle:
    return InvalidBundle(message, code="bundle_too_large")


def max_chunks(max_bytes: int) -> int:
    return max_bytes // MIN_AVERAGE_CHUNK + _SPARE_CHUNKS


def meta_subject(bucket: str, key: str) -> str:
    return _META_SUBJECT.format(bucket=bucket, key=base64.urlsafe_b64encode(key.encode()).decode())


def check_meta(meta: ObjectMeta, key: str, max_bytes: int) -> str:
    """The chunk subject's last token (the nuid) once the meta's claims are acceptable; raises otherwise."""
    if meta.deleted:
        raise InvalidRequest(f"bundle {key!r} was deleted from the object store")
    if meta.options is not None and meta.options.link is not None:
        raise InvalidRequest(f"bundle {key!r} is a link to another object; upload the bundle itself")
    if not _NUID.fullmatch(meta.nuid):
        raise InvalidBundle(f"bundle {key!r} has an unusable object meta (nuid)", code="bundle_corrupt")
    if meta.size > max_bytes:
        raise _too_large(f"bundle is {meta.size} bytes, over the limit of {max_bytes} bytes")
    if meta.chunks > max_chunks(max_bytes):
        raise _too_large(f"bundle is in {meta.chunks} chunks, more than the limit of {max_chunks(max_bytes)}")
    return meta.nuid


def _expected_digest(meta: ObjectMeta) -> bytes | None:
    if not meta.digest:
        return None
    if not meta.digest.upper().startswith(_DIGEST_PREFIX):
        raise InvalidBundle(f"object digest {meta.digest[:40]!r} is not SHA-256", code="bundle_corrupt")
    try:
        return base64.urlsafe_b64decode(meta.digest[len(_DIGEST_PREFIX) :])
    except (binascii.Error, ValueError) as e:
        raise InvalidBundle("object digest is not base64", code="bundle_corrupt") from e


async def fetch_object(
    js: JetStreamContext,
    bucket: str,
    key: str,
    dest: Path,
    max_bytes: int,
    *,
    stream: str | None = None,
    keep: bool = False,
) -> FetchedObject:
    """Write the object `key` of `bucket` to the new file `dest`; at most `max_bytes` bytes, or bundle_too_large.

    The object is removed from the store afterwards, read or refused, unless `keep` (a version's folder, which every
    host reads). On any error `dest` may hold a partial copy: the caller removes its folder.
    """
    stream = stream or STREAM_TEMPLATE.format(bucket=bucket)
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(f"object key must be 1 to {MAX_KEY_CHARS} characters")
    meta_subj = meta_subject(bucket, key)
    meta = await _read_meta(js, stream, meta_subj, bucket, key)
    chunk_subj: str | None = None
    try:
        chunk_subj = _CHUNK_SUBJECT.format(bucket=bucket, nuid=check_meta(meta, key, max_bytes))
        return await _copy_chunks(js, stream, chunk_subj, dest, max_bytes, meta)
    finally:
        # Shielded: a cancelled upload must not leave its bundle in the store.
        if not keep:
            with anyio.move_on_after(REQUEST_TIMEOUT, shield=True):
                await _discard(js, stream, meta_subj, chunk_subj)


async def _read_meta(js: JetStreamContext, stream: str, subject: str, bucket: str, key: str) -> ObjectMeta:
    try:
        raw = await js.get_msg(stream, subject=subject)
    except NotFoundError as e:
        raise InvalidRequest(f"no bundle {key!r} in the {bucket} object store") from e
    except Exception as e:  # no such stream, a timeout: nats-py's errors vary
        raise InvalidRequest(f"no bundle {key!r} in the {bucket} object store ({type(e).__name__})") from e
    try:
        return msgspec.json.decode(raw.data or b"", type=ObjectMeta)
    except msgspec.DecodeError as e:
        with anyio.move_on_after(REQUEST_TIMEOUT, shield=True):
            await _discard(js, stream, subject, None)
        raise InvalidBundle(f"bundle {key!r} has an unusable object meta: {e}", code="bundle_corrupt") from e


async def _copy_chunks(
    js: JetStreamContext, stream: str, subject: str, dest: Path, max_bytes: int, meta: ObjectMeta
) -> FetchedObject:
    limit_chunks = max_chunks(max_bytes)
    expected = _expected_digest(meta)
    digest = hashlib.sha256()
    size = chunks = 0
    seq = 1
    async with await anyio.open_file(dest, "xb") as out:
        while True:
            try:
                # One message per request, so memory holds one chunk (at most the server's max payload).
                msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            except AubeError:
                raise
            except Exception as e:
                raise ServiceUnavailable(f"reading the bundle failed: {type(e).__name__}: {e}") from e
            data = msg.data or b""
            chunks += 1
            size += len(data)
            # The meta's size and chunk count are claims; these counts are what was really stored.
            if size > max_bytes:
                raise _too_large(f"bundle is over the limit of {max_bytes} bytes (its object meta said {meta.size})")
            if chunks > limit_chunks:
                raise _too_large(f"bundle is in more than {limit_chunks} chunks")
            digest.update(data)
            await out.write(data)
            if msg.seq is None:  # pragma: no cover - a message get always carries its sequence
                raise InvalidBundle("object chunk without a sequence number", code="bundle_corrupt")
            seq = msg.seq + 1
    if size != meta.size:
        raise InvalidBundle(f"bundle is {size} bytes but its object meta says {meta.size}", code="bundle_corrupt")
    if expected is not None and digest.digest() != expected:
        raise InvalidBundle("bundle does not match its object digest", code="bundle_corrupt")
    return FetchedObject(size=size, chunks=chunks)


async def _discard(js: JetStreamContext, stream: str, meta_subj: str, chunk_subj: str | None) -> None:
    """Remove the object: its chunks (only on a subject checked to be literal) and its meta."""
    for subject in (chunk_subj, meta_subj):
        if subject is None:
            continue
        try:
            await js.purge_stream(stream, subject=subject)
        except Exception:  # the upload's outcome stands; the leftover is logged for the operator
            log.warning("could not remove %s from %s", subject, stream, exc_info=True)
