"""The model's tokenizer as the server uses it: a conversation to prompt token ids, token ids back to text.

A model folder whose tokenizer is transformers' generic one (a tokenizer.json, and a tokenizer_config.json naming
that class: the default model's) is read with the `tokenizers` library, and its chat template rendered with jinja2
the way transformers renders chat templates, without importing transformers: its import indexes every model it
knows, over a second of a start on a slow CPU. Any other tokenizer is transformers' own, through AutoTokenizer.
tests/test_tokenizer.py holds the first to transformers' tokenizer of the same folder.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

# Tokenizer classes that are transformers' tokenizers-backed one, whatever the model: that class adds nothing to
# what the folder's tokenizer.json and tokenizer_config.json say.
GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
# The special tokens transformers hands a chat template by name (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Message = dict[str, str]  # {"role": ..., "content": ...}
# How many recent chat prompts keep their token ids for the next turn of their conversation (see ReusedPrefixes).
REUSED_PROMPTS = 64


class ChatTokenizer(Protocol):
    eos_token_id: int | None
    pad_token_id: int | None

    def encode_chat(self, messages: Sequence[Message], *, thinking: bool) -> list[int]:
        """The chat-templated prompt for `messages`, ending where the assistant's reply starts (a reply told to
        remember_reply in the ids the model gave it). `thinking` reaches templates that know `enable_thinking` (Qwen3
        style); others ignore it."""
        ...

    def encode(self, text: str) -> list[int]:
        """`text`'s token ids, without special tokens around them."""
        ...

    def remember_reply(self, prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> None:
        """The model answered `prompt_ids` (a prompt encode_chat gave) with `reply_ids`, its stop token left out:
        where it can, a later chat prompt that repeats that prompt and the reply's text reads these very ids."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids`, special tokens left out, spaces as the tokens have them."""
        ...

    def vocabulary(self) -> dict[str, int]:
        """Every token (added ones included) and its id."""
        ...


def next_turn_opening(tokenizer: ChatTokenizer) -> list[int]:
    """The token ids a chat template puts after an assistant reply's text and before the next user message's text
    (ChatML's `<|im_end|>`, `\n`, `<|im_start|>`, `user`, `\n`): the same in every turn, so the decode engine can
    read them ahead when a reply ends. Found by rendering a short conversation three times, changing only the reply's
    last character, then only the question's first word: what lies between the two first differences. Empty where
    the template puts nothing there."""

    def render(reply: str, question: str) -> list[int]:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
        return tokenizer.encode_chat([*messages, {"role": "user", "content": question}], thinking=False)

    rendered = render("Hello there.", "Thanks")
    reply_end = _shared_length(rendered, render("Hello there!", "Thanks")) + 1
    question_start = _shared_length(rendered, render("Hello there.", "Why"))
    return rendered[reply_end:question_start]


def _shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def load_tokenizer(source: str) -> ChatTokenizer:
    """The tokenizer of the model in folder (or hub id) `source`."""
    folder = Path(source)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = _chat_template(folder, config)
    if (
        config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
        and (folder / "tokenizer.json").is_file()
        and template is not None
    ):
        return LocalTokenizer(folder / "tokenizer.json", config, template)
    return TransformersTokenizer.load(source)


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The folder's default chat template: chat_template.jinja (where transformers 5 saves it), else the config's."""
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((item["template"] for item in template if item.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class LocalTokenizer:
    """A tokenizer.json read by the `tokenizers` library, with the folder's special tokens and chat template."""

    def __init__(self, tokenizer_file: Path, config: dict[str, Any], chat_template: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._special_tokens = {
            name: token for name in SPECIAL_TOKEN_NAMES if (token := _token_text(config.get(name))) is not None
        }
        self._template = _compile_chat_template(chat_template)
        self.eos_token_id = self._token_id("eos_token")
        self.pad_token_id = self._token_id("pad_token")
        self._prefixes = ReusedPrefixes.for_tokenizer(self._tokenizer)

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return self._tokenizer.token_to_id(token) if token is not None else None

    def encode_chat(self, messages: Sequence[Message], *, thinking: bool) -> list[int]:
        # What transformers' apply_chat_template passes: the special tokens by name, then the caller's arguments.
        text = self._template.render(
            messages=[dict(message) for message in messages],
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self._special_tokens,
            enable_thinking=thinking,
        )
        return self._prefixes.encode(text) if self._prefixes is not None else self.encode(text)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def remember_reply(self, prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> None:
        if self._prefixes is not None:
            self._prefixes.remember_reply(prompt_ids, reply_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def vocabulary(self) -> dict[str, int]:
        return dict(self._tokenizer.get_vocab(with_added_tokens=True))


class ReusedPrefixes:
    """Token ids of recent chat prompts, so that a conversation's next turn tokenizes only what follows the last turn's
    prompt instead of its whole history: about 1.7 us a token on the 2-core machine (5 ms at 3,000 tokens), on the
    event loop, every turn.

    A prompt whose text starts with a recent prompt's text up to that prompt's last added token (a chat template's
    control token, such as <|im_start|>) reuses the ids of that part and tokenizes the rest. The `tokenizers` library
    splits a text at its added tokens before anything else and tokenizes the pieces between them on their own, so
    the ids up to an added token are the same whatever text follows it. Only added tokens that strip no whitespace
    around them and are matched before normalisation are used, and only for a tokenizer where a probe at load finds
    the split exact (`for_tokenizer`).

    A reply goes on in the model's own ids (`remember_reply`): a prompt whose text starts with a recent prompt's whole
    text and the reply's, followed by an added token (ChatML's <|im_end|>), reads the prompt's and the reply's ids,
    as the model fed them, not the reply's text tokenized anew. Models often spell a word otherwise than the
    tokenizer would (a made-up name as "b", "ak", "k", "ur" where the tokenizer has "b", "akk", "ur"); the prefix
    cache then held a next turn only up to that word and read the rest of the reply again (three passes instead of
    one: 80 instead of 25 ms). The ids are the model's for that very text, which it has read as such already.
    """

    def __init__(self, tokenizer: Any, boundaries: dict[str, int]) -> None:
        self._tokenizer = tokenizer
        self._boundaries = {token_id: text for text, token_id in boundaries.items()}  # id -> added token text
        self._entries: OrderedDict[str, list[int]] = OrderedDict()  # a prompt's text up to a boundary -> its ids
        self._prompts: OrderedDict[tuple[int, ...], str] = OrderedDict()  # a recent prompt's ids -> its text
        self._replies: OrderedDict[str, list[int]] = OrderedDict()  # a prompt's and its reply's text -> their ids
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ReusedPrefixes | None:
        """Reuse for `tokenizer` (a `tokenizers.Tokenizer`), or None where none of its added tokens splits exactly."""
        added_tokens = tokenizer.get_added_tokens_decoder()
        texts = [added.content for added in added_tokens.values()]
        boundaries = {
            added.content: token_id
            for token_id, added in added_tokens.items()
            if not (added.lstrip or added.rstrip or added.single_word or added.normalized)
            # a longer added token holding this one could be matched across the boundary in the whole text
            and not any(added.content in other and added.content != other for other in texts)
        }
        reuse = cls(tokenizer, boundaries)
        for token in boundaries:
            for before, after in (("Hi", "user\nHello there"), ("x ", " y\n"), ("", "\n\n  z")):
                if reuse.encode(before + token + after, remember=False) != reuse.encode(
                    before + token, remember=False
                ) + reuse.encode(after, remember=False):
                    return None
        return reuse if boundaries else None

    def encode(self, text: str, *, remember: bool = True) -> list[int]:
        """`text`'s token ids (without special tokens around them), as the tokenizer gives them for the whole text
        but for a remembered reply's, which keep the model's own: those of the longest remembered prefix, then the
        rest's. With `remember`, the ids up to the last boundary token of the rest are kept for a prompt that
        continues this one, and the whole text for the reply to it (remember_reply)."""
        with self._lock:
            prefix, prefix_ids = self._longest_prefix(text)
        if len(text) == len(prefix):
            return list(prefix_ids)
        rest = self._tokenizer.encode(text[len(prefix) :], add_special_tokens=False)
        rest_ids: list[int] = rest.ids  # a new list at each access of the property: read once
        ids = prefix_ids + rest_ids
        if remember:
            last = next((i for i in range(len(rest_ids) - 1, -1, -1) if rest_ids[i] in self._boundaries), None)
            with self._lock:
                if last is not None:
                    end = len(prefix) + rest.token_to_chars(last)[1]
                    if text.endswith(self._boundaries[rest_ids[last]], 0, end):
                        _keep(self._entries, text[:end], ids[: len(prefix_ids) + last + 1])
                _keep(self._prompts, tuple(ids), text)
        return ids

    def remember_reply(self, prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> None:
        """The model answered `prompt_ids` (ids `encode` gave for a prompt) with `reply_ids`, without its stop token.
        Kept unless a special token is among them (its text would be left out of the stored reply's)."""
        with self._lock:
            prompt = self._prompts.get(tuple(prompt_ids))
        if prompt is None or not reply_ids:
            return
        reply = self._tokenizer.decode(list(reply_ids), skip_special_tokens=False)
        if reply != self._tokenizer.decode(list(reply_ids), skip_special_tokens=True):
            return
        with self._lock:
            _keep(self._replies, prompt + reply, [*prompt_ids, *reply_ids])

    def _longest_prefix(self, text: str) -> tuple[str, list[int]]:
        """The longest remembered prefix of `text` and its ids ("" and none without one); a reply's only where an
        added token follows it in `text`, which splits the reply's text from what follows."""
        best, best_ids, found_in = "", [], None
        for entries, needs_boundary in ((self._entries, False), (self._replies, True)):
            for prefix, ids in entries.items():
                if len(prefix) > len(best) and text.startswith(prefix):
                    if needs_boundary and not any(
                        text.startswith(boundary, len(prefix)) for boundary in self._boundaries.values()
                    ):
                        continue
                    best, best_ids, found_in = prefix, ids, entries
        if found_in is not None:
            found_in.move_to_end(best)
        return best, best_ids


def _keep(entries: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    """Keep `value` under `key` as the most recent of `entries`, forgetting the least recent beyond REUSED_PROMPTS."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > REUSED_PROMPTS:
        entries.popitem(last=False)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: its text, or an AddedToken's fields."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _compile_chat_template(source: str) -> Any:
    """`source` compiled in the environment transformers renders chat templates in: jinja2's immutable sandbox (chat
    templates are code that comes with a model), blocks trimmed, loop controls, transformers' `tojson` (no HTML
    escaping), `raise_exception` and `strftime_now`, and its `{% generation %}` tag, which marks the assistant's
    part for training and renders its body."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(date_format: str) -> str:
        return datetime.now().strftime(date_format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(source)


class TransformersTokenizer:
    """Any tokenizer transformers loads, for models whose tokenizer is a class of its own."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.pad_token_id: int | None = tokenizer.pad_token_id

    @classmethod
    def load(cls, source: str) -> TransformersTokenizer:
        """AutoTokenizer reads the model's config only for its type and tokenizer class; given it as a plain
        PreTrainedConfig, it does not import the model's own config class (Llama's pulls in torch.distributed: about
        a second of a start)."""
        from transformers import AutoTokenizer, PreTrainedConfig

        config, _ = PreTrainedConfig.get_config_dict(source)
        return cls(AutoTokenizer.from_pretrained(source, config=PreTrainedConfig.from_dict(config)))

    def encode_chat(self, messages: Sequence[Message], *, thinking: bool) -> list[int]:
        ids = self._tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=thinking
        )
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def remember_reply(self, prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> None:
        pass  # every prompt is tokenized whole (ReusedPrefixes is for `tokenizers` tokenizers)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(
            self._tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def vocabulary(self) -> dict[str, int]:
        return dict(self._tokenizer.get_vocab())
