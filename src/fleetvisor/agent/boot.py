"""The agent's measured boot step (`fleetvisor agent --measured-boot`): run before the driver
starts and before the host registers; refuse to join the fleet when the chain says no.

    open_host_tpm(tpm_dir)          /dev/tpmrm0, or a swtpm this agent starts and owns
    phases 1-2 (trust.run_stage1)   release key from NV; loader config, agent code and
                                    driver binaries measured and checked against the
                                    signed stage-1 manifest
    phase 3 (trust.run_release)     GET /v1/trust/hosts/{name}/release: the signed release
                                    the controller assigned; its files are installed at
                                    release_dir/v<version>/<component>; measured, checked,
                                    rollback refused (TPM counter)
    passed   -> MeasuredBoot kept open: the agent answers challenges with it
                (POST /v1/attestation on the agent API), then registers
    refused  -> nonce from the controller, evidence (the TPM's record of the refusal)
                + the refusal sent to POST /v1/trust/hosts/{name}/evidence, TPM closed,
                the agent exits without registering

The release files are put in place by the operator's packaging (a .deb, an image); the
controller hands out which release to run and its signed manifest, not the bytes.
The agent keeps running in this process once the chain passed: the release tree is
what a packaged deployment would exec at this point.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetvisor.client import ApiError, FleetClient
from fleetvisor.clock import Clock, RealClock
from fleetvisor.trust.attest import make_evidence
from fleetvisor.trust.boot import BootResult, ReleaseBundle, Stage1Result, measured_boot
from fleetvisor.trust.config import LoaderConfig
from fleetvisor.trust.errors import BootRefused, ManifestInvalid, TrustError
from fleetvisor.trust.host import DEFAULT_DEVICE, open_host_tpm
from fleetvisor.trust.manifest import SignedManifest
from fleetvisor.trust.measure import EventLog
from fleetvisor.trust.tpm import Tpm

log = logging.getLogger("fleetvisor.agent.boot")

DEFAULT_LOADER_CONFIG = Path("/etc/fleetvisor/loader.json")
FETCH_ATTEMPTS = 8


@dataclass(frozen=True)
class BootOptions:
    """Where the boot step finds its policy, its TPM and the installed releases."""

    loader_config: Path = DEFAULT_LOADER_CONFIG
    tpm_dir: Path | None = None  # swtpm state [default: the agent's state dir]
    tpm_device: Path | None = DEFAULT_DEVICE  # None: always a swtpm
    release_dir: Path | None = None  # [default: <agent state dir>/releases]


class BootStepFailed(Exception):
    """The boot step could not run (no TPM, unreadable config, controller unreachable)."""


class MeasuredBoot:
    """A boot's outcome with the TPM that recorded it, so challenges can be answered."""

    def __init__(
        self,
        tpm: Tpm,
        config: LoaderConfig,
        outcome: BootResult | BootRefused,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.tpm = tpm
        self.config = config
        self.outcome = outcome
        self._close = close

    @property
    def refused(self) -> BootRefused | None:
        return self.outcome if isinstance(self.outcome, BootRefused) else None

    @property
    def release_version(self) -> int | None:
        if isinstance(self.outcome, BootResult) and self.outcome.release is not None:
            return self.outcome.release.manifest.version
        return None

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        """The answer to a challenge: a TPM quote over `nonce`, the event log, the manifests."""
        if isinstance(self.outcome, BootResult):
            events, manifests = self.outcome.log, self.outcome.manifests
        else:  # a refused boot answers truthfully with what it measured up to the refusal
            events, manifests = self.outcome.event_log or EventLog(), self.outcome.manifests
        return make_evidence(
            self.tpm,
            nonce=nonce,
            log=events,
            manifests=manifests,
            pcrs=self.config.pcrs,
            ak_handle=self.config.tpm.ak_handle,
        ).to_dict()

    async def attest(self, nonce: bytes) -> dict[str, Any]:
        """`evidence` off the event loop (tpm2_quote is a subprocess)."""
        return await asyncio.to_thread(self.evidence, nonce)

    def close(self) -> None:
        """Close the TPM session and stop the swtpm this boot started (by PID)."""
        if self._close is not None:
            self._close()
            self._close = None


def release_bundle(signed: SignedManifest, release_dir: Path) -> ReleaseBundle:
    """The release's files where the host's packaging installed them."""
    root = release_dir / f"v{signed.manifest.version}"
    return ReleaseBundle(signed, {name: root / name for name in signed.manifest.components})


def run_chain(
    tpm: Tpm,
    config: LoaderConfig,
    release: SignedManifest | None,
    release_dir: Path,
    close: Callable[[], None] | None = None,
) -> MeasuredBoot:
    """Phases 1-3 over an open TPM; a refusal is kept in the result, not raised."""

    def obtain(_stage1: Stage1Result) -> ReleaseBundle | None:
        return release_bundle(release, release_dir) if release else None

    try:
        outcome: BootResult | BootRefused = measured_boot(tpm, config, obtain)
    except BootRefused as refused:
        outcome = refused
    return MeasuredBoot(tpm, config, outcome, close)


async def boot_host(
    options: BootOptions,
    *,
    name: str,
    controller: FleetClient,
    state_dir: Path,
    clock: Clock | None = None,
) -> MeasuredBoot:
    """The whole step: TPM, assigned release, chain. A refused boot is reported to the
    controller (when reachable) and returned; the caller must not register then."""
    clock = clock or RealClock()
    release = await _assigned_release(controller, name, clock)
    try:
        config = LoaderConfig.load(options.loader_config)
    except TrustError as exc:
        raise BootStepFailed(str(exc)) from None
    tpm_dir = options.tpm_dir or state_dir
    try:
        host_tpm = await asyncio.to_thread(open_host_tpm, tpm_dir, device=options.tpm_device)
    except TrustError as exc:
        raise BootStepFailed(f"no TPM for the measured boot: {exc}") from None
    try:
        boot = await asyncio.to_thread(
            run_chain,
            host_tpm.session,
            config,
            release,
            options.release_dir or state_dir / "releases",
            host_tpm.close,
        )
    except BaseException:
        host_tpm.close()
        raise
    if boot.refused is not None:
        log.error("%s", boot.refused)
        await asyncio.to_thread(report_refusal, controller, name, boot)
    elif isinstance(boot.outcome, BootResult):
        timings = ", ".join(f"{k} {v:.3f}s" for k, v in boot.outcome.timings.items())
        log.info(
            "measured boot passed on a %s TPM (release %s; %s)",
            host_tpm.kind,
            boot.release_version if boot.release_version is not None else "none",
            timings,
        )
    return boot


def report_refusal(controller: FleetClient, name: str, boot: MeasuredBoot) -> dict[str, Any] | None:
    """Send the refusal with TPM evidence for a controller nonce; the controller's verdict,
    or None when it could not be told (it then learns at the host's next registration)."""
    refused = boot.refused
    assert refused is not None
    try:
        nonce = controller.attestation_nonce(name)
        evidence = boot.evidence(bytes.fromhex(nonce))
        verdict = controller.submit_evidence(name, nonce, evidence, refused.as_event())
    except (ApiError, TrustError) as exc:
        log.warning("could not report the refused boot to the controller: %s", exc)
        return None
    log.error("controller verdict: %s (%s)", verdict.get("state"), verdict.get("reason"))
    return verdict


async def _assigned_release(
    controller: FleetClient, name: str, clock: Clock
) -> SignedManifest | None:
    """The signed release the controller assigns to this host; None when none is published.
    Retries while the controller is unreachable (it may be starting too)."""
    delay = 0.2
    for attempt in range(FETCH_ATTEMPTS):
        try:
            answer: Mapping[str, Any] = await asyncio.to_thread(controller.assigned_release, name)
            return SignedManifest.from_dict(answer["signed"])
        except ApiError as exc:
            if exc.status == 404:
                log.warning("no release published: booting without phase 3 (%s)", exc.detail)
                return None
            if 400 <= exc.status < 500 or attempt == FETCH_ATTEMPTS - 1:
                raise BootStepFailed(f"cannot obtain this host's release: {exc}") from None
        except (KeyError, TypeError, ManifestInvalid) as exc:
            raise BootStepFailed(f"the controller sent a malformed release: {exc}") from None
        await clock.sleep(delay)
        delay = min(delay * 2, 5.0)
    return None


def boot_or_exit(
    options: BootOptions,
    *,
    name: str,
    controller_url: str,
    token: str,
    state_dir: Path,
) -> MeasuredBoot:
    """`boot_host` for `run_agent`: the passed boot (its TPM closed at exit), or SystemExit
    with the precise refusal, so a host whose chain does not match never registers."""
    with FleetClient(controller_url, token) as controller:
        try:
            boot = asyncio.run(
                boot_host(options, name=name, controller=controller, state_dir=state_dir)
            )
        except BootStepFailed as exc:
            raise SystemExit(f"agent {name}: measured boot could not run: {exc}") from None
    atexit.register(boot.close)  # stop the swtpm in order, however the agent ends
    if boot.refused is not None:
        boot.close()
        raise SystemExit(f"agent {name}: {boot.refused}; the host stays out of the fleet")
    return boot
