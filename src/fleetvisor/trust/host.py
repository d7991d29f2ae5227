"""The host's TPM for the agent's boot step: the real chip where there is one, else a swtpm
the agent starts, owns, and stops.

    open_host_tpm(state_dir)
      /dev/tpmrm0 exists      -> TpmSession("device:/dev/tpmrm0")          kind "device"
      otherwise               -> Swtpm.start(state_dir/"swtpm") + session  kind "swtpm"
    .close()                  -> session closed; the swtpm (if ours) stopped by PID

The swtpm keeps its state under `state_dir/swtpm/state`, so enrolment (EK, AK, NV)
survives agent restarts, while every start resets its PCRs like a machine reboot.
Keep the HostTpm open while the agent runs: attestation challenges need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fleetvisor.trust.swtpm import Swtpm
from fleetvisor.trust.tpm import TpmSession

DEFAULT_DEVICE = Path("/dev/tpmrm0")


@dataclass
class HostTpm:
    """An open TPM session and, for a software TPM, the process behind it."""

    session: TpmSession
    kind: str
    swtpm: Swtpm | None = None

    def close(self) -> None:
        """Close the session, then stop the swtpm this object started (by its PID)."""
        try:
            self.session.close()
        finally:
            if self.swtpm is not None:
                self.swtpm.stop()

    def __enter__(self) -> HostTpm:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_host_tpm(
    state_dir: Path,
    *,
    device: Path | None = DEFAULT_DEVICE,
    owner_auth: str | None = None,
    timeout: float = 15.0,
) -> HostTpm:
    """The real TPM at `device` if it exists (pass None to force a swtpm), else a swtpm
    started now with its state under `state_dir/swtpm`."""
    if device is not None and device.exists():
        return HostTpm(
            TpmSession(f"device:{device}", timeout=timeout, owner_auth=owner_auth), "device"
        )
    swtpm = Swtpm.start(state_dir / "swtpm")
    try:
        session = TpmSession(swtpm.tcti, timeout=timeout, owner_auth=owner_auth)
    except BaseException:
        swtpm.stop()
        raise
    return HostTpm(session, "swtpm", swtpm)
