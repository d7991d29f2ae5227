"""`fleetvisor host enroll|attest|attestation` and `fleetvisor release keygen|sign|publish|ls`:
measured boot and attestation for operators (see src/fleetvisor/trust/README.md).

    release keygen --out release.key         Ed25519 signing key + release.pub (once)
    release sign --stage stage1 ...          the manifest a host's loader checks (installed
                                             on the host at the loader config's path)
    release sign --stage release ...         a release every host boots in phase 3
    release publish MANIFEST                 roll it out: hosts boot it at their next start
    host enroll NAME (on the host, as root)  TPM keys + NV release key, record -> controller
    host attest NAME / host attestation NAME challenge now / show the last verdict
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetvisor.cli.output import console, emit_json, fail, styled, table

host_app = typer.Typer(
    help="One host's measured boot: enroll its TPM, challenge it, show its attestation.",
    no_args_is_help=True,
)
release_app = typer.Typer(
    help="Signed releases of the host software: keygen, sign, publish, ls.",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
PublicKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        exists=True,
        dir_okay=False,
        help="The release public key (release.pub); the controller adopts it the first time.",
    ),
]

# Options of `fleetvisor agent` (registered in cli/main.py).
MeasuredBootOpt = Annotated[
    bool,
    typer.Option(
        "--measured-boot",
        help="Run the measured boot (TPM; a swtpm where there is no /dev/tpmrm0) before "
        "registering; a mismatch keeps the host out of the fleet.",
    ),
]
LoaderConfigOpt = Annotated[
    Path,
    typer.Option(help="Measured boot: the loader configuration (what to measure)."),
]
TpmDirOpt = Annotated[
    Path | None,
    typer.Option(help="Measured boot: the swtpm state directory (default: the state dir)."),
]
SwtpmOpt = Annotated[
    bool,
    typer.Option("--swtpm", help="Measured boot: use a swtpm even where /dev/tpmrm0 exists."),
]
ReleaseDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Measured boot: installed releases, as DIR/v<version>/<component> "
        "(default: <state dir>/releases)."
    ),
]


def _ctx():  # type: ignore[no-untyped-def]
    from fleetvisor.cli.main import ctx

    return ctx


def boot_options(
    measured_boot: bool,
    loader_config: Path,
    tpm_dir: Path | None,
    swtpm: bool,
    release_dir: Path | None,
) -> Any:
    """The agent's BootOptions, or None without --measured-boot."""
    if not measured_boot:
        return None
    from fleetvisor.agent.boot import BootOptions
    from fleetvisor.trust.host import DEFAULT_DEVICE

    return BootOptions(
        loader_config=loader_config,
        tpm_dir=tpm_dir,
        tpm_device=None if swtpm else DEFAULT_DEVICE,
        release_dir=release_dir,
    )


# -- host ------------------------------------------------------------------------------------


