"""The images run as a non-root user with a numeric uid (so runAsNonRoot can be verified)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lmcache_operator.builders.cache_security import IMAGE_GID, IMAGE_UID

from tests.chart.conftest import REPO

DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))


def _final_user(text: str) -> str:
    """The USER in force in the Dockerfile's last stage."""
    last_stage = re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]
    users = re.findall(r"^USER\s+(\S+)", last_stage, flags=re.MULTILINE)
    assert users, "the last stage sets no USER: it would run as root"
    return str(users[-1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_image_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    user = _final_user(dockerfile.read_text(encoding="utf-8"))
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user


def test_the_cache_pods_user_is_the_node_images() -> None:
    user = _final_user((REPO / "images" / "node" / "Dockerfile").read_text(encoding="utf-8"))
    assert user == f"{IMAGE_UID}:{IMAGE_GID}"


def test_there_are_three_images() -> None:
    assert [p.parent.name for p in DOCKERFILES] == ["node", "operator", "vllm-cpu"]
