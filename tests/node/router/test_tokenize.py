"""The router's tokenizer: the chat template, completions, and the segment cache's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmcache_node.router.tokenize import PromptError, PromptTokenizer, TokenizerError, WouldBlock
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tests.node.router.harness import CHAT_TEMPLATE, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    return PromptTokenizer.load(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


def chat(*contents: str) -> dict[str, object]:
    roles = ["system", "user", "assistant"]
    return {"messages": [{"role": roles[i % 3], "content": c} for i, c in enumerate(contents)]}


def test_chat_is_the_rendered_template_tokenized_without_added_specials(
    tokenizer: PromptTokenizer,
) -> None:
    body = chat("be brief", "hello there")
    text = "<s>system: be brief</s><s>user: hello there</s><s>assistant:"
    assert tokenizer.chat(body) == tokenizer.encode(text, add_special_tokens=False)
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parts = {"messages": [{"role": "user", "content": content}]}
    assert tokenizer.chat(parts) == tokenizer.encode("<s>user: a\nb</s><s>assistant:",
                                                     add_special_tokens=False)  # fmt: skip
    no_prompt = {**body, "add_generation_prompt": False}
    assert tokenizer.chat(no_prompt) == tokenizer.encode(text.removesuffix("<s>assistant:"),
                                                         add_special_tokens=False)  # fmt: skip


def test_segments_are_cached_and_exact(tokenizer: PromptTokenizer) -> None:
    system = "You answer questions about the standard library. " * 40
    first = tokenizer.chat(chat(system, "what is json?"))
    cached = len(tokenizer.segments)
    second = tokenizer.chat(chat(system, "what is json?", "a module", "and re?"))
    assert len(tokenizer.segments) == cached + 2  # only the new messages were tokenized
    assert second[: len(first) - 3] == first[: len(first) - 3]  # the shared prefix
    for body in (chat(system, "x"), chat(system, "what is json?", "a module", "and re?")):
        rendered = tokenizer.encode(
            "".join(f"<s>{m['role']}: {m['content']}</s>" for m in body["messages"])  # type: ignore[attr-defined]
            + "<s>assistant:", add_special_tokens=False,
        )  # fmt: skip
        assert tokenizer.chat(body) == rendered
    assert tokenizer.segment_cache_on


def test_long_uncached_text_is_left_to_a_thread(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(WouldBlock):
        tokenizer.chat(chat("fresh text " * 500, "q"), max_new_chars=2048)
    with pytest.raises(WouldBlock):
        tokenizer.completion({"prompt": "y" * 3000}, max_new_chars=2048)
    assert tokenizer.completion({"prompt": [5, 6, 7]}, max_new_chars=10) == [5, 6, 7]
    assert tokenizer.completion({"prompt": ["first", "second"]}) == tokenizer.encode(
        "first", add_special_tokens=True
    )


def test_prompts_it_cannot_read_are_errors(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(PromptError):
        tokenizer.completion({"prompt": {"not": "a prompt"}})
    with pytest.raises(PromptError):
        tokenizer.chat({"messages": "hello"})
    with pytest.raises(PromptError, match="chat template failed"):
        broken = PromptTokenizer(tokenizer.tokenizer, chat_template="{{ raise_exception('no') }}")
        broken.chat(chat("x"))


def test_a_tokenizer_that_is_not_segmentable_turns_the_cache_off(tmp_path: Path) -> None:
    """Metaspace with prepend_scheme "first" marks only the start of the whole input: text
    after a special token tokenizes differently alone; the self-check notices."""
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    raw.train_from_iterator([Path(__file__).read_text()] * 3, trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    tokenizer = PromptTokenizer.load(str(tmp_path))
    body = chat("the system prompt", "a question")
    whole = tokenizer.encode(
        "<s>system: the system prompt</s><s>user: a question</s><s>assistant:",
        add_special_tokens=False,
    )
    assert tokenizer.chat(body) != whole  # the cached path was wrong once...
    assert not tokenizer.segment_cache_on  # ...and is off from now on
    assert tokenizer.chat(body) == whole


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        PromptTokenizer.load(str(tmp_path))
