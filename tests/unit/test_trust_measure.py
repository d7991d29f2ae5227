"""Digests of files and trees, and the event log's replay to PCR values (pure Python)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fleetvisor.trust.encoding import canonical_json, sha256_digest
from fleetvisor.trust.measure import (
    ZERO_PCR,
    EventLog,
    MeasurementEvent,
    digest_file,
    digest_path,
    digest_tree,
    extend,
    replay,
    tree_entries,
)

D1 = sha256_digest(b"one")
D2 = sha256_digest(b"two")


def _tree(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    return root / "pkg"


def test_extend_is_sha256_of_old_and_value() -> None:
    value = hashlib.sha256(b"x").digest()
    assert extend(ZERO_PCR, value) == hashlib.sha256(ZERO_PCR + value).digest()


def test_replay_folds_events_per_pcr_in_order() -> None:
    first = MeasurementEvent(12, "root", "release-public-key", D1)
    second = MeasurementEvent(12, "stage1", "manifest", D2)
    third = MeasurementEvent(13, "stage1", "agent-code", D1, "/opt/agent")
    values = replay([first, second, third], [12, 13, 14])
    assert values[12] == extend(extend(ZERO_PCR, first.extend_value()), second.extend_value())
    assert values[13] == extend(ZERO_PCR, third.extend_value())
    assert values[14] == ZERO_PCR
    # Order within a PCR matters: a reordered log replays to something else.
    assert replay([second, first, third], [12])[12] != values[12]


def test_replay_starts_from_baselines() -> None:
    event = MeasurementEvent(13, "stage1", "agent-code", D1)
    baseline = hashlib.sha256(b"platform").hexdigest()
    log = EventLog([event], {13: baseline})
    assert log.replay([13])[13] == extend(bytes.fromhex(baseline), event.extend_value())


def test_extend_value_binds_every_field() -> None:
    base = MeasurementEvent(13, "stage1", "agent-code", D1, "/opt/agent")
    variants = [
        MeasurementEvent(13, "stage1", "driver:runc", D1, "/opt/agent"),
        MeasurementEvent(13, "release", "agent-code", D1, "/opt/agent"),
        MeasurementEvent(13, "stage1", "agent-code", D2, "/opt/agent"),
        MeasurementEvent(13, "stage1", "agent-code", D1, "/elsewhere"),
    ]
    assert all(v.extend_value() != base.extend_value() for v in variants)
    body = {"phase": "stage1", "component": "agent-code", "digest": D1, "detail": "/opt/agent"}
    assert base.extend_value() == hashlib.sha256(canonical_json(body)).digest()


def test_event_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="phase"):
        MeasurementEvent(12, "phase9", "x", D1)
    with pytest.raises(ValueError, match="PCR"):
        MeasurementEvent(24, "root", "x", D1)
    with pytest.raises(ValueError, match="sha256"):
        MeasurementEvent(12, "root", "x", "md5:abc")


def test_event_log_round_trips_and_rejects_garbage() -> None:
    log = EventLog(
        [MeasurementEvent(12, "root", "k", D1), MeasurementEvent(14, "release", "c", D2, "v2")],
        {12: "ab" * 32},
    )
    assert EventLog.from_dict(log.to_dict()) == log
    for bad in (
        [],
        {"events": "x"},
        {"events": [{"pcr": "12", "phase": "root", "component": "k", "digest": D1}]},
        {"events": [], "baselines": {"12": "zz"}},
    ):
        with pytest.raises(ValueError):
            EventLog.from_dict(bad)  # type: ignore[arg-type]


def test_tree_digest_is_stable_and_sensitive(tmp_path: Path) -> None:
    pkg = _tree(tmp_path)
    first = digest_tree(pkg)
    assert digest_tree(pkg) == first
    (pkg / "a.py").write_text("A = 2\n")  # one byte
    assert digest_tree(pkg) != first
    (pkg / "a.py").write_text("A = 1\n")
    assert digest_tree(pkg) == first
    (pkg / "a.py").rename(pkg / "c.py")  # same content, other name
    assert digest_tree(pkg) != first


def test_tree_digest_skips_bytecode_and_records_links(tmp_path: Path) -> None:
    pkg = _tree(tmp_path)
    first = digest_tree(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0" * 10)
    (pkg / "stale.pyc").write_bytes(b"\0")
    assert digest_tree(pkg) == first
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    os.symlink(outside, pkg / "link")
    entries = tree_entries(pkg)
    assert canonical_json(["L", "link", str(outside)]).decode() in entries
    linked = digest_tree(pkg)
    outside.write_text("changed")  # a link is recorded, not followed
    assert digest_tree(pkg) == linked


def test_digest_path_resolves_links_to_what_runs(tmp_path: Path) -> None:
    binary = tmp_path / "qemu-system-x86_64.real"
    binary.write_bytes(b"\x7fELF...")
    link = tmp_path / "qemu-system-x86_64"
    os.symlink(binary, link)
    assert digest_path(link) == digest_file(binary) == sha256_digest(b"\x7fELF...")
    with pytest.raises(FileNotFoundError):
        digest_path(tmp_path / "missing")


def test_file_names_with_spaces_are_unambiguous(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
    (one / "a b").write_text("x")
    (two / "a").mkdir()
    (two / "a" / "b").write_text("x")
    assert digest_tree(one) != digest_tree(two)
