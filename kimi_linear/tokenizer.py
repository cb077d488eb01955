"""Tokenizers and chat templates: the release's tiktoken BPE (``tiktoken.model`` in the checkpoint) or bytes.

``load_tokenizer(directory, config)`` returns one of:

* ``TiktokenTokenizer``: the released Kimi tokenizer. BPE ranks from the folder's ``tiktoken.model`` (nothing is
  downloaded), the Kimi split pattern, and 256 reserved special tokens right after the BPE ranks, named from
  ``tokenizer_config.json``'s ``added_tokens_decoder`` (unnamed ones are ``<|reserved_token_{id}|>``; a folder
  without ``tokenizer_config.json`` gets the release's names, ``KIMI_SPECIAL_TOKENS``). Long texts are cut into
  pieces before BPE exactly as the release's ``tokenization_kimi.py`` does (slices of 400 000 characters, then
  no run of whitespace or of non-whitespace longer than 25 000 characters), so ids equal the release's on any
  text.
* ``ByteTokenizer``: one token per UTF-8 byte (0..255) plus the config's bos/eos/pad ids named ``[BOS]``,
  ``[EOS]``, ``[PAD]`` (the project's own small models, vocab 259; prompts start with BOS as the training
  documents do, ``add_bos``).

A checkpoint whose vocabulary is larger than a byte model's and that has no ``tiktoken.model`` is an error
(``TokenizerError``) naming the missing file, never a silent fallback to bytes.

Both tokenizers share this interface:

* ``encode(text, allowed_special=())`` -> ``list[int]``: text from users is text — special-token names inside it
  are encoded as plain characters unless listed in ``allowed_special`` (a collection of names, or ``"all"``).
* ``decode(ids, skip_special_tokens=True)`` -> ``str``: special tokens are dropped, or shown by name with
  ``skip_special_tokens=False`` (note: transformers' default is False).
* ``apply_chat_template(messages, add_generation_prompt=True, tools=None, **kwargs)`` -> ``list[int]`` and
  ``render_chat_template(...)`` -> ``str``: the folder's chat template (``chat_template.jinja``, else
  ``tokenizer_config.json``'s ``chat_template``; else the built-in ``KIMI_CHAT_TEMPLATE`` for tiktoken and
  ``BYTE_CHAT_TEMPLATE`` for bytes) rendered with Jinja2 in a sandbox as transformers' ``apply_chat_template``
  renders it (same environment, filters and variables). The special tokens the template writes become their
  ids; special-token names inside message contents, tool definitions or extra variables stay text (no prompt
  injection).
* ``stop_token_ids``: the ids that end an assistant turn — ``<|im_end|>``, ``[EOS]``, the config's eos id and
  ``generation_config.json``'s ``eos_token_id`` (int or list) when the folder has one.
* ``special_tokens`` (name -> id), ``token_bytes(id)``, ``vocab_size``, ``bos_token_id``, ``eos_token_id``,
  ``add_bos``, ``generation_config`` (the folder's ``generation_config.json`` as a dict, ``{}`` without one).

``StreamDecoder(tokenizer)`` turns tokens into text one at a time, holding back incomplete UTF-8 sequences.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime

from kimi_linear.config import KimiLinearConfig

TIKTOKEN_FILE = "tiktoken.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
NUM_RESERVED_SPECIAL_TOKENS = 256
# The release encodes text in slices of this many characters, each cut further so that no run of whitespace
# or of non-whitespace characters is longer than MAX_RUN_CHARS (tiktoken is slow on such runs).
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
BYTE_VOCAB_SIZE = 256 + 3  # bytes + bos/eos/pad: the largest vocabulary a byte-level model of the project has

# The Kimi tokenizer's pre-tokenisation: runs of Han characters, words with their leading punctuation/space
# and English contractions, numbers in groups of up to three digits, punctuation runs, newlines, other
# whitespace.
KIMI_SPLIT_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The release's special tokens, by offset from the first id after the BPE ranks (163584 in the release); used
# only for a tiktoken folder without tokenizer_config.json. Offsets not listed are <|reserved_token_{id}|>.
KIMI_SPECIAL_TOKENS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    255: "[PAD]",
}
# Markers of the tool-call section, shown by decode even with skip_special_tokens (the release marks them
# "special": false, so tool-call parsers see them).
KIMI_TOOL_TOKENS = frozenset(KIMI_SPECIAL_TOKENS[i] for i in range(11, 16))
END_OF_TURN_TOKENS = ("<|im_end|>", "[EOS]")

# The Kimi chat format (the Kimi-K2 family's, which the release uses): every message is
# <|im_{user,assistant,system}|>{name or role}<|im_middle|>{content}<|im_end|>; tools are declared first in a
# "tool_declare" system turn as compact JSON; without a system message the default one is inserted; an
# assistant's tool calls follow its text inside <|tool_calls_section_begin|> ... <|tool_calls_section_end|>, one
# call as <|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|> (the call's id, else
# "functions.{name}:{index}" counted over the conversation); a tool result is a system-class turn (named after
# the tool, else "tool") whose content starts with "## Return of {tool_call_id}\n". The generation prompt opens
# an assistant turn.
KIMI_CHAT_TEMPLATE = r"""
{%- macro content_text(message) -%}
  {%- set content = message.get('content') -%}
  {%- if content is string -%}{{ content }}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
        <|media_start|>image<|media_content|><|media_pad|><|media_end|>
      {%- else -%}{{ part['text'] }}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set calls = namespace(count=0) -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and message['role'] != 'system' -%}
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}
  {%- set name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}<|im_user|>{{ name }}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}<|im_assistant|>{{ name }}<|im_middle|>
  {%- else -%}<|im_system|>{{ name }}<|im_middle|>
  {%- endif -%}
  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {{ content_text(message) }}<|tool_calls_section_begin|>
    {%- for call in message['tool_calls'] -%}
      {%- set call_id = call.get('id') or 'functions.' + call['function']['name'] + ':' + (calls.count | string) -%}
      {%- set calls.count = calls.count + 1 -%}
      {%- set arguments = call['function']['arguments'] -%}
      <|tool_call_begin|>{{ call_id }}<|tool_call_argument_begin|>
      {%- if arguments is string -%}{{ arguments }}{%- else -%}{{ arguments | tojson }}{%- endif -%}
      <|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    ## Return of {{ message.get('tool_call_id', '') }}
{{ content_text(message) }}
  {%- else -%}{{ content_text(message) }}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}
