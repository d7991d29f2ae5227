"""A small OCI distribution client: pull into and push from an ImageStore, over httpx.

Pull fetches the manifest, then only the blobs the local store lacks, each streamed to
disk and verified against its digest and size; the manifest is indexed last, so an
interrupted pull leaves nothing half-visible. Push uploads only the blobs the registry
lacks (HEAD first), then the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from fleetvisor.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from fleetvisor.images.digest import CHUNK, DigestMismatch, digest_bytes, is_digest
from fleetvisor.images.store import (
    FOREIGN_LAYER_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCTET_STREAM,
    ImageStore,
    RawManifest,
    Reference,
    parse_manifest_document,
    pick_platform,
    referenced,
)

Progress = Callable[[int], None]
ACCEPT = ", ".join(sorted(MANIFEST_TYPES))


class RegistryUnreachable(Exception):
    """The registry could not be reached (connection refused, timeout, DNS)."""


class RegistryFailure(Exception):
    """The registry answered with a server error or broke the protocol: its bug, not ours."""


@dataclass(frozen=True)
class Transfer:
    """What a pull or push moved: the manifest digest, and blob bytes actually sent."""

    digest: str
    bytes_transferred: int
    blobs_transferred: int
    blobs_skipped: int


class RegistryClient:
    """Talks to one registry (`base_url`, e.g. http://127.0.0.1:8470) with one bearer token."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- queries ------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise unless the registry answers `/v2/` for our token."""
        self._check(self._request("GET", "/v2/"), "the registry API (/v2/)")

    def tags(self, name: str) -> list[str]:
        response = self._request("GET", f"/v2/{name}/tags/list")
        self._check(response, f"repository {name}")
        tags = response.json().get("tags") or []
        return [t for t in tags if isinstance(t, str)]

    # ---- pull ---------------------------------------------------------------------------

    def pull(
        self,
        ref: str,
        store: ImageStore,
        *,
        local_ref: str | None = None,
        progress: Progress | None = None,
    ) -> Transfer:
        """Fetch `ref` (`name:tag` or `name@sha256:…` on this registry) into `store`.

        An image index is followed to its linux/amd64 image, which is what gets stored
        (under the same tag). Stored as `local_ref` when given, else as `ref`.
        """
        remote = Reference.parse(ref)
        local = Reference.parse(local_ref) if local_ref else remote
        raw = self._fetch_manifest(remote.name, remote.digest or str(remote.tag))
        kind, doc = parse_manifest_document(raw.data, raw.media_type)
        if kind in INDEX_TYPES:
            child = pick_platform(referenced(doc, kind))
            raw = self._fetch_manifest(remote.name, child.digest)
            kind, doc = parse_manifest_document(raw.data, raw.media_type)
            if kind in INDEX_TYPES:
                raise InvalidInput(f"{ref}: an image index inside an index is not supported")
        moved = skipped = sent = 0
        for blob in referenced(doc, kind):
            if blob.media_type in FOREIGN_LAYER_TYPES:
                continue
            if store.has_blob(blob.digest) and store.blob_size(blob.digest) == blob.size:
                skipped += 1
                continue
            sent += self._fetch_blob(remote.name, blob.digest, blob.size, store, progress)
            moved += 1
        tag = local.tag if local.digest is None else None
        store.put_manifest(local.name, tag, raw.data, kind)
        return Transfer(raw.digest, sent, moved, skipped)

    def _fetch_manifest(self, name: str, reference: str) -> RawManifest:
        what = f"manifest {name}:{reference}" if ":" not in reference else f"{name}@{reference}"
        with self._stream("GET", f"/v2/{name}/manifests/{reference}", {"Accept": ACCEPT}) as r:
            self._check(r, what)
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    raise RegistryFailure(f"{what} is larger than {MAX_MANIFEST_BYTES} bytes")
            content_type = r.headers.get("content-type", "").split(";")[0].strip()
            claimed = r.headers.get("docker-content-digest")
        digest = digest_bytes(bytes(data))
        expected = reference if is_digest(reference) else claimed
        if expected and is_digest(expected) and expected != digest:
            raise DigestMismatch(
                f"{what} hashes to {digest}, not {expected}; the registry or the network "
                "corrupted it: pull again"
            )
        media_type = content_type if content_type in MANIFEST_TYPES else None
        return RawManifest(digest, media_type or "", bytes(data))

    def _fetch_blob(
        self, name: str, digest: str, size: int, store: ImageStore, progress: Progress | None
    ) -> int:
        with self._stream("GET", f"/v2/{name}/blobs/{digest}") as response:
            self._check(response, f"blob {digest} of {name}")
            store.put_blob(
                _counted(response.iter_bytes(CHUNK), progress), digest, expected_size=size
            )
        return size

    # ---- push ---------------------------------------------------------------------------

    def push(
        self,
        store: ImageStore,
        ref: str,
        *,
        remote_ref: str | None = None,
        progress: Progress | None = None,
    ) -> Transfer:
        """Upload `ref` from `store` (as `remote_ref` when given): missing blobs, then manifest."""
        local = Reference.parse(ref)
        remote = Reference.parse(remote_ref) if remote_ref else local
        raw = store.raw_manifest(local)
        totals = [0, 0, 0]  # bytes, blobs sent, blobs skipped
        if raw.media_type in INDEX_TYPES:
            _kind, doc = parse_manifest_document(raw.data, raw.media_type)
            for child in referenced(doc, raw.media_type):
                child_raw = RawManifest(
                    child.digest, child.media_type, store.read_blob(child.digest)
                )
                self._push_image(store, remote.name, child_raw, child.digest, totals, progress)
        reference = remote.digest or str(remote.tag)
        self._push_image(store, remote.name, raw, reference, totals, progress)
        return Transfer(raw.digest, totals[0], totals[1], totals[2])

    def _push_image(
        self,
        store: ImageStore,
        name: str,
        raw: RawManifest,
        reference: str,
        totals: list[int],
        progress: Progress | None,
    ) -> None:
        kind, doc = parse_manifest_document(raw.data, raw.media_type)
        if kind not in INDEX_TYPES:
            for blob in referenced(doc, kind):
                if blob.media_type in FOREIGN_LAYER_TYPES:
                    continue
                if self._has_blob(name, blob.digest):
                    totals[2] += 1
                    continue
                self._upload_blob(store, name, blob.digest, progress)
                totals[0] += blob.size
                totals[1] += 1
        response = self._request(
            "PUT",
            f"/v2/{name}/manifests/{reference}",
            content=raw.data,
            headers={"Content-Type": kind},
        )
        self._check(response, f"manifest {name}:{reference}")
        echoed = response.headers.get("docker-content-digest")
        if echoed and echoed != raw.digest:
            raise RegistryFailure(f"the registry stored {echoed} for manifest {raw.digest}")

    def _has_blob(self, name: str, digest: str) -> bool:
        response = self._request("HEAD", f"/v2/{name}/blobs/{digest}")
        if response.status_code == 404:
            return False
        self._check(response, f"blob {digest}")
        return True

    def _upload_blob(
        self, store: ImageStore, name: str, digest: str, progress: Progress | None
    ) -> None:
        started = self._request("POST", f"/v2/{name}/blobs/uploads/")
        self._check(started, f"an upload to {name}")
        location = started.headers.get("location")
        if started.status_code != 202 or not location:
            raise RegistryFailure(f"the registry started no upload for {name} (no Location)")
        url = self._http.base_url.join(location).copy_merge_params({"digest": digest})
        size = store.blob_size(digest)
        with store.open_blob(digest) as stream:
            chunks = _counted(iter(lambda: stream.read(CHUNK), b""), progress)
            finished = self._request(
                "PUT",
                url,
                content=chunks,
                headers={"Content-Type": OCTET_STREAM, "Content-Length": str(size)},
            )
        self._check(finished, f"blob {digest}")

    # ---- plumbing -----------------------------------------------------------------------

    def _request(self, method: str, url: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"cannot reach the registry {self.base_url}: {exc}") from exc

    @contextmanager
    def _stream(
        self, method: str, url: str, headers: dict[str, str] | None = None
    ) -> Iterator[httpx.Response]:
        """A streamed request; transport errors, also mid-body, become RegistryUnreachable."""
        try:
            with self._http.stream(method, url, headers=headers) as response:
                yield response
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"cannot reach the registry {self.base_url}: {exc}") from exc

    def _check(self, response: httpx.Response, what: str) -> None:
        """Raise the typed error a non-2xx answer means; 4xx carry the registry's message."""
        status = response.status_code
        if status < 300:
            return
        if not response.is_stream_consumed:
            response.read()
        message = _error_message(response)
        if status == 401:
            raise Unauthorized(
                f"the registry {self.base_url} refused the token for {what} ({message}); "
                "use the admin token, or a host token for pulls"
            )
        if status == 403:
            raise Forbidden(f"the registry {self.base_url} denies {what}: {message}")
        if status == 404:
            raise NotFound(f"{what} is not in the registry {self.base_url}: {message}")
        if status < 500:
            raise InvalidInput(f"the registry {self.base_url} refused {what}: {message}")
        raise RegistryFailure(f"the registry {self.base_url} failed on {what}: {status} {message}")


def _counted(chunks: Iterator[bytes], progress: Progress | None) -> Iterator[bytes]:
    for chunk in chunks:
        if progress is not None:
            progress(len(chunk))
        yield chunk


def _error_message(response: httpx.Response) -> str:
    """`CODE: message` from a distribution-spec error body, else the status line."""
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        return f"{first.get('code')}: {first.get('message')}"
    except (ValueError, AttributeError, IndexError, TypeError):
        return f"HTTP {response.status_code}"
