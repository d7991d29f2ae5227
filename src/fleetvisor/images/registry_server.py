"""The OCI distribution API over an ImageStore: the push/pull subset `skopeo copy` needs.

`registry_router(store_of, authorize)` answers an APIRouter to mount at the app's root.
Its routes are plain Starlette routes, outside the app's OpenAPI: the distribution spec
defines this API, and its errors are the spec's `{"errors": [...]}` bodies, not
problem+json. Every bad request is a 4xx; blobs stream from disk and uploads stream to
disk (`<store>/uploads/<id>`), verified against the client's digest before they land.

Auth: `Authorization: Bearer TOKEN` or `Basic base64(anyuser:TOKEN)` (skopeo `--creds`);
the injected `authorize` decides per action (`pull`, `push`, `delete`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fleetvisor.errors import FleetvisorError, Forbidden, InvalidInput, NotFound, Unauthorized
from fleetvisor.images.digest import CHUNK, DigestMismatch, digest_bytes, is_digest
from fleetvisor.images.store import (
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCTET_STREAM,
    ImageStore,
    MissingBlobs,
    Reference,
    validate_name,
    validate_tag,
)

Action = Literal["pull", "push", "delete"]
StoreOf = Callable[[Request], ImageStore]
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
CHALLENGE = 'Basic realm="fleetvisor"'
UPLOAD_TTL = 86_400.0  # an upload untouched for a day is abandoned; removed at the next start
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_CONTENT_RANGE = re.compile(r"(?:bytes )?(\d+)-(\d+)(?:/\d+)?")


class Authorizer(Protocol):
    """Decides whether `token` may do `action` on `repository` (None: the `/v2/` ping).

    Returns when allowed; raises Unauthorized for a missing or unknown token and
    Forbidden for a known token without the right.
    """

    def __call__(self, token: str | None, action: Action, repository: str | None) -> None: ...


def token_authorizer(
    admin_token: str, is_pull_token: Callable[[str], bool] = lambda _token: False
) -> Authorizer:
    """The controller's policy: the admin token may do anything, pull tokens only pull."""

    def authorize(token: str | None, action: Action, repository: str | None) -> None:
        if not token:
            raise Unauthorized(
                "log in with the admin token (e.g. skopeo --creds anyuser:TOKEN) "
                "or send 'Authorization: Bearer TOKEN'"
            )
        if hmac.compare_digest(token.encode(), admin_token.encode()):
            return
        if is_pull_token(token):
            if action == "pull":
                return
            raise Forbidden(f"this token may only pull; {action} needs the admin token")
        raise Unauthorized("the token is not valid; use the admin token or a host token")

    return authorize


class RegistryError(Exception):
    """An error answered as the distribution spec's JSON body with a 4xx status."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def response(self, method: str) -> Response:
        headers = API_VERSION | self.headers
        if method == "HEAD":
            return Response(status_code=self.status, headers=headers)
        body = {"errors": [{"code": self.code, "message": self.message, "detail": {}}]}
        return JSONResponse(body, status_code=self.status, headers=headers)


def token_of(authorization: str | None) -> str | None:
    """The token in a Bearer or Basic (password part) Authorization header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


