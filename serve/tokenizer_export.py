"""The engine process's one export of its transformers tokenizer for the torch-free HTTP workers (serve.tokenizer):
the fast backend as tokenizer.json (a slow or GGUF tokenizer converted as transformers converts it) plus what
transformers adds, then checked against the original on probe texts, single tokens and chat templates.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from tokenizers import Tokenizer

from serve.tokenizer import TOKENIZER_FILE, TokenizerFacts, WorkerTokenizer

logger = logging.getLogger("serve.tokenizer_export")

PROBE_TEXTS = (
    "Hello world",
    "  leading, trailing and  double  spaces  \n\n\ttabs\r\n",
    "héllo wörld 東京 日本語 한국어 😀 🎉 ❤️ — € ∞",
    "def f(x):\n    return x ** 2  # 3.14159, 1e-5, 1234567890",
    "I can't do it , he's here . we're ... you'll see ? they've gone !",
)
PROBE_CHATS = (
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo 東京"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ],
)
_SINGLE_IDS = 512  # the first ids decoded one by one (byte tokens, specials and common pieces)


class ExportError(Exception):
    """The tokenizer cannot be exported, or the export would not reproduce it."""


def _backend(tokenizer: Any) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        try:
            from transformers.convert_slow_tokenizer import convert_slow_tokenizer

            backend = convert_slow_tokenizer(tokenizer)
        except Exception as e:  # no converter for this class, or it failed: the workers keep transformers
            raise ExportError(f"{type(tokenizer).__name__} has no `tokenizers` form: {e}") from e
    copy = Tokenizer.from_str(backend.to_str())  # never the live one: transformers sets truncation/padding on it
    copy.no_truncation()
    copy.no_padding()
    return copy


def _facts(tokenizer: Any, backend: Tokenizer) -> TokenizerFacts:
    allowed = True
    if hasattr(tokenizer, "backend_tokenizer") and type(backend.model).__name__ == "BPE":
        # transformers' fast tokenizers skip the clean-up for BPE (it corrupts text) unless told to corrupt
        allowed = bool(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", 0))
    template = getattr(tokenizer, "chat_template", None)
    return TokenizerFacts(
        chat_template=dict(template) if isinstance(template, dict) else template,
        special_tokens_map={k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        all_special_ids=[int(i) for i in tokenizer.all_special_ids],
        clean_up_tokenization_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        clean_up_allowed=allowed,
        split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
        source=str(getattr(tokenizer, "name_or_path", "")),
    )


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except Exception:  # a template may refuse a probe chat: then both must refuse it
        return "error", None


def verify(original: Any, worker: WorkerTokenizer) -> None:
    """Raise ExportError at the first probe where `worker` differs from transformers' `original`."""
    if worker.chat_template != getattr(original, "chat_template", None):
        raise ExportError("the chat template differs from transformers'")
    if worker.all_special_ids != list(original.all_special_ids) or worker.special_tokens_map != dict(
        original.special_tokens_map
    ):
        raise ExportError("the special tokens differ from transformers'")
    specials = " ".join(worker.special_tokens_map.values())
    probe_ids: set[int] = set()
    for text in (*PROBE_TEXTS, f"{specials} x {specials}y"):
        for add in (True, False):
            want = list(original(text, add_special_tokens=add)["input_ids"])
            got = worker(text, add_special_tokens=add, return_offsets_mapping=True)
            if got["input_ids"] != want:
                raise ExportError(f"{text!r} encodes to {got['input_ids']}, transformers says {want}")
            try:
                offsets = original(text, add_special_tokens=add, return_offsets_mapping=True)["offset_mapping"]
            except NotImplementedError:  # a slow tokenizer has no offsets
                offsets = got["offset_mapping"]
            if [tuple(o) for o in offsets] != [tuple(o) for o in got["offset_mapping"]]:
                raise ExportError(f"the offsets of {text!r} differ from transformers'")
            for skip in (False, True):
                if worker.decode(want, skip_special_tokens=skip) != original.decode(want, skip_special_tokens=skip):
                    raise ExportError(f"{want} decodes differently (skip_special_tokens={skip})")
            probe_ids.update(want)
    singles = probe_ids | set(worker.all_special_ids) | set(range(min(len(worker), _SINGLE_IDS)))
    for i in sorted(singles):
        if worker.decode([i]) != original.decode([i], skip_special_tokens=False):
            raise ExportError(f"token {i} decodes to {worker.decode([i])!r}, not {original.decode([i])!r}")
    templates = worker.chat_template
    named = templates if isinstance(templates, dict) else {"": templates} if templates else {}
    for template in named.values():
        for chat in PROBE_CHATS:
            kwargs = dict(chat_template=template, tokenize=False, add_generation_prompt=True)
            want = _outcome(lambda: original.apply_chat_template(chat, **kwargs))  # noqa: B023 (called at once)
            got = _outcome(lambda: worker.apply_chat_template(chat, **kwargs))  # noqa: B023
            if got != want:
                raise ExportError(f"the chat template renders {got[1]!r}, transformers renders {want[1]!r}")


def export_tokenizer(tokenizer: Any, directory: str) -> WorkerTokenizer:
    """Write `tokenizer` (transformers') to the new `directory` and verify it; ExportError leaves nothing behind."""
    os.makedirs(directory)
    try:
        backend = _backend(tokenizer)
        backend.save(os.path.join(directory, TOKENIZER_FILE))
        _facts(tokenizer, backend).write(directory)
        worker = WorkerTokenizer.load(directory)
        verify(tokenizer, worker)
        return worker
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def export_for_workers(tokenizer: Any, directory: str | None) -> str | None:
    """The exported directory, or None (nowhere to write, or not exportable: the workers then load transformers)."""
    if not directory:
        return None
    try:
        export_tokenizer(tokenizer, directory)
    except Exception as e:  # whatever the tokenizer does, the workers can still load it the old way
        reason = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {e}"
        logger.warning("the HTTP workers will load the tokenizer with transformers (and torch): %s", reason)
        return None
    return directory
