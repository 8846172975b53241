"""A small S3-compatible object server on local disk: where the durable local stack's broker keeps its log.

Why our own: Tansu's S3 storage keeps each partition's state in objects it updates with *conditional* writes
(``If-Match: <etag>``, ``If-None-Match: *``; ``AWS_CONDITIONAL_PUT=etag``), and that is what keeps two producers
writing one partition from overwriting each other. The npm ``s3rver`` ignores both headers (a conditional PUT
that must fail answers 200), and moto checks them outside any lock: measured with three producers writing one
partition concurrently, 300 acknowledged messages left 136 (s3rver) and 221 (moto 5.2.5) in the log. This server
answers one request at a time on one event loop, so a conditional write is checked and applied atomically.

It implements the part of the S3 REST API that an S3 client library needs for objects (path-style requests, as
``object_store``, the Rust crate Tansu uses, sends them): PutObject (with ``If-Match`` and ``If-None-Match``),
GetObject and HeadObject (with ``Range``, ``If-Match``, ``If-None-Match``), DeleteObject, ListObjectsV2 (prefix,
delimiter, continuation) and CreateBucket, with S3's status codes and XML error bodies (412
``PreconditionFailed``, 404 ``NoSuchKey`` / ``NoSuchBucket``, 501 ``NotImplemented`` for anything else, such as
multipart uploads). Signatures are not checked: it listens on loopback only. Objects are files written to a
temporary name and renamed, so a killed server never leaves half an object; a restarted one serves what is on disk.

Run it as ``python -m pipeline.s3local --dir DIR --port PORT --bucket NAME``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from email.utils import formatdate
from pathlib import Path
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

_SUFFIX = ".obj"
_MAX_KEYS = 1000


class ObjectStore:
    """Buckets as directories, objects as files (the key percent-encoded into one file name), ETags in memory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etags: dict[tuple[str, str], str] = {}
        for bucket in (p for p in root.iterdir() if p.is_dir()) if root.exists() else ():
            for path in bucket.glob(f"*{_SUFFIX}"):
                key = unquote(path.name[: -len(_SUFFIX)])
                self.etags[(bucket.name, key)] = hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - S3's ETag

    def bucket_dir(self, bucket: str) -> Path:
        return self.root / quote(bucket, safe="")

    def path(self, bucket: str, key: str) -> Path:
        return self.bucket_dir(bucket) / (quote(key, safe="") + _SUFFIX)

    def put(self, bucket: str, key: str, body: bytes) -> str:
        path = self.path(bucket, key)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(body)
        tmp.replace(path)
        etag = hashlib.md5(body).hexdigest()  # noqa: S324 - S3's ETag for a single-part object
        self.etags[(bucket, key)] = etag
        return etag

    def delete(self, bucket: str, key: str) -> None:
        self.path(bucket, key).unlink(missing_ok=True)
        self.etags.pop((bucket, key), None)

    def keys(self, bucket: str) -> list[str]:
        return sorted(k for b, k in self.etags if b == bucket)


def _error(status: int, code: str, message: str, resource: str = "") -> Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{escape(message)}</Message>'
            f"<Resource>{escape(resource)}</Resource><RequestId>0</RequestId></Error>")
    return Response(body, status_code=status, media_type="application/xml")


def _etag_matches(header: str, etag: str) -> bool:
    wanted = [tag.strip().strip('"') for tag in header.split(",")]
    return "*" in wanted or etag in wanted


