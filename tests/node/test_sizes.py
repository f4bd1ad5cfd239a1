import pytest
from lmcache_node.sizes import GIB, SizeError, format_bytes, size_to_bytes, size_to_gb


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5.0, 5 * GIB),
        (1, GIB),
        ("2.5", int(2.5 * GIB)),
        ("4Gi", 4 * GIB),
        ("512Mi", 512 * 1024**2),
        ("8G", 8 * 1000**3),
        ("100k", 100_000),
        (" 1Ki ", 1024),
        (0, 0),
    ],
)
def test_size_to_bytes_accepts_gb_floats_and_quantities(value: object, expected: int) -> None:
    assert size_to_bytes(value) == expected


def test_bare_unit_can_be_bytes() -> None:
    assert size_to_bytes("4096", bare_unit=1) == 4096
    assert size_to_bytes("1Mi", bare_unit=1) == 1024**2


def test_size_to_gb_is_gib() -> None:
    assert size_to_gb("4Gi") == 4.0
    assert size_to_gb(5.0) == 5.0


@pytest.mark.parametrize(
    "value", ["", "abc", "4Xi", "-1", "1.2.3Gi", True, None, [1], float("nan")]
)
def test_bad_sizes_are_rejected_with_a_hint(value: object) -> None:
    with pytest.raises(SizeError) as info:
        size_to_bytes(value)
    assert str(info.value)


def test_unknown_unit_lists_the_known_ones() -> None:
    with pytest.raises(SizeError, match="Gi"):
        size_to_bytes("3Xi")


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**2) == "3.00 MiB"