"""

# The project's byte-level models: "[BOS]" then one "role: content" per message, user/system messages ended by a
# newline and assistant messages by "[EOS]" (the eos id, where generation stops); the generation prompt is
# "assistant: ".
BYTE_CHAT_TEMPLATE = r"""
{%- macro content_text(message) -%}
  {%- set content = message.get('content') -%}
  {%- if content is string -%}{{ content }}
  {%- elif content is not none -%}{%- for part in content -%}{{ part.get('text', '') }}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{{- bos_token or '' -}}
{%- for message in messages -%}
  {{ message.get('name') or message['role'] }}: {{ content_text(message) }}
  {%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ '\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}
"""

# Private-use characters around special-token names that came from the caller's data (messages, tools, extra
# variables) rather than from the template, so that they are encoded as text.
_MARK_START, _MARK_END = "\ue000", "\ue001"


class TokenizerError(ValueError):
    """A checkpoint folder whose tokenizer files are missing, unreadable or inconsistent with the model."""


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cut ``text`` so that no piece holds more than ``max_run`` consecutive whitespace or non-whitespace
    characters (``str.isspace``): a run longer than that is cut every ``max_run`` characters from its start.
    Yields at least one (possibly empty) piece; the pieces join back to ``text``."""
    start = 0
    for run in re.finditer(r"\s+|\S+", text):
        a, b = run.span()
        for cut in range(a + max_run, b, max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _json_dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str):
    """The chat template compiled as transformers compiles it: an immutable sandbox, trim_blocks and
    lstrip_blocks, loop controls, ``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _json_dumps
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _plain(value):
    """JSON-like copy of the caller's data (dicts, lists, scalars); None-valued message keys are kept here and
    dropped per message, as transformers does."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(
        f"chat messages and tools must hold dicts, lists, strings and numbers, got {type(value).__name__}"
    )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class _ChatTokenizer:
    """What both tokenizers share: special tokens, encode with allowed specials, decode, the chat template."""

    name = "tokenizer"

    def _setup(
        self,
        config: KimiLinearConfig,
        directory: str | None,
        special_tokens: dict[str, int],
        skipped: set[int],
        default_template: str,
        settings: dict,
    ) -> None:
        self.vocab_size = config.vocab_size
        self.bos_token_id, self.eos_token_id = config.bos_token_id, config.eos_token_id
        self.special_tokens = dict(special_tokens)
        self.special_names = {i: name for name, i in special_tokens.items()}
        self._skipped = set(skipped)
        names = sorted(special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(n) for n in names)) if names else None
        self._rendered_re = re.compile(
            f"{_MARK_START}(?:{self._special_re.pattern}){_MARK_END}|{self._special_re.pattern}"
            f"|{_MARK_START}|{_MARK_END}"
            if names
            else f"{_MARK_START}|{_MARK_END}"
        )
        template = None
        if directory is not None and os.path.isfile(os.path.join(directory, CHAT_TEMPLATE_FILE)):
            with open(os.path.join(directory, CHAT_TEMPLATE_FILE), encoding="utf-8") as f:
                template = f.read()
        elif settings.get("chat_template"):
            template = settings["chat_template"]
            if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: the "default" one
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if not isinstance(template, str):
                raise TokenizerError(
                    f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string or hold a 'default'"
                )
        self.chat_template = template if template is not None else default_template
        self._template = None
        # What transformers passes to the template besides the messages (its special_tokens_map).
        self.template_variables = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(settings.get(key))
            if content is not None:
                self.template_variables[key] = content
        self.generation_config = {}
        if directory is not None and os.path.isfile(os.path.join(directory, GENERATION_CONFIG_FILE)):
            self.generation_config = _read_json(os.path.join(directory, GENERATION_CONFIG_FILE))
        stop = [self.special_tokens[n] for n in END_OF_TURN_TOKENS if n in self.special_tokens]
        eos = self.generation_config.get("eos_token_id")
        for i in [config.eos_token_id, *(eos if isinstance(eos, list) else [eos])]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size:
                stop.append(i)
        self.stop_token_ids = sorted(set(stop))

    # ---- encoding ------------------------------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, allowed_special: Collection[str] | str = ()) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: any string.
            allowed_special: special-token names to encode as their ids where they occur in ``text`` (``"all"``
                for every special token). By default none: names such as ``<|im_end|>`` in user text are text.

        Raises:
            TypeError: text not a str. ValueError: an unknown name in allowed_special.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = sorted(allowed - set(self.special_tokens))
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens: {unknown[:8]}")
        if not allowed:
            return self._encode_text(text)
        pattern = re.compile("|".join(re.escape(n) for n in sorted(allowed, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for m in pattern.finditer(text):
            ids += self._encode_text(text[start : m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        return ids + self._encode_text(text[start:])

    # ---- decoding ------------------------------------------------------------------------------------------

    def _text_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def token_bytes(self, token: int, skip_special_tokens: bool = True) -> bytes:
        """UTF-8 bytes of one token; a special token is its name, or nothing when skipped."""
        name = self.special_names.get(token)
        if name is not None:
            return b"" if skip_special_tokens and token in self._skipped else name.encode("utf-8")
        return self._text_bytes(token)

    def decode(self, tokens, skip_special_tokens: bool = True) -> str:
        """Text of ``tokens`` (ids outside the vocabulary decode to nothing; invalid UTF-8 to U+FFFD).

        ``skip_special_tokens`` (default True) drops the special tokens (the tool-call markers, which the
        release does not mark special, stay); False shows them by name.
        """
        return b"".join(self.token_bytes(int(t), skip_special_tokens) for t in tokens).decode(
            "utf-8", errors="replace"
        )

    # ---- chat ----------------------------------------------------------------------------------------------

    def _mark(self, value):
        """Caller data with special-token names wrapped in markers (and stray markers removed)."""
        if isinstance(value, str):
            value = value.replace(_MARK_START, "").replace(_MARK_END, "")
            if self._special_re is None:
                return value
            return self._special_re.sub(lambda m: f"{_MARK_START}{m.group()}{_MARK_END}", value)
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._mark(v) for v in value]
        return value

    def _render_marked(self, messages, add_generation_prompt: bool, tools, kwargs) -> str:
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of dicts with 'role' and 'content'")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} has no 'role' string")
        chat = [{k: v for k, v in _plain(m).items() if v is not None} for m in messages]
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {**self.template_variables, **self._mark(_plain(kwargs))}
        return self._template.render(
            messages=self._mark(chat),
            tools=self._mark(_plain(tools)) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def render_chat_template(self, messages, add_generation_prompt: bool = True, tools=None, **kwargs) -> str:
        """The chat template rendered to text — what transformers' ``apply_chat_template(..., tokenize=False)``
        returns for the same files. Extra keyword arguments become template variables."""
        rendered = self._render_marked(messages, add_generation_prompt, tools, kwargs)
        return rendered.replace(_MARK_START, "").replace(_MARK_END, "")

    def apply_chat_template(
        self,
        messages,
        add_generation_prompt: bool = True,
        tools=None,
        token_inserts: Mapping[str, Sequence[int]] | None = None,
        **kwargs,
    ) -> list[int]:
        """Token ids of the rendered chat: the template's special tokens as ids, everything the caller passed
        (contents, names, tool definitions, variables) as text.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str | [parts], ...}, ...]``
                (keys with value None are dropped, as transformers does).
            add_generation_prompt: end with the opening of an assistant turn.
            tools: OpenAI-style tool definitions (JSON schemas), for templates that declare tools.
            token_inserts: placeholder string -> ids. Where a placeholder (put in a message by the caller)
                appears in the rendered chat, these ids stand instead of its encoding — a chat session keeps the
                tokens the model generated rather than a re-encoding of their text.
            **kwargs: extra template variables.

        Raises:
            TypeError / ValueError: malformed messages; jinja2.TemplateError from the template itself.
        """
        rendered = self._render_marked(messages, add_generation_prompt, tools, kwargs)
        return self._encode_rendered(rendered, dict(token_inserts or {}))

    def _encode_rendered(self, rendered: str, inserts: dict[str, Sequence[int]]) -> list[int]:
        pattern = self._rendered_re
        if inserts:
            keys = "|".join(re.escape(k) for k in sorted(inserts, key=len, reverse=True))
            pattern = re.compile(f"{keys}|{pattern.pattern}")
        ids: list[int] = []
        text: list[str] = []
        start = 0
        for m in pattern.finditer(rendered):
            text.append(rendered[start : m.start()])
            start = m.end()
            piece = m.group()
            if piece in (_MARK_START, _MARK_END):  # a marker the template separated from its token
                continue
            if piece.startswith(_MARK_START):  # a name from the caller's data: text
                text.append(piece[1:-1])
                continue
            ids += self._encode_text("".join(text))
            text = []
            if piece in inserts:
                ids += [int(i) for i in inserts[piece]]
            else:
                ids.append(self.special_tokens[piece])
        text.append(rendered[start:])
        return ids + self._encode_text("".join(text))


class ByteTokenizer(_ChatTokenizer):
    """UTF-8 bytes as tokens 0..255; the config's bos/eos/pad ids are the special tokens [BOS]/[EOS]/[PAD].

    Raises:
        TokenizerError: vocab_size < 256, or a config/chat template file in the folder that cannot be read.
    """

    name = "bytes"
    # The project's models are trained on documents that start with BOS (kimi_linear.train.data).
    add_bos = True

    def __init__(self, config: KimiLinearConfig, directory: str | None = None):
        if config.vocab_size < 256:
            raise TokenizerError(f"a byte-level tokenizer needs vocab_size >= 256, got {config.vocab_size}")
        specials = {}
        for name, i in (
            ("[BOS]", config.bos_token_id),
            ("[EOS]", config.eos_token_id),
            ("[PAD]", config.pad_token_id),
        ):
            if isinstance(i, int) and 256 <= i < config.vocab_size and i not in specials.values():
                specials[name] = i
        settings = {"bos_token": "[BOS]" if "[BOS]" in specials else None}
        settings["eos_token"] = "[EOS]" if "[EOS]" in specials else None
        if directory is not None and os.path.isfile(os.path.join(directory, TOKENIZER_CONFIG_FILE)):
            settings.update(_read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE)))
        self._setup(config, directory, specials, set(specials.values()), BYTE_CHAT_TEMPLATE, settings)

    def _encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _text_bytes(self, token: int) -> bytes:
        return bytes([token]) if 0 <= token < 256 else b""


class TiktokenTokenizer(_ChatTokenizer):
    """The release's BPE tokenizer from a local ``tiktoken.model`` (see the module docstring).

    Raises:
        TokenizerError: unreadable ``tiktoken.model`` / ``tokenizer_config.json``, or more tokens than the
            model's vocab_size.
    """

    name = "tiktoken"

    def __init__(self, directory: str, config: KimiLinearConfig):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = os.path.join(directory, TIKTOKEN_FILE)
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a readable tiktoken BPE file: {e}") from None
        n_base = len(ranks)
        tok_config = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        settings: dict = {}
        reserved = range(n_base, n_base + NUM_RESERVED_SPECIAL_TOKENS)
        if os.path.isfile(tok_config):
            settings = _read_json(tok_config)
            added = settings.get("added_tokens_decoder") or {}
            entries = {}
            for key, entry in added.items():
                if not (isinstance(key, str) and key.isdigit()) or _token_content(entry) is None:
                    raise TokenizerError(f"{tok_config}: bad added_tokens_decoder entry {key!r}: {entry!r}")
                entries[int(key)] = entry
        else:  # the release's table; tool-call markers are not "special" there
            entries = {
                n_base + k: {"content": name, "special": name not in KIMI_TOOL_TOKENS}
                for k, name in KIMI_SPECIAL_TOKENS.items()
            }
            settings = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]"}
        specials: dict[str, int] = {}
        skipped: set[int] = set()
        for i in reserved:
            entry = entries.get(i)
            name = _token_content(entry) if entry is not None else f"<|reserved_token_{i}|>"
            if name in specials:
                raise TokenizerError(f"{tok_config}: special token {name!r} is named twice")
            specials[name] = i
            if entry is None or not isinstance(entry, dict) or entry.get("special", True):
                skipped.add(i)
        if n_base + NUM_RESERVED_SPECIAL_TOKENS > config.vocab_size:
            raise TokenizerError(
                f"tokenizer has {n_base + NUM_RESERVED_SPECIAL_TOKENS} tokens ({n_base} BPE + "
                f"{NUM_RESERVED_SPECIAL_TOKENS} special) but the model's vocab_size is {config.vocab_size}"
            )
        self.encoding = tiktoken.Encoding(
            name="kimi", pat_str=KIMI_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self.n_base = n_base
        self.add_bos = bool(settings.get("add_bos_token", False))
        self._setup(config, directory, specials, skipped, KIMI_CHAT_TEMPLATE, settings)
        self.special_ids = set(specials.values())

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i : i + MAX_ENCODE_CHARS]):
                ids += self.encoding.encode_ordinary(piece)
        return ids

    def _text_bytes(self, token: int) -> bytes:
        if 0 <= token < self.n_base:
            return self.encoding.decode_single_token_bytes(token)
        return b""


