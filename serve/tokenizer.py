"""The HTTP workers' tokenizer: the model's `tokenizers` backend plus jinja2 chat templates, read from the directory
the engine process exported (serve.tokenizer_export), so no worker imports torch or transformers.

It has the part of transformers' tokenizer interface the app uses: `tok(text)["input_ids"]` (and offsets),
`decode`, `all_special_ids`, the special tokens, `chat_template` and `apply_chat_template`, with the same results.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenizers import Tokenizer

from serve.chat_template import normalize_messages, render

TOKENIZER_FILE = "tokenizer.json"  # the backend, as tokenizers serializes it (no truncation, no padding)
FACTS_FILE = "worker_tokenizer.json"  # TokenizerFacts
FORMAT = 1
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip
ChatTemplate = str | dict[str, str] | None


@dataclass(frozen=True)
class TokenizerFacts:
    """What transformers adds to the backend: the chat template(s), the named special tokens and the decode options."""

    chat_template: ChatTemplate
    special_tokens_map: dict[str, str]  # bos_token, eos_token, ...: what templates see as variables
    all_special_ids: list[int]
    clean_up_tokenization_spaces: bool  # decode's default
    clean_up_allowed: bool = True  # transformers never cleans up after a BPE model (unless told to corrupt)
    split_special_tokens: bool = False  # special tokens in text are encoded as plain text
    source: str = ""  # the model it came from, for messages
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, FACTS_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, ensure_ascii=False, indent=1)

    @classmethod
    def read(cls, directory: str) -> TokenizerFacts:
        with open(os.path.join(directory, FACTS_FILE), encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise ValueError(f"{directory}: tokenizer export format {data.get('format')!r}, expected {FORMAT}")
        return cls(**data)


class WorkerTokenizer:
    def __init__(self, backend: Tokenizer, facts: TokenizerFacts) -> None:
        self.backend = backend
        self.backend.encode_special_tokens = facts.split_special_tokens
        self.facts = facts
        self.chat_template: ChatTemplate = facts.chat_template  # settable, as on transformers' tokenizers
        self.special_tokens_map = dict(facts.special_tokens_map)
        self.all_special_ids = list(facts.all_special_ids)
        self.name_or_path = facts.source
        self.is_fast = True

    @classmethod
    def load(cls, directory: str) -> WorkerTokenizer:
        """The tokenizer serve.tokenizer_export wrote to `directory`."""
        return cls(Tokenizer.from_file(os.path.join(directory, TOKENIZER_FILE)), TokenizerFacts.read(directory))

    # ---- special tokens -----------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """bos_token, eos_token, pad_token, ... and their *_id, None when the model has none (as transformers)."""
        if name.endswith("_token") or name.endswith("_token_id"):
            token = self.__dict__.get("special_tokens_map", {}).get(name.removesuffix("_id"))
            if not name.endswith("_id") or token is None:
                return token
            return self.backend.token_to_id(token)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def all_special_tokens(self) -> list[str]:
        return [self.backend.id_to_token(i) for i in self.all_special_ids]

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    # ---- encode, decode -----------------------------------------------------------------------

    def __call__(
        self, text: str | list[str], add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> dict[str, Any]:
        """input_ids, attention_mask (and offset_mapping: character spans) for a text or a list of texts."""
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text input must be of type `str` (single example) or `list[str]` (batch)")
        # encode_batch even for one text: it releases the GIL (encode does not), so a long prompt never stalls the
        # worker's other threads, among them the engine client's receiver (stats go stale after a few seconds)
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
        }
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        return out if batched else {k: v[0] for k, v in out.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.facts.clean_up_tokenization_spaces
        if clean and self.facts.clean_up_allowed:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    # ---- chat templates -----------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to use, picked as transformers picks it: a name in a dict of templates or a template's text;
        with no choice, "tool_use" when there are tools and the dict has it, else "default", else the one template."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is not None:
                return chat_template
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                "This model has multiple chat templates with no default specified! Please either pass a chat "
                "template or the name of the template you wish to use to the `chat_template` argument. Available "
                f"template names are {sorted(templates)}."
            )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError(
                "Cannot use chat template functions because tokenizer.chat_template is not set and no template "
                "argument was passed!"
            )
        return templates

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        return_dict: bool = True,
        sanitize_control_tokens: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The rendered text (tokenize=False), else its ids (as a dict with return_dict): one conversation or a list
        of them. `kwargs` become template variables, over the special tokens of the same name."""
        if sanitize_control_tokens:
            raise NotImplementedError("sanitize_control_tokens is not supported by the worker tokenizer")
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        )
        chats = [normalize_messages(c) for c in (conversation if batched else [conversation])]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible.")
        variables = {**self.special_tokens_map, **kwargs}
        texts = [
            render(template, chat, tools, documents, add_generation_prompt, continue_final_message, variables)
            for chat in chats
        ]
        if not tokenize:
            return texts if batched else texts[0]
        out = self(texts if batched else texts[0], add_special_tokens=False)
        return out if return_dict else out["input_ids"]
