import pytest

from labrun.protocol import format_memory, parse_duration, parse_memory


@pytest.mark.parametrize("text, size", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29), ("2GiB", 2 << 30),
                                        ("100", 100), (1024, 1024), ("64k", 65536)])
def test_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["four", "-1G", "", "1X", True])
def test_bad_memory(text):
    with pytest.raises(ValueError):
        parse_memory(text)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("1h30m", 5400), ("2d", 172800), ("45s", 45), (10, 10)])
def test_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0", "1h30", "-5", ""])
def test_bad_duration(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_memory():
    assert format_memory(4 << 30) == "4G" and format_memory(None) == "-" and format_memory(1536) == "1.5K"


@pytest.mark.parametrize("text, indices, throttle", [
    ("1-20%4", list(range(1, 21)), 4), ("1,3,5", [1, 3, 5], 0), ("0-15:4", [0, 4, 8, 12], 0),
    ("1-3,10,2", [1, 2, 3, 10], 0), ("7", [7], 0), ("0-9%2", list(range(10)), 2),
])
def test_array(text, indices, throttle):
    from labrun.protocol import parse_array

    assert parse_array(text) == (indices, throttle)


@pytest.mark.parametrize("text", ["", "a-b", "5-1", "1-10%0", "1-10%x", "0-4:0", "1-", "0-20000"])
def test_bad_array(text):
    from labrun.protocol import parse_array

    with pytest.raises(ValueError, match="array"):
        parse_array(text)