class StreamDecoder:
    """Turns tokens into text one at a time, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token, self.skip_special_tokens))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def load_tokenizer(directory: str | None, config: KimiLinearConfig):
    """The checkpoint's tokenizer: ``TiktokenTokenizer`` when ``directory`` holds ``tiktoken.model``, else
    ``ByteTokenizer`` for a byte-level model.

    Raises:
        TokenizerError: the model's vocabulary is larger than a byte model's (``BYTE_VOCAB_SIZE``) and the folder
            has no ``tiktoken.model``; or unreadable tokenizer files.
    """
    if directory is not None and os.path.isfile(os.path.join(directory, TIKTOKEN_FILE)):
        return TiktokenTokenizer(directory, config)
    if config.vocab_size > BYTE_VOCAB_SIZE:
        where = f"{directory}" if directory is not None else "no checkpoint folder"
        raise TokenizerError(
            f"the model has a vocabulary of {config.vocab_size} tokens but {where} has no {TIKTOKEN_FILE}: copy "
            f"the release's tokenizer files ({TIKTOKEN_FILE}, {TOKENIZER_CONFIG_FILE}) next to config.json "
            f"(a byte-level model has at most {BYTE_VOCAB_SIZE} tokens)"
        )
    return ByteTokenizer(config, directory)
