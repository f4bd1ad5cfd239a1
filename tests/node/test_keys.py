import hashlib
import json
import os
import subprocess
import sys

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_node.client import IncompatibleServerError, NodeClient
from lmcache_node.config import load_config
from lmcache_node.keys import HASH_ALGORITHM, KEY_BYTES, KeyNamespace, chunk_keys
from lmcache_node.server.node_server import NodeServer
from lmcache_node.server.process import free_port

NS = KeyNamespace(model_name="m")
tokens_strategy = st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=0, max_size=64)


def test_keys_are_16_bytes_one_per_full_chunk() -> None:
    keys = chunk_keys(list(range(10)), 4, NS)
    assert len(keys) == 2
    assert all(len(k) == KEY_BYTES for k in keys)


def test_keys_follow_the_documented_chain() -> None:
    """key(i) = BLAKE2b-128(key(i-1) || int64 LE tokens of chunk i); key(-1) = the namespace's."""
    ns = KeyNamespace("llama", 2, 1, "bfloat16", "vllm-cpu-blocks128", "t")
    fields = [HASH_ALGORITHM, "llama", 2, 1, "bfloat16", "vllm-cpu-blocks128", "t"]
    previous = hashlib.blake2b(msgspec.msgpack.encode(fields), digest_size=16).digest()
    tokens = [7, 2**40, 0, 3, 1, 9]
    expected = []
    for start in (0, 3):
        data = b"".join(t.to_bytes(8, "little") for t in tokens[start : start + 3])
        previous = hashlib.blake2b(previous + data, digest_size=16).digest()
        expected.append(previous)
    assert HASH_ALGORITHM == "blake2b-128-chain-v1"
    assert chunk_keys(tokens, 3, ns) == expected


def test_a_trailing_partial_chunk_has_no_key() -> None:
    tokens = list(range(10))
    assert chunk_keys(tokens, 4, NS) == chunk_keys(tokens[:8], 4, NS)
    assert chunk_keys(tokens[:3], 4, NS) == []


@given(tokens_strategy, st.integers(min_value=1, max_value=8))
def test_prefix_property(tokens: list[int], chunk: int) -> None:
    """Keys of a prefix are a prefix of the keys (chaining)."""
    keys = chunk_keys(tokens, chunk, NS)
    cut = len(tokens) // 2
    assert chunk_keys(tokens[:cut], chunk, NS) == keys[: cut // chunk]


@given(tokens_strategy.filter(lambda t: len(t) >= 4), st.data())
def test_changed_token_changes_its_chunk_and_all_later_keys(
    tokens: list[int], data: st.DataObject
) -> None:
    chunk = 4
    index = data.draw(st.integers(min_value=0, max_value=len(tokens) - 1))
    changed = list(tokens)
    changed[index] = (changed[index] + 1) % 2**31
    before = chunk_keys(tokens, chunk, NS)
    after = chunk_keys(changed, chunk, NS)
    first = index // chunk
    assert before[:first] == after[:first]
    for a, b in zip(before[first:], after[first:], strict=True):
        assert a != b


@given(
    st.sampled_from(["model_name", "world_size", "worker_id", "kv_dtype", "layout", "tenant_salt"]),
    tokens_strategy.filter(lambda t: len(t) >= 4),
)
def test_namespaces_never_collide(field: str, tokens: list[int]) -> None:
    base = KeyNamespace(
        model_name="m",
        world_size=2,
        worker_id=0,
        kv_dtype="float16",
        layout="vllm-cpu",
        tenant_salt="",
    )
    changes = {
        "model_name": "m2",
        "world_size": 4,
        "worker_id": 1,
        "kv_dtype": "bfloat16",
        "layout": "vllm-cuda",
        "tenant_salt": "tenant-a",
    }
    other = KeyNamespace(**{**base.__dict__, field: changes[field]})
    keys_a = set(chunk_keys(tokens, 4, base))
    keys_b = set(chunk_keys(tokens, 4, other))
    assert keys_a and keys_a.isdisjoint(keys_b)


@settings(max_examples=20, deadline=None)
@given(tokens_strategy.filter(lambda t: len(t) >= 2))
def test_numpy_and_list_inputs_agree(tokens: list[int]) -> None:
    import numpy as np

    assert chunk_keys(np.array(tokens), 2, NS) == chunk_keys(tokens, 2, NS)


def test_token_arrays_of_any_integer_width_give_the_same_keys() -> None:
    """vLLM may hand int32 arrays: tokens are hashed as little-endian int64 whatever the
    input's dtype (a 4-byte encoding would be other keys)."""
    import numpy as np

    tokens = list(range(100_000, 100_008))
    expected = chunk_keys(tokens, 4, NS)
    for dtype in (np.int32, np.uint32, np.int64, np.dtype(">i8")):
        assert chunk_keys(np.array(tokens, dtype=dtype), 4, NS) == expected, dtype


@pytest.mark.parametrize("chunk", [0, -256])
def test_a_chunk_size_that_is_not_positive_is_refused(chunk: int) -> None:
    with pytest.raises(ValueError, match=f"chunk_size must be positive, got {chunk}"):
        chunk_keys([1, 2, 3], chunk, NS)


@pytest.mark.integration
def test_same_keys_in_other_processes_whatever_the_hash_seed() -> None:
    tokens = list(range(1000))
    expected = [k.hex() for k in chunk_keys(tokens, 250, NS)]
    assert len(expected) == 4
    code = (
        "import json; from lmcache_node.keys import KeyNamespace, chunk_keys;"
        "print(json.dumps([k.hex() for k in chunk_keys(list(range(1000)), 250,"
        " KeyNamespace(model_name='m'))]))"
    )
    for seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert json.loads(out) == expected


def test_namespace_label() -> None:
    assert KeyNamespace(model_name="m", layout="vllm").label() == "vllm@m@1@0@float16"


@pytest.mark.integration
def test_client_refuses_a_server_that_keys_differently() -> None:
    """A server of another version (here: the xxh3 keys of 0.1) is refused by name."""
    config = load_config(
        {"host": "127.0.0.1", "port": free_port(), "max_local_cpu_size": 0.01, "http_port": 0},
        environ={},
    )
    server = NodeServer(config)
    server.start()
    server.handler.hash_algorithm = "xxh3_128-chain-v1"
    try:
        client = NodeClient(server.endpoint, timeout_s=10)
        with client, pytest.raises(IncompatibleServerError) as info:
            client.connect()
        message = str(info.value)
        assert "'xxh3_128-chain-v1'" in message
        assert f"'{HASH_ALGORITHM}'" in message
        assert "same lmcache-k8s version" in message
    finally:
        server.stop()