@host_app.command("enroll")
def enroll(
    name: Annotated[str, typer.Argument(help="The host's name in the fleet (its agent's --name).")],
    public_key: Annotated[
        Path,
        typer.Option(
            "--public-key", exists=True, dir_okay=False, help="release.pub to lock in NV."
        ),
    ],
    tpm_dir: Annotated[
        Path | None,
        typer.Option(
            help="swtpm state directory: the agent's --tpm-dir (default: the agent's state dir, "
            "~/.fleetvisor/agents/NAME)."
        ),
    ] = None,
    swtpm: SwtpmOpt = False,
    key_file: Annotated[
        Path | None,
        typer.Option(
            help="Also install the release key here (the loader config's release_public_key_file)."
        ),
    ] = None,
    owner_auth: Annotated[
        str | None,
        typer.Option(
            envvar="FLEETVISOR_TPM_OWNER_AUTH",
            help="Set this TPM owner authorization last (real TPMs; keep it offline).",
        ),
    ] = None,
    record_out: Annotated[
        Path | None, typer.Option(help="Also write the enrolment record (JSON) here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Enroll this machine's TPM for host NAME, once, as root on the host: create its
    endorsement and attestation keys, lock the release public key in TPM NV storage, set up
    the anti-rollback counter, and register the attestation key with the controller."""
    from fleetvisor.client.client import default_state_dir
    from fleetvisor.trust.enrol import enrol_host
    from fleetvisor.trust.errors import TrustError
    from fleetvisor.trust.host import DEFAULT_DEVICE, open_host_tpm
    from fleetvisor.trust.manifest import load_public_key, public_key_pem

    client = _ctx().client()
    try:
        key = load_public_key(public_key.read_bytes())
        state = tpm_dir or (_ctx().state_dir or default_state_dir()) / "agents" / name
        with open_host_tpm(state, device=None if swtpm else DEFAULT_DEVICE) as tpm:
            record = enrol_host(tpm.session, key, tpm_kind=tpm.kind, new_owner_auth=owner_auth)
    except (TrustError, OSError) as exc:
        fail(f"enrolment of {name} failed: {exc}")
        raise
    if key_file is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(public_key_pem(key))
    if record_out is not None:
        record_out.write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
    answer = client.enrol_host(name, record.to_dict(), public_key_pem(key))
    if as_json:
        emit_json(answer)
        return
    console.print(
        f"host {name} enrolled: attestation key {answer['ak_fingerprint']} "
        f"({answer['tpm_kind']}), release key {answer['release_key_id']}"
    )
    console.print("  start its agent with --measured-boot; it is attested when it registers")


@host_app.command("attest")
def attest(name: str, as_json: JsonOpt = False) -> None:
    """Challenge host NAME now with a fresh nonce and show the verdict."""
    verdict = _ctx().client().attest_host(name)
    if as_json:
        emit_json(verdict)
        return
    _print_verdict(verdict)


@host_app.command("attestation")
def attestation(name: str, as_json: JsonOpt = False) -> None:
    """Show host NAME's attestation state, its last verdict and its releases."""
    status = _ctx().client().host_attestation(name)
    if as_json:
        emit_json(status)
        return
    console.print(
        f"[bold]{name}[/bold]  {styled(status['state'])}  enrolled: "
        f"{'yes' if status['enrolled'] else 'no'}  registered: "
        f"{'yes' if status['registered'] else 'no'}"
    )
    console.print(f"  attestation key   {status['ak_fingerprint'] or '-'}")
    console.print(
        f"  release           booted {status['booted_release'] or '-'}, newest published "
        f"{status['assigned_release'] or '-'}, highest attested {status['min_release_version']}"
    )
    _print_verdict({**status.get("verdict", {}), "state": status["state"]})


def _print_verdict(verdict: dict[str, Any]) -> None:
    console.print(
        f"  verdict           {styled(verdict.get('state', 'unknown'))} "
        f"({verdict.get('reason', '-')}): {verdict.get('message', '')}"
    )
    findings = verdict.get("findings", [])
    if findings:
        table(
            ["FINDING", "COMPONENT", "EXPECTED", "MEASURED"],
            [(f["code"], f["component"], f["expected"], f["measured"]) for f in findings],
        )


# -- release ---------------------------------------------------------------------------------


@release_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option(help="Private key file (PEM, mode 0600).")] = Path(
        "release.key"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Create a release signing key (Ed25519): OUT and OUT with .pub (the public half that
    hosts lock in their TPM and the controller verifies with). Keep OUT offline."""
    from fleetvisor.trust.manifest import (
        generate_signing_key,
        key_id,
        private_key_pem,
        public_key_pem,
    )

    if out.exists():
        fail(f"{out} exists; remove it or pass another --out (a new key means re-enrolling hosts)")
    key = generate_signing_key()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))
    public = out.with_suffix(".pub")
    public.write_text(public_key_pem(key.public_key()))
    result = {
        "private_key": str(out),
        "public_key": str(public),
        "key_id": key_id(key.public_key()),
    }
    if as_json:
        emit_json(result)
    else:
        console.print(f"release key {result['key_id']}: {out} (private), {public} (public)")


@release_app.command("sign")
def sign(
    key: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="The release private key (PEM).")
    ],
    version: Annotated[
        int, typer.Option(min=0, help="Release sequence number: only ever grows (anti-rollback).")
    ],
    stage: Annotated[
        str, typer.Option(help="release (phase 3, published) or stage1 (installed on hosts).")
    ] = "release",
    component: Annotated[
        list[str] | None,
        typer.Option(
            help="release: NAME=PATH of a file or tree (repeat), as installed under "
            "<release dir>/v<version>/NAME on hosts."
        ),
    ] = None,
    loader_config: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="stage1: list what this loader config measures."
        ),
    ] = None,
    label: Annotated[str, typer.Option(help="A name for people, e.g. 0.2.0.")] = "",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write it (default: stage1: the config's stage1_manifest; "
            "release: release-v<version>.json)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a manifest: the sha256 of every component, a version and a stage, with the
    release key. Digests are taken from the files as they are here, now."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fleetvisor.trust.config import LoaderConfig
    from fleetvisor.trust.encoding import sha256_digest
    from fleetvisor.trust.errors import TrustError
    from fleetvisor.trust.manifest import Manifest, sign_manifest, write_signed_manifest
    from fleetvisor.trust.measure import digest_path

    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        fail(f"{key} is not an unencrypted PEM private key: {exc}")
        raise
    if not isinstance(private, Ed25519PrivateKey):
        fail(f"{key} is not an Ed25519 key; create one with `fleetvisor release keygen`")
        raise SystemExit(1)
    components: dict[str, str] = {}
    try:
        if stage == "stage1":
            if loader_config is None:
                fail("--stage stage1 needs --loader-config: the manifest lists what it measures")
                raise SystemExit(1)
            config = LoaderConfig.load(loader_config)
            components["loader-config"] = sha256_digest(config.source)
            for name, path in config.measured_paths():
                components[name] = digest_path(path)
            target = out or config.stage1_manifest
        elif stage == "release":
            for item in component or []:
                name, sep, where = item.partition("=")
                if not sep or not name or not where:
                    fail(f"--component {item!r} must look like NAME=PATH")
                components[name] = digest_path(Path(where))
            if not components:
                fail("a release needs at least one --component NAME=PATH")
            target = out or Path(f"release-v{version}.json")
        else:
            fail(f"--stage must be release or stage1, not {stage!r}")
            raise SystemExit(1)
        signed = sign_manifest(Manifest(stage, version, label, components), private)
        write_signed_manifest(target, signed)
    except (TrustError, OSError) as exc:
        fail(f"cannot sign: {exc}")
        raise
    if as_json:
        emit_json({"path": str(target), "digest": signed.digest(), **signed.to_dict()})
        return
    console.print(f"{stage} manifest version {version} signed: {target} ({signed.digest()})")
    table(["COMPONENT", "DIGEST"], sorted(components.items()))


@release_app.command("publish")
def publish(
    manifest: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A signed release manifest.")
    ],
    public_key: PublicKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a signed release: every host is assigned it and boots it at its next start
    (restart their agents to roll it out). Versions only grow."""
    try:
        signed = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        fail(f"{manifest} is not a JSON manifest: {exc}")
        raise
    pem = public_key.read_text() if public_key else None
    release = _ctx().client().publish_release(signed, pem)
    if as_json:
        emit_json(release)
        return
    console.print(
        f"release version {release['version']} ({release['label'] or '-'}) published: "
        f"{len(release['components'])} component(s), {release['digest']}"
    )


@release_app.command("ls")
def release_list(as_json: JsonOpt = False) -> None:
    """List published releases (the newest is the one hosts boot)."""
    items = _ctx().client().releases()
    if as_json:
        emit_json(items)
        return
    table(
        ["VERSION", "LABEL", "COMPONENTS", "DIGEST"],
        [
            (r["version"], r["label"], ", ".join(sorted(r["components"])), r["digest"])
            for r in items
        ],
    )
