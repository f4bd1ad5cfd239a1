"""The prompt's tokens as vLLM will see them: the model's tokenizer and chat template.

``tokenizers`` (the Rust library transformers itself wraps) reads ``tokenizer.json``; chat
messages are rendered with the model's Jinja chat template in a sandbox configured like
transformers' (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``).
No torch, no transformers: the router starts in a fraction of a second (docs/routing.md
has the measurement). Like vLLM, completions add special tokens and chat requests do not
(the template writes them), unless the request says otherwise. A tokenizer that differs
from vLLM's only costs routing quality: the keys miss and the request goes by load.

Chat prompts repeat: every turn re-sends the system prompt and the conversation so far. The
tokenizer isolates special tokens before anything else, so a rendered chat is the
concatenation of the tokens of the text between special tokens; those segments are cached
(bounded, least recently used out) and only new text is tokenized. Whether that holds for a
given tokenizer is checked, off the request path, on the first requests and then one in
``VERIFY_EVERY``: one mismatch turns the cache off for good (logged).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers

log = logging.getLogger(__name__)


VERIFY_FIRST = 8
VERIFY_EVERY = 64
SEGMENT_CACHE_CHARS = 64 * 1024**2  # text held by the segment cache (about as many bytes)


class TokenizerError(ValueError):
    """The tokenizer or its chat template cannot be loaded; the message says where."""


class PromptError(ValueError):
    """A request whose prompt the router cannot read (it is still forwarded)."""


class WouldBlock(Exception):  # noqa: N818 - a signal, not a failure
    """Tokenizing would take longer than the caller allows inline (uncached text)."""


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _tojson(value: object, indent: int | None = None, **_: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _load_files(source: str) -> tuple[Path, Path | None, Path | None]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja of a directory, or of
    a Hugging Face Hub repository (downloaded with ``huggingface_hub``)."""
    directory = Path(source)
    if directory.is_dir():
        config = directory / "tokenizer_config.json"
        template = directory / "chat_template.jinja"
        main = directory / "tokenizer.json"
        if not main.is_file():
            raise TokenizerError(
                f"{main} does not exist: the router needs the model's fast tokenizer "
                "(tokenizer.json); point --tokenizer at the model directory"
            )
        return main, config if config.is_file() else None, template if template.is_file() else None
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - only for hub names
    from huggingface_hub.errors import EntryNotFoundError  # noqa: PLC0415

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(source, name))
        except EntryNotFoundError:
            return None

    found = fetch("tokenizer.json")
    if found is None:
        raise TokenizerError(f"the Hub repository {source!r} has no tokenizer.json")
    return found, fetch("tokenizer_config.json"), fetch("chat_template.jinja")


class PromptTokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens or {})
        self._template: jinja2.Template | None = None
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = time.strftime
            try:
                self._template = env.from_string(chat_template)
            except jinja2.TemplateError as exc:
                raise TokenizerError(f"the chat template does not compile: {exc}") from None
        specials = [
            token.content
            for token in tokenizer.get_added_tokens_decoder().values()
            if token.special and not token.normalized and token.content
        ]
        self._special_ids: dict[str, int] = {}
        for text in specials:
            token_id = tokenizer.token_to_id(text)
            if token_id is not None:
                self._special_ids[text] = token_id
        specials = list(self._special_ids)
        pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._splitter = re.compile(f"({pattern})") if pattern else None
        self.segments = SegmentCache(SEGMENT_CACHE_CHARS)
        self.segment_cache_on = self._splitter is not None
        self._checked = 0
        self._check_lock = threading.Lock()
        self.verify: Callable[[Callable[[], None]], None] = _run_now  # the app: a thread

    @classmethod
    def load(cls, source: str) -> PromptTokenizer:
        """From a model directory or a Hugging Face Hub repository id."""
        main, config_file, template_file = _load_files(source)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(main))
        except Exception as exc:  # the library raises plain Exception on bad files
            log.exception("cannot load the tokenizer %s", main)
            raise TokenizerError(f"cannot load {main}: {exc}") from None
        config: dict[str, Any] = {}
        if config_file is not None:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        template = template_file.read_text(encoding="utf-8") if template_file else None
        if template is None:
            template = _config_template(config.get("chat_template"))
        specials = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(name) is not None
        }
        return cls(tokenizer, chat_template=template, special_tokens=specials)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    # ----- requests -----
    def completion(self, body: Mapping[str, Any], max_new_chars: int | None = None) -> list[int]:
        """Tokens of a /v1/completions request (the first prompt of a batch); like
        ``chat``, ``WouldBlock`` for text longer than ``max_new_chars``."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch: route by its first prompt
        if isinstance(prompt, list):
            if not all(isinstance(t, int) for t in prompt):
                raise PromptError("a token prompt holds integers only")
            return list(prompt)
        if not isinstance(prompt, str):
            raise PromptError("prompt must be a string or token ids")
        if max_new_chars is not None and len(prompt) > max_new_chars:
            raise WouldBlock
        return self.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))

    def chat(self, body: Mapping[str, Any], max_new_chars: int | None = None) -> list[int]:
        """Tokens of a /v1/chat/completions request, rendered with the chat template.

        With ``max_new_chars``, ``WouldBlock`` when more uncached text than that would have
        to be tokenized (the caller then tokenizes on a worker thread)."""
        if self._template is None:
            raise PromptError("the tokenizer has no chat template")
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(x, dict) for x in messages):
            raise PromptError("messages must be a list of objects")
        kwargs = body.get("chat_template_kwargs")
        context: dict[str, Any] = {
            **self.special_tokens,
            **(kwargs if isinstance(kwargs, dict) else {}),
            "messages": [_flatten(message) for message in messages],
            "add_generation_prompt": bool(body.get("add_generation_prompt", True)),
        }
        if body.get("tools"):
            context["tools"] = body["tools"]
        try:
            text = self._template.render(**context)
        except jinja2.TemplateError as exc:
            raise PromptError(f"the chat template failed: {exc}") from None
        if body.get("add_special_tokens") or not self.segment_cache_on:
            if max_new_chars is not None and len(text) > max_new_chars:
                raise WouldBlock
            return self.encode(text, add_special_tokens=bool(body.get("add_special_tokens")))
        return self.encode_segments(text, max_new_chars)

    def encode_segments(self, text: str, max_new_chars: int | None = None) -> list[int]:
        """``encode(text, add_special_tokens=False)`` from cached segments."""
        assert self._splitter is not None
        pieces = self._splitter.split(text)
        if max_new_chars is not None:
            new = sum(len(p) for n, p in enumerate(pieces) if n % 2 == 0 and p not in self.segments)
            if new > max_new_chars:
                raise WouldBlock
        ids: list[int] = []
        for number, piece in enumerate(pieces):
            if not piece:
                continue
            if number % 2:  # a special token
                ids.append(self._special_ids[piece])
                continue
            cached = self.segments.get(piece)
            if cached is None:
                cached = self.encode(piece, add_special_tokens=False)
                self.segments.put(piece, cached)
            ids.extend(cached)
        with self._check_lock:
            self._checked += 1
            check = self._checked <= VERIFY_FIRST or self._checked % VERIFY_EVERY == 0
        if check:
            self.verify(lambda: self._verify(text, ids))
        return ids

    def _verify(self, text: str, ids: list[int]) -> None:
        if self.encode(text, add_special_tokens=False) != ids and self.segment_cache_on:
            self.segment_cache_on = False
            self.segments.clear()
            log.warning(
                "this tokenizer does not tokenize text between special tokens on its own: "
                "chat prompts are now tokenized whole (slower routing, same decisions)"
            )

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids


class SegmentCache:
    """Token ids of text segments, least recently used out past ``max_chars`` of text."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self._items: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> list[int] | None:
        with self._lock:
            found = self._items.get(text)
            if found is not None:
                self._items.move_to_end(text)
            return found

    def put(self, text: str, ids: list[int]) -> None:
        if len(text) > self.max_chars:
            return
        with self._lock:
            if text in self._items:
                return
            self._items[text] = ids
            self.chars += len(text)
            while self.chars > self.max_chars:
                old, _ = self._items.popitem(last=False)
                self.chars -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.chars = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, text: object) -> bool:
        return text in self._items


def _run_now(work: Callable[[], None]) -> None:
    work()


def _flatten(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI content parts -> one string, as vLLM hands "string" templates their content."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and "text" in p]
        return {**message, "content": "\n".join(str(t) for t in texts)}
    return message


def _config_template(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: the default one
        for item in value:
            if isinstance(item, dict) and item.get("name") == "default":
                return str(item.get("template", ""))
    return None
