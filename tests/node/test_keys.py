import json
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_node.keys import KEY_BYTES, KeyNamespace, chunk_keys, chunk_token_counts

NS = KeyNamespace(model_name="m")
tokens_strategy = st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=0, max_size=64)


def test_keys_are_16_bytes_one_per_full_chunk() -> None:
    keys = chunk_keys(list(range(10)), 4, NS)
    assert len(keys) == 2
    assert all(len(k) == KEY_BYTES for k in keys)


def test_partial_chunk_only_with_save_unfull_chunk() -> None:
    tokens = list(range(10))
    assert len(chunk_keys(tokens, 4, NS, save_unfull_chunk=True)) == 3
    assert chunk_token_counts(10, 4, save_unfull_chunk=True) == [4, 4, 2]
    assert chunk_token_counts(10, 4, save_unfull_chunk=False) == [4, 4]
    full = chunk_keys(tokens, 4, NS)
    assert chunk_keys(tokens, 4, NS, save_unfull_chunk=True)[:2] == full


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
    before = chunk_keys(tokens, chunk, NS, save_unfull_chunk=True)
    after = chunk_keys(changed, chunk, NS, save_unfull_chunk=True)
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


def test_same_keys_in_other_processes_whatever_the_hash_seed() -> None:
    tokens = list(range(1000))
    expected = [k.hex() for k in chunk_keys(tokens, 256, NS, save_unfull_chunk=True)]
    code = (
        "import json; from lmcache_node.keys import KeyNamespace, chunk_keys;"
        "print(json.dumps([k.hex() for k in chunk_keys(list(range(1000)), 256,"
        " KeyNamespace(model_name='m'), save_unfull_chunk=True)]))"
    )
    for seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert json.loads(out) == expected


def test_namespace_label() -> None:
    assert KeyNamespace(model_name="m", layout="vllm").label() == "vllm@m@1@0@float16"