class Uploads:
    """Blob uploads in progress: one file per upload id, its size is the upload's offset."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def start(self) -> str:
        self.purge(UPLOAD_TTL)
        upload_id = uuid.uuid4().hex
        (self.directory / upload_id).touch(mode=0o600, exist_ok=False)
        return upload_id

    def path(self, upload_id: str) -> Path:
        path = self.directory / upload_id
        if _UPLOAD_ID.fullmatch(upload_id) is None or not path.is_file():
            raise RegistryError(
                404, "BLOB_UPLOAD_UNKNOWN", f"no upload {upload_id[:40]!r}; start one with POST"
            )
        return path

    def size(self, upload_id: str) -> int:
        return self.path(upload_id).stat().st_size

    async def append(self, upload_id: str, request: Request, start: int | None = None) -> int:
        """Append the request body; `start` (from Content-Range) must be the current size."""
        try:  # no O_CREAT: an upload cancelled meanwhile stays cancelled
            fd = os.open(self.path(upload_id), os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "the upload was cancelled") from None
        with os.fdopen(fd, "ab") as out:
            offset = os.fstat(fd).st_size
            if start is not None and start != offset:
                raise RegistryError(
                    416,
                    "BLOB_UPLOAD_INVALID",
                    f"chunk starts at {start} but the upload has {offset} bytes; "
                    f"resume from {offset}",
                    {"Range": _range(offset)},
                )
            buffer = bytearray()
            async for chunk in request.stream():
                buffer += chunk
                if len(buffer) >= CHUNK:
                    await run_in_threadpool(out.write, bytes(buffer))
                    buffer.clear()
            if buffer:
                await run_in_threadpool(out.write, bytes(buffer))
            out.flush()
            return os.fstat(fd).st_size

    def cancel(self, upload_id: str) -> None:
        self.path(upload_id).unlink(missing_ok=True)

    def purge(self, max_age: float) -> int:
        """Remove uploads untouched for `max_age` seconds; answers how many."""
        removed, now = 0, time.time()
        for path in self.directory.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > max_age:
                    path.unlink()
                    removed += 1
        return removed


Handler = Callable[[Request, ImageStore], Awaitable[Response]]


def registry_router(store_of: StoreOf, authorize: Authorizer) -> APIRouter:
    """The distribution API routes; mount with `app.include_router(...)` (no prefix)."""
    router = APIRouter()

    def route(path: str, methods: list[str], action: Action | None, handler: Handler) -> None:
        async def endpoint(request: Request) -> Response:
            try:
                name = request.path_params.get("name")
                token = token_of(request.headers.get("authorization"))
                await run_in_threadpool(authorize, token, _action(request, action), name)
                response = await handler(request, store_of(request))
            except RegistryError as exc:
                return exc.response(request.method)
            except Unauthorized as exc:
                error = RegistryError(
                    401, "UNAUTHORIZED", exc.detail, {"WWW-Authenticate": CHALLENGE}
                )
                return error.response(request.method)
            except Forbidden as exc:
                return RegistryError(403, "DENIED", exc.detail).response(request.method)
            except FleetvisorError as exc:  # a user error no handler typed more precisely
                status = 400 if exc.status == 422 else exc.status
                return RegistryError(status, "UNSUPPORTED", exc.detail).response(request.method)
            except ClientDisconnect:
                return Response(status_code=400)  # nobody is listening any more
            response.headers.update(API_VERSION)
            return response

        router.routes.append(Route(path, endpoint, methods=methods, include_in_schema=False))

    route("/v2/", ["GET"], "pull", _ping)
    route("/v2", ["GET"], "pull", _ping)
    manifests = "/v2/{name:path}/manifests/{reference}"
    route(manifests, ["GET", "HEAD"], "pull", _get_manifest)
    route(manifests, ["PUT"], "push", _put_manifest)
    route(manifests, ["DELETE"], "delete", _delete_manifest)
    route("/v2/{name:path}/blobs/uploads/", ["POST"], "push", _start_upload)
    route("/v2/{name:path}/blobs/uploads", ["POST"], "push", _start_upload)
    upload = "/v2/{name:path}/blobs/uploads/{upload_id}"
    route(upload, ["GET"], "push", _upload_status)
    route(upload, ["PATCH"], "push", _patch_upload)
    route(upload, ["PUT"], "push", _finish_upload)
    route(upload, ["DELETE"], "push", _cancel_upload)
    blobs = "/v2/{name:path}/blobs/{digest}"
    route(blobs, ["GET", "HEAD"], "pull", _get_blob)
    route(blobs, ["DELETE"], "delete", _unsupported)
    route("/v2/{name:path}/tags/list", ["GET"], "pull", _tags)
    known = [r for r in router.routes if isinstance(r, Route)]

    async def unknown(request: Request, _store: ImageStore) -> Response:
        if any(r.path_regex.fullmatch(request.url.path) for r in known):
            raise RegistryError(
                405, "UNSUPPORTED", f"{request.method} is not supported on {request.url.path}"
            )
        raise RegistryError(
            404,
            "NAME_UNKNOWN",
            f"no registry endpoint {request.url.path}; see the OCI distribution spec for the API",
        )

    route("/v2/{rest:path}", ALL_METHODS, None, unknown)
    return router


def _action(request: Request, action: Action | None) -> Action:
    if action is not None:
        return action
    return "pull" if request.method in ("GET", "HEAD") else "push"


async def _ping(_request: Request, _store: ImageStore) -> Response:
    return JSONResponse({})


async def _get_manifest(request: Request, store: ImageStore) -> Response:
    ref = _reference(request)
    try:
        raw = await run_in_threadpool(store.raw_manifest, ref)
    except NotFound as exc:
        raise RegistryError(404, "MANIFEST_UNKNOWN", exc.detail) from exc
    headers = {"Docker-Content-Digest": raw.digest, "Content-Length": str(len(raw.data))}
    headers["ETag"] = f'"{raw.digest}"'
    if request.method == "HEAD":
        return Response(headers=headers, media_type=raw.media_type)
    return Response(raw.data, headers=headers, media_type=raw.media_type)


async def _put_manifest(request: Request, store: ImageStore) -> Response:
    ref = _reference(request)
    data = await _read_body(request, MAX_MANIFEST_BYTES)
    digest = digest_bytes(data)
    if ref.digest is not None and ref.digest != digest:
        raise RegistryError(
            400, "DIGEST_INVALID", f"the manifest hashes to {digest}, not {ref.digest}"
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    media_type = content_type if content_type in MANIFEST_TYPES else None
    try:
        await run_in_threadpool(store.put_manifest, ref.name, ref.tag, data, media_type)
    except MissingBlobs as exc:
        raise RegistryError(400, "MANIFEST_BLOB_UNKNOWN", exc.detail) from exc
    except InvalidInput as exc:
        raise RegistryError(400, "MANIFEST_INVALID", exc.detail) from exc
    location = f"/v2/{ref.name}/manifests/{digest}"
    return Response(
        status_code=201, headers={"Location": location, "Docker-Content-Digest": digest}
    )


async def _delete_manifest(request: Request, store: ImageStore) -> Response:
    ref = _reference(request)
    try:
        await run_in_threadpool(store.remove, ref)
    except NotFound as exc:
        raise RegistryError(404, "MANIFEST_UNKNOWN", exc.detail) from exc
    return Response(status_code=202)


async def _start_upload(request: Request, store: ImageStore) -> Response:
    name = _name(request)
    mount = request.query_params.get("mount")
    if mount is not None and is_digest(mount) and store.has_blob(mount):
        return _blob_created(name, mount)  # one content store serves every repository
    digest = request.query_params.get("digest")
    if digest is not None and not is_digest(digest):
        raise RegistryError(400, "DIGEST_INVALID", "digest must be sha256:<64 lowercase hex>")
    uploads = Uploads(store.uploads_dir)
    upload_id = await run_in_threadpool(uploads.start)
    if digest is None:
        return _upload_accepted(name, upload_id, 0)
    await uploads.append(upload_id, request)  # monolithic: POST ?digest= with the body
    return await _commit_upload(store, uploads, name, upload_id, digest)


async def _upload_status(request: Request, store: ImageStore) -> Response:
    upload_id = request.path_params["upload_id"]
    size = Uploads(store.uploads_dir).size(upload_id)
    response = _upload_accepted(_name(request), upload_id, size)
    response.status_code = 204
    return response


async def _patch_upload(request: Request, store: ImageStore) -> Response:
    name, upload_id = _name(request), request.path_params["upload_id"]
    start = None
    if content_range := request.headers.get("content-range"):
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None:
            raise RegistryError(400, "BLOB_UPLOAD_INVALID", "Content-Range must be '<start>-<end>'")
        start = int(match.group(1))
    uploads = Uploads(store.uploads_dir)
    size = await uploads.append(upload_id, request, start)
    return _upload_accepted(name, upload_id, size)


async def _finish_upload(request: Request, store: ImageStore) -> Response:
    name, upload_id = _name(request), request.path_params["upload_id"]
    digest = request.query_params.get("digest")
    uploads = Uploads(store.uploads_dir)
    uploads.path(upload_id)
    if digest is None or not is_digest(digest):
        raise RegistryError(
            400, "DIGEST_INVALID", "finish the upload with ?digest=sha256:<64 lowercase hex>"
        )
    await uploads.append(upload_id, request)
    return await _commit_upload(store, uploads, name, upload_id, digest)


async def _commit_upload(
    store: ImageStore, uploads: Uploads, name: str, upload_id: str, digest: str
) -> Response:
    try:
        await run_in_threadpool(store.put_blob_file, uploads.path(upload_id), digest)
    except DigestMismatch as exc:
        raise RegistryError(400, "DIGEST_INVALID", exc.detail) from exc
    return _blob_created(name, digest)


async def _cancel_upload(request: Request, store: ImageStore) -> Response:
    Uploads(store.uploads_dir).cancel(request.path_params["upload_id"])
    return Response(status_code=204)


async def _get_blob(request: Request, store: ImageStore) -> Response:
    _name(request)
    digest = request.path_params["digest"]
    if not is_digest(digest):
        raise RegistryError(400, "DIGEST_INVALID", "blob digests are sha256:<64 lowercase hex>")
    try:
        stream = await run_in_threadpool(store.open_blob, digest)
    except NotFound as exc:
        raise RegistryError(404, "BLOB_UNKNOWN", exc.detail) from exc
    size = os.fstat(stream.fileno()).st_size
    headers = {"Docker-Content-Digest": digest, "Content-Length": str(size)}
    headers["ETag"] = f'"{digest}"'
    if request.method == "HEAD":
        stream.close()
        return Response(headers=headers, media_type=OCTET_STREAM)

    def chunks() -> Iterator[bytes]:
        try:
            while chunk := stream.read(CHUNK):
                yield chunk
        finally:
            stream.close()

    return StreamingResponse(chunks(), headers=headers, media_type=OCTET_STREAM)


async def _unsupported(request: Request, _store: ImageStore) -> Response:
    raise RegistryError(
        405, "UNSUPPORTED", "blobs are not deleted one by one here; untag images and run gc"
    )


async def _tags(request: Request, store: ImageStore) -> Response:
    name = _name(request)
    try:
        tags = await run_in_threadpool(store.tags, name)
    except NotFound as exc:
        raise RegistryError(404, "NAME_UNKNOWN", exc.detail) from exc
    last = request.query_params.get("last")
    if last:
        tags = [t for t in tags if t > last]
    headers: dict[str, str] = {}
    if (n := request.query_params.get("n")) is not None:
        if not n.isdigit() or len(n) > 6:
            raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "n must be a number 0-999999")
        if len(tags) > int(n):
            tags = tags[: int(n)]
            if tags:
                headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
    body: dict[str, Any] = {"name": name, "tags": tags}
    return JSONResponse(body, headers=headers)


def _name(request: Request) -> str:
    name = request.path_params["name"]
    try:
        return validate_name(name)
    except InvalidInput as exc:
        raise RegistryError(400, "NAME_INVALID", exc.detail) from exc


def _reference(request: Request) -> Reference:
    name, reference = _name(request), request.path_params["reference"]
    if ":" in reference:
        if not is_digest(reference):
            raise RegistryError(
                400, "DIGEST_INVALID", "manifest digests are sha256:<64 lowercase hex>"
            )
        return Reference(name, None, reference)
    try:
        return Reference(name, validate_tag(reference), None)
    except FleetvisorError as exc:
        raise RegistryError(400, "MANIFEST_INVALID", exc.detail) from exc


async def _read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RegistryError(413, "SIZE_INVALID", f"manifests are limited to {limit} bytes")
    return bytes(body)


def _range(size: int) -> str:
    return f"0-{max(size - 1, 0)}"


def _upload_accepted(name: str, upload_id: str, size: int) -> Response:
    headers = {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Range": _range(size),
        "Docker-Upload-UUID": upload_id,
    }
    return Response(status_code=202, headers=headers)


def _blob_created(name: str, digest: str) -> Response:
    headers = {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}
    return Response(status_code=201, headers=headers)
