"""Migration on a host: pack an instance for another host, or unpack and run one from another.

    source  send(id, m, live)    live + checkpoint capability: CRIU checkpoint (the
                                 process stops, its memory is in checkpoint/)
                                 otherwise: stop
                                 then the writable state (driver export_state: the
                                 overlay upper dir as a tar, a VM disk overlay) ->
                                 `writable`, meta.json last
            package(m)           the staging dir as one tar stream (the target pulls it)
            abort(id, m)         the migration failed elsewhere: run it here again
                                 (restore the checkpoint, or start)
    target  receive(spec, m, source, live, start)
                                 pull the package -> create (image layers, network) ->
                                 writable layer in -> restore the checkpoint, or start
    both    forget(m)            remove the staging dir

Every step is idempotent, so the controller can repeat a call after its own crash or a
lost answer: `send` of a packed instance returns the same meta.json, `receive` of an
instance that already runs here returns its report, `abort` of a running instance
leaves it alone. A staging dir is complete only once meta.json exists (written last).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fleetvisor.drivers.base import Capability, UnknownInstance
from fleetvisor.errors import Conflict, DriverError, InvalidInput, NotFound, Unauthorized
from fleetvisor.model.specs import InstanceReport, InstanceSpec

if TYPE_CHECKING:
    from fleetvisor.agent.core import Agent

log = logging.getLogger("fleetvisor.agent.migration")
CHUNK = 1 << 20
WRITABLE = "writable"  # the instance's own files, as the driver's export_state writes them
PAGE_SERVER = "criu-page-server:"  # a migration target's page server, "ADDRESS:PORT" after
PAGE_SERVER_WAIT = 60.0
MIGRATION_ID = __import__("re").compile(r"^[a-z0-9-]{1,64}$")


class PackageSource(Protocol):
    """Where a target pulls a package from: the source agent, over HTTP or in-process."""

    def migration_package(self, migration: str) -> AsyncIterator[bytes]: ...


class HostMigrations:
    def __init__(self, agent: Agent, state_dir: Path | None) -> None:
        self.agent = agent
        self._root = state_dir / "migrations" if state_dir is not None else None
        self._page_servers: dict[str, asyncio.subprocess.Process] = {}

    @property
    def root(self) -> Path:
        if self._root is None:
            raise Conflict("this agent has no state dir to stage a migration in")
        return self._root

    def _dir(self, migration: str, side: str) -> Path:
        if not MIGRATION_ID.match(migration):
            raise InvalidInput(f"migration id {migration!r} must be 1-64 of [a-z0-9-]")
        return self.root / side / migration

    # -- source ------------------------------------------------------------------------

    async def send(
        self, instance_id: str, migration: str, live: bool, uri: str | None = None
    ) -> dict[str, Any]:
        """Stop the instance into a package: a checkpoint (live) or its files (cold).
        With `uri` (drivers that migrate live themselves, e.g. QEMU), its state streams to
        the target listening there instead, and the package holds only meta.json."""
        staging = self._dir(migration, "out")
        meta_path = staging / "meta.json"
        if meta_path.exists():  # packed already: a repeated call
            return dict(json.loads(meta_path.read_text()))
        driver = self.agent.driver
        reports = {r.id: r for r in await driver.list()}
        if instance_id not in reports:
            raise NotFound(f"this host has no instance {instance_id}")
        if self.agent.scaling.parent_of(instance_id) is not None:
            raise Conflict("a sibling carved by local scaling does not migrate on its own")
        # Siblings fold back first: the instance leaves whole, its policy travels in its spec.
        await self.agent.scaling.quiesce(instance_id, "the instance migrates")
        can_dump = live and Capability.CHECKPOINT in driver.capabilities()
        was_running = reports[instance_id].state == "running"
        # A dump an earlier call made before this agent died stands (the driver checks
        # that CRIU finished it): the process is gone, but it was running.
        resumed = can_dump and not was_running and (staging / "checkpoint").is_dir()
        was_running = was_running or resumed
        live = (can_dump or (bool(uri) and live)) and was_running
        if not resumed:
            await asyncio.to_thread(_fresh_dir, staging)
        began = time.monotonic()
        self.agent.health.expect_stopped(instance_id)
        info: dict[str, Any] = {}
        streamed = (
            bool(uri)
            and live
            and not str(uri).startswith(PAGE_SERVER)
            and Capability.LIVE_MIGRATE in driver.capabilities()
        )
        async with self.agent.lock(instance_id):
            if streamed:
                info = await driver.migrate_out(instance_id, uri)  # type: ignore[attr-defined]
            elif live:
                pages = uri[len(PAGE_SERVER) :] if uri and uri.startswith(PAGE_SERVER) else None
                info = await driver.checkpoint(  # type: ignore[attr-defined]
                    instance_id, staging / "checkpoint", page_server=pages
                )
            elif was_running:
                await driver.stop(instance_id)
            stopped = time.monotonic()
            if hasattr(driver, "export_state") and not streamed:
                await driver.export_state(instance_id, staging / WRITABLE)
        meta = {
            "instance": instance_id,
            # The target pulls the package with this secret, not with the controller's token.
            "token": secrets.token_urlsafe(24),
            "live": live,
            "streamed": streamed,
            "was_running": was_running,
            "dump_s": round(stopped - began, 4),
            "pack_s": round(time.monotonic() - began, 4),
            "bytes": await asyncio.to_thread(_size, staging),
            **{f"driver_{k}": v for k, v in info.items() if isinstance(v, int | float)},
        }
        tmp = staging / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(meta_path)
        return meta

    def check_token(self, migration: str, token: str) -> None:
        meta = _read_meta(self._dir(migration, "out"))
        if meta is None:
            raise NotFound(f"no packed migration {migration} on this host")
        if not hmac.compare_digest(str(meta.get("token", "")).encode(), token.encode()):
            raise Unauthorized("this migration's package needs the token its source gave")

    async def package(self, migration: str) -> AsyncIterator[bytes]:
        """The complete staging dir as an uncompressed tar stream."""
        staging = self._dir(migration, "out")
        if not (staging / "meta.json").exists():
            raise NotFound(f"no packed migration {migration} on this host")
        proc = await asyncio.create_subprocess_exec(
            "tar", "-C", str(staging), "--xattrs", "--xattrs-include=*", "-cf", "-", ".",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            while chunk := await proc.stdout.read(CHUNK):
                yield chunk
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()

    async def abort(self, instance_id: str, migration: str) -> InstanceReport:
        """Run the instance here again after a migration that did not finish elsewhere."""
        staging = self._dir(migration, "out")
        driver = self.agent.driver
        reports = {r.id: r for r in await driver.list()}
        report = reports.get(instance_id)
        if report is None:
            raise NotFound(f"this host has no instance {instance_id} any more")
        meta = _read_meta(staging)
        if report.state != "running" and (meta is None or meta.get("was_running", True)):
            checkpoint = staging / "checkpoint"
            async with self.agent.lock(instance_id):
                restored = None
                if checkpoint.is_dir() and meta is not None and meta.get("live"):
                    spec = await self._spec_of(instance_id)
                    try:
                        restored = await driver.restore(spec, checkpoint, None)  # type: ignore[attr-defined]
                    except (DriverError, InvalidInput) as exc:
                        # Its pages went to the target's page server: start it afresh
                        # here, on its own files, rather than leave it stopped.
                        log.warning(
                            "%s: the checkpoint cannot come back (%s); starting it",
                            instance_id,
                            exc,
                        )
                report = restored or await driver.start(instance_id)
            self.agent.health.expect_running(instance_id)
        await self.forget(migration)
        return report

    # -- target ------------------------------------------------------------------------

    async def prepare(
        self,
        spec: InstanceSpec,
        migration: str,
        machine: dict[str, Any] | None = None,
        checkpoint: bool = False,
    ) -> tuple[InstanceReport, str | None]:
        """Before the source stops: create the instance here, not running (image layers,
        rootfs, network), so the downtime holds only the transfer and the restore.
        With `machine` (the source's description, drivers that migrate live themselves):
        start it waiting for its state, and answer where the source sends it. With
        `checkpoint`: answer the page server the source's dump sends its memory to."""
        driver = self.agent.driver
        if machine is not None and Capability.LIVE_MIGRATE in driver.capabilities():
            if self.agent.images is not None:
                await self.agent.images.prepare(spec.id, spec.image)
            address = getattr(driver, "migration_address", "127.0.0.1")
            port = _free_port(address)
            report = await driver.migrate_incoming(spec, port, machine)  # type: ignore[attr-defined]
            self.agent.watch(spec)
            return report, f"tcp:{address}:{port}"
        report = await self.agent.create(spec, start=False)
        if checkpoint and Capability.CHECKPOINT in driver.capabilities():
            return report, await self._page_server(migration)
        return report, None

    async def _page_server(self, migration: str) -> str | None:
        """A CRIU page server that takes the dump's memory pages straight into this
        migration's staging dir, so they cross once, while the dump runs."""
        from fleetvisor.drivers.runc import criu as criu_tools

        tool = criu_tools.find_criu()
        if tool is None:
            return None
        staging = self._dir(migration, "in")
        await asyncio.to_thread(_fresh_dir, staging / "checkpoint")
        address = self.agent.service_host
        port = _free_port(address)
        log_file = (staging / "page-server.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *criu_tools.page_server_argv(tool.path, staging / "checkpoint", address, port),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        finally:
            log_file.close()
        self._page_servers[migration] = proc
        return f"{PAGE_SERVER}{address}:{port}"

    async def receive(
        self, spec: InstanceSpec, migration: str, source: PackageSource, start: bool
    ) -> InstanceReport:
        """Pull the package from `source` and run the instance here from it."""
        driver = self.agent.driver
        current = {r.id: r for r in await driver.list()}.get(spec.id)
        if current is not None and current.state == "running":
            await self.forget(migration)
            return current  # done already: a repeated call
        staging = self._dir(migration, "in")
        began = time.monotonic()
        if not (staging / "meta.json").exists():
            pages = self._page_servers.get(migration) is not None
            if not pages:
                await asyncio.to_thread(_fresh_dir, staging)
            await _pull(source.migration_package(migration), staging)
        await self._page_server_done(migration)
        pulled = time.monotonic()
        meta = _read_meta(staging)
        if meta is None:
            raise DriverError(f"the package of migration {migration} arrived without meta.json")
        if current is None:  # not prepared beforehand (or lost since): create it now
            await self.agent.create(spec, start=False)
        upper = staging / WRITABLE
        files = upper if upper.exists() and hasattr(driver, "import_state") else None
        async with self.agent.lock(spec.id):
            if meta.get("streamed"):
                report = await driver.wait_incoming(spec.id)  # type: ignore[attr-defined]
            elif meta.get("live") and start:
                # The writable layer goes in as part of the restore (one remount).
                report = await driver.restore(spec, staging / "checkpoint", files)  # type: ignore[attr-defined]
            else:
                if files is not None:
                    await driver.import_state(spec.id, files)  # type: ignore[attr-defined]
                if start:  # the fleet wants it running, whatever it was at the source
                    report = await driver.start(spec.id)
                else:
                    report = {r.id: r for r in await driver.list()}[spec.id]
        if report.state == "running":
            self.agent.health.expect_running(spec.id)
        log.info(
            "migration %s: %s pulled in %.3fs, running after %.3fs",
            migration, spec.name, pulled - began, time.monotonic() - began,
        )  # fmt: skip
        # The staging dir goes with the controller's clean-up (forget), after the answer:
        # removing 100 MB here would only lengthen the downtime.
        return report

    async def _page_server_done(self, migration: str) -> None:
        proc = self._page_servers.pop(migration, None)
        if proc is None:
            return
        try:
            code = await asyncio.wait_for(proc.wait(), PAGE_SERVER_WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DriverError(
                f"the page server of {migration} got no complete dump in {PAGE_SERVER_WAIT:.0f}s"
            ) from None
        if code != 0:
            raise DriverError(f"the page server of {migration} failed (exit {code})")

    # -- both --------------------------------------------------------------------------

    async def forget(self, migration: str) -> None:
        proc = self._page_servers.pop(migration, None)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._root is None:
            return
        for side in ("in", "out"):
            path = self._dir(migration, side)
            if path.exists():
                await asyncio.to_thread(shutil.rmtree, path, True)

    async def _spec_of(self, instance_id: str) -> InstanceSpec:
        spec_of = getattr(self.agent.driver, "spec_of", None)
        if spec_of is None:
            raise DriverError(f"the {self.agent.driver.kind} driver cannot restore a checkpoint")
        try:
            spec: InstanceSpec = await spec_of(instance_id)
        except UnknownInstance:
            raise NotFound(f"this host has no instance {instance_id}") from None
        return spec


async def _pull(stream: AsyncIterator[bytes], dest: Path) -> None:
    """Unpack a tar stream into dest with GNU tar (keeps whiteouts and overlay xattrs)."""
    proc = await asyncio.create_subprocess_exec(
        "tar", "-C", str(dest), "--xattrs", "--xattrs-include=*", "-xf", "-",
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    try:
        async for chunk in stream:
            proc.stdin.write(chunk)
            await proc.stdin.drain()
        proc.stdin.close()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    error = await proc.stderr.read()
    if await proc.wait() != 0:
        raise DriverError(f"unpacking the migration package failed: {error.decode()[-500:]}")


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _read_meta(staging: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((staging / "meta.json").read_text()))
    except (FileNotFoundError, ValueError):
        return None


def _free_port(address: str) -> int:
    """A TCP port free on `address` now (the driver's listener binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])
