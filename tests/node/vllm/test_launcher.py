"""`lmcache-node vllm`: the command the launcher builds from the environment, and its exec.

The real start of vLLM through the launcher is e2e/vllm/test_launcher.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lmcache_node.vllm.launcher import API_SERVER_MODULE, LaunchError, plan

REPO = Path(__file__).resolve().parents[3]
VLLM = "/venv/bin/vllm"
PY = "/venv/bin/python"


def kv_config(argv: list[str]) -> dict[str, Any]:
    assert argv.count("--kv-transfer-config") == 1, argv
    config: dict[str, Any] = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    return config


def test_without_enable_lmcache_vllm_runs_untouched() -> None:
    for env in ({}, {"ENABLE_LMCACHE": "0"}, {"ENABLE_LMCACHE": "false", "HOST_IP": "10.0.0.7"}):
        launch = plan(["m", "--port", "8000"], env, vllm_cli=VLLM, python=PY)
        assert launch.argv == [VLLM, "serve", "m", "--port", "8000"]
        assert launch.env == {}


def test_enable_lmcache_adds_our_connector_at_the_node_ip() -> None:
    env = {"ENABLE_LMCACHE": "1", "HOST_IP": "10.0.0.7"}
    launch = plan(["m", "--port", "8000"], env, vllm_cli=VLLM, python=PY)
    assert launch.argv[:5] == [VLLM, "serve", "m", "--port", "8000"]
    assert kv_config(launch.argv) == {
        "kv_connector": "LMCacheNodeConnector",
        "kv_connector_module_path": "lmcache_node.vllm.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"lmcache.node.host": "tcp://10.0.0.7"},
    }
    assert launch.env == {}


def test_ipv6_host_and_an_explicit_node_host() -> None:
    launch = plan(["m"], {"ENABLE_LMCACHE": "yes", "HOST_IP": "fd00::7"}, vllm_cli=VLLM, python=PY)
    assert kv_config(launch.argv)["kv_connector_extra_config"] == {
        "lmcache.node.host": "tcp://[fd00::7]"
    }
    env = {"ENABLE_LMCACHE": "true", "HOST_IP": "10.0.0.7", "LMCACHE_NODE_HOST": "tcp://h:6000"}
    launch = plan(["m"], env, vllm_cli=VLLM, python=PY)
    assert kv_config(launch.argv)["kv_connector_extra_config"] == {}  # the connector reads env


def test_role_and_failure_policy() -> None:
    env = {
        "ENABLE_LMCACHE": "on",
        "LMCACHE_LAUNCHER_KV_ROLE": "kv_consumer",
        "LMCACHE_LAUNCHER_LOAD_FAILURE_POLICY": "fail",
    }
    launch = plan(["m"], env, vllm_cli=VLLM, python=PY)
    config = kv_config(launch.argv)
    assert (config["kv_role"], config["kv_load_failure_policy"]) == ("kv_consumer", "fail")
    assert any("127.0.0.1" in note for note in launch.notes)  # no HOST_IP: said so


def test_nixl_disaggregation_builds_multiconnector_with_nixl_first() -> None:
    env = {"ENABLE_LMCACHE": "1", "HOST_IP": "10.0.0.7", "LMCACHE_LAUNCHER_DISAGG": "nixl"}
    launch = plan(["m"], env, vllm_cli=VLLM, python=PY)
    config = kv_config(launch.argv)
    assert config["kv_connector"] == "MultiConnector" and config["kv_role"] == "kv_both"
    nixl, ours = config["kv_connector_extra_config"]["connectors"]
    assert nixl == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    assert ours["kv_connector"] == "LMCacheNodeConnector"
    assert ours["kv_connector_extra_config"] == {"lmcache.node.host": "tcp://10.0.0.7"}
    assert launch.env == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.7"}
    env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "10.9.9.9"  # the user's wins
    assert plan(["m"], env, vllm_cli=VLLM, python=PY).env == {}


@pytest.mark.parametrize(
    "given",
    [
        ["--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'],
        ['--kv_transfer_config={"kv_connector":"NixlConnector","kv_role":"kv_both"}'],
        ["--kv-transfer-config.kv_connector", "NixlConnector"],
    ],
)
def test_a_users_kv_transfer_config_is_kept_as_is(given: list[str]) -> None:
    launch = plan(["m", *given], {"ENABLE_LMCACHE": "1"}, vllm_cli=VLLM, python=PY)
    assert launch.argv == [VLLM, "serve", "m", *given]
    assert "used as is" in launch.notes[0]


def test_leading_serve_is_accepted() -> None:
    launch = plan(["serve", "m"], {}, vllm_cli=VLLM, python=PY)
    assert launch.argv == [VLLM, "serve", "m"]


def test_without_a_vllm_script_the_api_server_module_takes_the_model_as_an_option() -> None:
    launch = plan(["m", "--port", "1"], {}, vllm_cli=None, python=PY)
    assert launch.argv == [PY, "-m", API_SERVER_MODULE, "--model", "m", "--port", "1"]
    launch = plan(["--model", "m"], {}, vllm_cli=None, python=PY)
    assert launch.argv == [PY, "-m", API_SERVER_MODULE, "--model", "m"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ENABLE_LMCACHE": "maybe"}, "ENABLE_LMCACHE='maybe': use 1"),
        ({"ENABLE_LMCACHE": "1", "LMCACHE_LAUNCHER_KV_ROLE": "kv_all"}, "use one of kv_both"),
        ({"ENABLE_LMCACHE": "1", "LMCACHE_LAUNCHER_DISAGG": "mooncake"}, "use nixl"),
        ({"ENABLE_LMCACHE": "1", "LMCACHE_LAUNCHER_LOAD_FAILURE_POLICY": "x"}, "recompute, fail"),
        ({"ENABLE_LMCACHE": "1", "LMCACHE_CHUNK_SIZE": "many"}, "lmcache.node.chunk_size"),
        ({"ENABLE_LMCACHE": "1", "HOST_IP": "10.0.0.7:99999"}, "HOST_IP='10.0.0.7:99999' is not"),
        ({"ENABLE_LMCACHE": "1", "LMCACHE_NODE_HOST": "http://h"}, "lmcache.node.host"),
    ],
)
def test_bad_environment_is_refused_before_vllm_starts(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        plan(["m"], env, vllm_cli=VLLM, python=PY)


def test_lmcache_server_variables_in_the_vllm_pod_are_pointed_out() -> None:
    env = {"ENABLE_LMCACHE": "1", "LMCACHE_MAX_LOCAL_CPU_SIZE": "20", "LMCACHE_LOCAL_CPU": "True",
           "LMCACHE_CHUNK_SIZE": "256"}  # fmt: skip
    notes = plan(["m"], env, vllm_cli=VLLM, python=PY).notes
    [note] = [n for n in notes if "cache server" in n]
    assert note.startswith("not read in this pod: LMCACHE_LOCAL_CPU, LMCACHE_MAX_LOCAL_CPU_SIZE (")


def _run_cli(args: list[str], env: dict[str, str], path: Path) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join([str(REPO / "node"), str(REPO / "operator")])
    base = {"PATH": f"{path}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, "-m", "lmcache_node", "vllm", *args],
        env={**base, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def fake_vllm_dir(tmp_path: Path) -> Path:
    """A ``vllm`` on PATH that prints what it was started with (stands in for vLLM's script;
    the real one runs in e2e/vllm/test_launcher.py)."""
    script = tmp_path / "vllm"
    script.write_text(
        "#!/bin/sh\n"
        'printf "%s\\n" "$@" > "$ARGV_OUT"\n'
        'printf "%s" "$VLLM_NIXL_SIDE_CHANNEL_HOST" > "$ARGV_OUT.nixl"\n',
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return tmp_path


@pytest.mark.integration
def test_cli_execs_the_planned_command(fake_vllm_dir: Path) -> None:
    out = fake_vllm_dir / "argv.txt"
    env = {"ENABLE_LMCACHE": "1", "HOST_IP": "10.1.2.3", "LMCACHE_LAUNCHER_DISAGG": "nixl",
           "ARGV_OUT": str(out)}  # fmt: skip
    result = _run_cli(["serve", "my-model", "--port", "8001"], env, fake_vllm_dir)
    assert result.returncode == 0, result.stderr
    argv = out.read_text(encoding="utf-8").splitlines()
    assert argv[:4] == ["serve", "my-model", "--port", "8001"]
    assert kv_config(argv)["kv_connector"] == "MultiConnector"
    assert Path(f"{out}.nixl").read_text(encoding="utf-8") == "10.1.2.3"
    assert "lmcache-node vllm: exec" in result.stderr


@pytest.mark.integration
def test_cli_dry_run_prints_the_command_and_bad_env_exits_2(fake_vllm_dir: Path) -> None:
    env = {"ENABLE_LMCACHE": "1", "HOST_IP": "10.1.2.3", "LMCACHE_LAUNCHER_DRY_RUN": "1"}
    result = _run_cli(["m"], env, fake_vllm_dir)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["argv"][1:3] == ["serve", "m"] and printed["env"] == {}
    assert kv_config(printed["argv"])["kv_connector"] == "LMCacheNodeConnector"
    bad = _run_cli(["m"], {"ENABLE_LMCACHE": "2"}, fake_vllm_dir)
    assert bad.returncode == 2 and "ENABLE_LMCACHE='2'" in bad.stderr
