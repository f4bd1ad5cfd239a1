"""Pure parts of the HTTP API's access rules: peers, bearer headers, token files, addresses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lmcache_node.config import load_config
from lmcache_node.httpapi import TokenFile, TokenFileError, http_hosts, is_loopback
from lmcache_node.httpapi.auth import bearer_token


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("192.0.2.2", False),
        ("::ffff:10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("", False),
        (None, False),
        ("localhost", False),  # only what the socket reports counts, never a name
    ],
)
def test_is_loopback(peer: str | None, loopback: bool) -> None:
    assert is_loopback(peer) is loopback


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_token_file_is_reread_and_keeps_the_last_good_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "http.token"
    path.write_text("first-token\n")
    token = TokenFile.from_file(path, recheck_s=0)
    assert token.matches("first-token")
    assert not token.matches("first-toke") and not token.matches(None)
    assert not token.matches("first-token\n") and not token.matches("")
    path.write_text("second-token")
    assert token.matches("second-token") and not token.matches("first-token")
    with caplog.at_level(logging.ERROR):
        path.write_text("  \n")
        assert token.matches("second-token")
        path.unlink()
        assert token.matches("second-token")
    assert "kept the previous HTTP API token" in caplog.text


@pytest.mark.parametrize("content", [None, "", " \n"])
def test_unusable_token_file_is_refused(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "http.token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenFileError, match="http_token_file") as refused:
        TokenFile.from_file(path)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize(
    ("settings", "hosts"),
    [
        ({}, ["127.0.0.1"]),  # host: localhost, a name
        ({"host": "0.0.0.0"}, ["127.0.0.1"]),  # a wildcard ZMQ host never widens HTTP
        ({"host": "::"}, ["127.0.0.1"]),
        ({"host": "10.1.2.3"}, ["127.0.0.1", "10.1.2.3"]),
        ({"host": "127.0.0.1"}, ["127.0.0.1"]),
        ({"host": "::1"}, ["127.0.0.1", "::1"]),
        ({"http_host": "10.1.2.3, 127.0.0.1"}, ["10.1.2.3", "127.0.0.1"]),
        ({"http_host": "[::1]"}, ["::1"]),
        ({"http_host": "0.0.0.0,127.0.0.1,::1"}, ["0.0.0.0", "::1"]),
        ({"http_host": "0.0.0.0", "host": "10.1.2.3"}, ["0.0.0.0"]),
    ],
)
def test_http_hosts(settings: dict[str, str], hosts: list[str]) -> None:
    assert http_hosts(load_config(settings, environ={})) == hosts


def test_http_host_without_an_address_is_refused() -> None:
    with pytest.raises(ValueError, match="names no address"):
        http_hosts(load_config({"http_host": " , "}, environ={}))