def _object_headers(store: ObjectStore, bucket: str, key: str, etag: str) -> dict[str, str]:
    stat = store.path(bucket, key).stat()
    return {"ETag": f'"{etag}"', "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes"}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def create_app(root: Path, buckets: list[str]) -> Starlette:
    root.mkdir(parents=True, exist_ok=True)
    for bucket in buckets:
        (root / quote(bucket, safe="")).mkdir(exist_ok=True)
    store = ObjectStore(root)

    async def bucket_route(request: Request) -> Response:
        bucket = request.path_params["bucket"]
        exists = store.bucket_dir(bucket).is_dir()
        if request.method == "PUT":
            store.bucket_dir(bucket).mkdir(exist_ok=True)
            return Response(status_code=200)
        if not exists:
            return _error(404, "NoSuchBucket", "The specified bucket does not exist", bucket)
        if request.method == "HEAD":
            return Response(status_code=200)
        if request.method != "GET" or "uploads" in request.query_params:
            return _error(501, "NotImplemented", "not implemented by the local S3 server", bucket)
        return _list(bucket, request)

    def _list(bucket: str, request: Request) -> Response:
        params = request.query_params
        prefix, delimiter = params.get("prefix", ""), params.get("delimiter", "")
        after = params.get("continuation-token") or params.get("start-after") or params.get("marker") or ""
        max_keys = min(int(params.get("max-keys", _MAX_KEYS)), _MAX_KEYS)
        contents, prefixes, truncated, last = [], [], False, ""
        for key in store.keys(bucket):
            if not key.startswith(prefix) or key <= after:
                continue
            if delimiter and delimiter in key[len(prefix):]:
                common = prefix + key[len(prefix):].split(delimiter, 1)[0] + delimiter
                if common not in prefixes and common > after:
                    if len(contents) + len(prefixes) >= max_keys:
                        truncated = True
                        break
                    prefixes.append(common)
                    last = common
                continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            stat = store.path(bucket, key).stat()
            contents.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(stat.st_mtime)}</LastModified>"
                            f'<ETag>"{store.etags[(bucket, key)]}"</ETag><Size>{stat.st_size}</Size>'
                            "<StorageClass>STANDARD</StorageClass></Contents>")
            last = key
        body = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(contents) + len(prefixes)}"
                f"</KeyCount><MaxKeys>{max_keys}</MaxKeys><Delimiter>{escape(delimiter)}</Delimiter>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                + (f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if truncated else "")
                + "".join(contents)
                + "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
                + "</ListBucketResult>")
        return Response(body, media_type="application/xml")

    async def object_route(request: Request) -> Response:
        bucket, key = request.path_params["bucket"], request.path_params["key"]
        resource = f"/{bucket}/{key}"
        if not store.bucket_dir(bucket).is_dir():
            return _error(404, "NoSuchBucket", "The specified bucket does not exist", resource)
        params = request.query_params
        if "uploads" in params or "uploadId" in params or "x-amz-copy-source" in request.headers:
            return _error(501, "NotImplemented", "multipart uploads and copies are not implemented", resource)
        etag = store.etags.get((bucket, key))
        if request.method == "PUT":
            body = await request.body()
            # Checked and applied with no await in between: one event loop, so the write is atomic.
            etag = store.etags.get((bucket, key))
            if (match := request.headers.get("if-match")) is not None:
                if etag is None:
                    return _error(404, "NoSuchKey", "The specified key does not exist.", resource)
                if not _etag_matches(match, etag):
                    return _error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did "
                                  "not hold", resource)
            if request.headers.get("if-none-match") == "*" and etag is not None:
                return _error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not "
                              "hold", resource)
            new = store.put(bucket, key, body)
            return Response(status_code=200, headers={"ETag": f'"{new}"'})
        if request.method == "DELETE":
            store.delete(bucket, key)
            return Response(status_code=204)
        if etag is None:
            return _error(404, "NoSuchKey", "The specified key does not exist.", resource)
        headers = _object_headers(store, bucket, key, etag)
        if (match := request.headers.get("if-match")) is not None and not _etag_matches(match, etag):
            return _error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                          resource)
        if (none := request.headers.get("if-none-match")) is not None and _etag_matches(none, etag):
            return Response(status_code=304, headers=headers)
        data = store.path(bucket, key).read_bytes()
        status, body = 200, data
        if (wanted := request.headers.get("range")) and wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            if first == "":
                start, end = max(0, len(data) - int(last)), len(data) - 1
            else:
                start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
            if start >= len(data) or start > end:
                return _error(416, "InvalidRange", "The requested range is not satisfiable", resource)
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if request.method == "HEAD":
            return Response(status_code=status, headers={**headers, "Content-Length": str(len(body))})
        return Response(body, status_code=status, headers=headers, media_type="application/octet-stream")

    methods = ["GET", "PUT", "HEAD", "DELETE", "POST"]
    return Starlette(routes=[
        Route("/{bucket}", bucket_route, methods=methods),
        Route("/{bucket}/", bucket_route, methods=methods),
        Route("/{bucket}/{key:path}", object_route, methods=methods),
    ])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="A local S3-compatible object server on disk (see the docstring).")
    parser.add_argument("--dir", type=Path, required=True, help="Where objects are kept.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bucket", action="append", default=[], help="A bucket to create at start (repeatable).")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.dir, args.bucket), host=args.host, port=args.port, log_level="warning",
                access_log=False, workers=1)


if __name__ == "__main__":
    main()
