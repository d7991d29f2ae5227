"""The resource vector and the parsers of human sizes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetvisor.errors import InvalidInput
from fleetvisor.model.resources import Resources, parse_cpu, parse_size_gib, parse_size_mib

amounts = st.integers(min_value=0, max_value=10**9)
vectors = st.builds(Resources, amounts, amounts, amounts, amounts)


@given(vectors, vectors)
def test_add_then_subtract_is_exact(a: Resources, b: Resources) -> None:
    """Integer arithmetic never drifts: (a + b) - b == a."""
    assert (a + b) - b == a
    assert a.fits_in(a + b)


@given(vectors, vectors)
def test_fits_in_iff_no_shortfall(a: Resources, b: Resources) -> None:
    """fits_in and shortfall agree on every pair."""
    assert a.fits_in(b) == (a.shortfall(b) == {})


def test_shortfall_names_the_short_dimensions() -> None:
    need, have = Resources(2000, 512, 1, 10), Resources(1000, 1024, 1, 5)
    assert need.shortfall(have) == {"vcpus": 1000, "net": 5}


def test_non_integer_dimension_is_refused() -> None:
    with pytest.raises(InvalidInput, match="integer"):
        Resources(vcpus=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("256M", 256),
        ("256Mi", 256),
        ("1G", 1024),
        ("1.5Gi", 1536),
        ("512", 512),
        ("2GB", 2048),
        ("1T", 1024 * 1024),
        ("1048576B", 1),
    ],
)
def test_parse_size_mib(text: str, mib: int) -> None:
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "1.3M", "-5M", "10Q"])
def test_parse_size_mib_refuses_with_advice(text: str) -> None:
    with pytest.raises(InvalidInput, match="e.g."):
        parse_size_mib(text)


@pytest.mark.parametrize(
    ("text", "milli"), [("0.5", 500), ("2", 2000), ("250m", 250), ("1.25", 1250)]
)
def test_parse_cpu(text: str, milli: int) -> None:
    assert parse_cpu(text) == milli


@pytest.mark.parametrize("text", ["half", "0.0001", "1/0"])
def test_parse_cpu_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_cpu(text)


def test_parse_size_gib() -> None:
    assert parse_size_gib("20") == 20
    assert parse_size_gib("1T") == 1024
    with pytest.raises(InvalidInput, match="GiB"):
        parse_size_gib("512M")
