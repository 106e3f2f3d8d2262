"""The workers' chat templates (serve.chat_template through serve.tokenizer) render exactly what transformers'
`apply_chat_template` renders, or refuse what it refuses: the test models' templates, templates in the styles of
Llama 3.1, Qwen2.5 (tools) and Mistral (raise_exception), every template helper, named templates, and the embedded
default model's (SmolLM2, from its GGUF file).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError, TemplateError

from engine.model_source import load_tokenizer, resolve_model
from serve.tokenizer_export import export_tokenizer
from tests.serve.chat_templates import FEATURES, LLAMA3, MISTRAL, QWEN25
from tests.serve.tokenizer_support import TEXTS, Pair, exported
from tests.support.served_app import CHAT_TEMPLATE as SERVE_TEMPLATE
from tests.support.tiny_tokenizer import CHAT_TEMPLATE as ENGINE_TEMPLATE

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city — «today»",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {"type": "object"}}},
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京", "unit": "C"}}}
CHATS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hi"}],
    "system": [
        {"role": "system", "content": "  Be brief & <exact>.  "},
        {"role": "user", "content": "héllo 東京 😀"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?\n"},
    ],
    "tool_calls": [
        {"role": "system", "content": "You call tools."},
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "tool", "name": "get_weather", "content": "second"},
        {"role": "assistant", "content": "21 °C"},
    ],
    "not_alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "system_only": [{"role": "system", "content": "Alone."}],
    "rich": [
        {"role": "skip", "content": "never shown"},
        {"role": "user", "content": [{"type": "text", "text": "part 1, "}, {"type": "text", "text": "part 2"}]},
        {"role": "assistant", "content": "ok", "reasoning": "because", "meta": {"b": [1, 2.5, None], "a": "ü"}},
        {"role": "user", "content": "last"},
        {"role": "stop", "content": "ends the loop"},
        {"role": "user", "content": "after the stop"},
    ],
}
DOCUMENTS = [{"title": "Paris", "text": "The capital of France."}, {"title": "東京", "text": "日本の首都"}]
CASES: list[tuple[str, str, str, dict[str, Any], bool]] = [  # id, template, chat, kwargs, renders (else refuses)
    ("engine", ENGINE_TEMPLATE, "system", {}, True),
    ("serve", SERVE_TEMPLATE, "system", {}, True),
    ("llama3", LLAMA3, "system", {}, True),
    ("llama3-tools", LLAMA3, "tool_calls", {"tools": TOOLS}, True),
    ("llama3-tools-in-system", LLAMA3, "tool_calls", {"tools": TOOLS, "tools_in_user_message": False}, True),
    ("llama3-date", LLAMA3, "user", {"date_string": "01 Jan 2030"}, True),
    ("llama3-no-user-for-tools", LLAMA3, "system_only", {"custom_tools": TOOLS}, False),
    ("qwen25", QWEN25, "system", {}, True),
    ("qwen25-tools", QWEN25, "tool_calls", {"tools": TOOLS}, True),
    ("mistral", MISTRAL, "system", {}, True),
    ("mistral-refuses", MISTRAL, "not_alternating", {}, False),
    ("mistral-refuses-tools", MISTRAL, "tool_calls", {}, False),
    ("features", FEATURES, "rich", {"documents": DOCUMENTS, "tools": TOOLS, "extra_var": {"k": "v"}}, True),
    ("features-thinking-off", FEATURES, "system", {"enable_thinking": False, "add_generation_prompt": False}, True),
    ("features-kwarg-over-special", FEATURES, "user", {"bos_token": "<override>"}, True),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return exported("metaspace", tmp_path_factory.mktemp("chat"), chat_template=SERVE_TEMPLATE)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("error", exception class name, and the message where a template raised it)."""
    try:
        return "ok", call()
    except TemplateError as e:
        return "error", (type(e).__name__, str(e))
    except Exception as e:
        return "error", type(e).__name__


def same(pair: Pair, conversation: Any, **kwargs: Any) -> tuple[str, Any]:
    """Render through both (each with its own copy of the inputs); they must agree. Returns the outcome."""
    want = outcome(lambda: pair.oracle.apply_chat_template(copy.deepcopy(conversation), **copy.deepcopy(kwargs)))
    got = outcome(lambda: pair.worker.apply_chat_template(copy.deepcopy(conversation), **copy.deepcopy(kwargs)))
    assert got == want
    return got


@pytest.mark.parametrize(("template", "chat", "kwargs", "renders"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_templates_render_as_in_transformers(
    pair: Pair, template: str, chat: str, kwargs: dict[str, Any], renders: bool
) -> None:
    options = {"add_generation_prompt": True, **kwargs}
    result = same(pair, CHATS[chat], chat_template=template, tokenize=False, **options)
    assert (result[0] == "ok") == renders, result
    ids = same(pair, CHATS[chat], chat_template=template, tokenize=True, return_dict=False, **options)
    if renders:
        assert ids == ("ok", pair.oracle(result[1], add_special_tokens=False)["input_ids"])


def test_continue_final_message_and_batches(pair: Pair) -> None:
    prefill = [*CHATS["system"], {"role": "assistant", "content": "The answer is "}]
    for template in (SERVE_TEMPLATE, QWEN25, FEATURES):
        assert same(pair, prefill, chat_template=template, tokenize=False, continue_final_message=True)[0] == "ok"
    thinking = [*CHATS["user"], {"role": "assistant", "content": "", "reasoning_content": "Let me "}]
    assert same(pair, thinking, chat_template=FEATURES, tokenize=False, continue_final_message="reasoning_content")
    # refused alike: with a generation prompt, an empty chat, a field the template never reads
    same(pair, prefill, chat_template=QWEN25, tokenize=False, continue_final_message=True, add_generation_prompt=True)
    same(pair, [], chat_template=QWEN25, tokenize=False)
    same(pair, prefill, chat_template=QWEN25, tokenize=False, continue_final_message="nowhere")
    batch = [CHATS["user"], CHATS["system"]]
    assert same(pair, batch, chat_template=QWEN25, tokenize=False, add_generation_prompt=True)[0] == "ok"
    assert same(pair, batch, chat_template=QWEN25, tokenize=True, add_generation_prompt=True)[0] == "ok"


def test_the_tokenizers_own_and_named_templates(tmp_path: Path) -> None:
    named = exported("byte_bpe", tmp_path, chat_template={"default": MISTRAL, "tool_use": QWEN25, "raw": FEATURES})
    assert isinstance(named.worker.chat_template, dict) and named.worker.chat_template == named.oracle.chat_template
    chat = CHATS["system"]
    plain = same(named, chat, tokenize=False)
    assert plain == ("ok", named.worker.apply_chat_template(chat, chat_template=MISTRAL, tokenize=False))
    with_tools = same(named, chat, tools=TOOLS, tokenize=False)  # "tool_use" when tools are given
    qwen = named.worker.apply_chat_template(chat, tools=TOOLS, chat_template=QWEN25, tokenize=False)
    assert with_tools == ("ok", qwen)
    same(named, chat, chat_template="raw", tokenize=False)  # by name
    same(named, chat, chat_template="{{ messages | length }}", tokenize=False)  # a template's own text
    no_default = exported("wordpiece", tmp_path, chat_template={"tool_use": QWEN25})
    assert same(no_default, chat, tokenize=False)[0] == "error"
    assert same(no_default, chat, tools=TOOLS, tokenize=False)[0] == "ok"
    own = exported("metaspace", tmp_path / "own", chat_template=LLAMA3)
    assert same(own, chat, tokenize=False, add_generation_prompt=True)[0] == "ok"
    own.worker.chat_template = None  # as tests/serve does to a transformers tokenizer
    own.oracle.chat_template = None
    assert same(own, chat, tokenize=False) == ("error", "ValueError")


def test_the_sandbox_holds(pair: Pair) -> None:
    escapes = [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__ }}",
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
        "{{ namespace(_x=1) }}",
        "{{ dict.__init__ }}",
        "{{ raise_exception('refused: ' ~ messages[0].content) }}",
    ]
    for template in escapes:
        result = same(pair, CHATS["user"], chat_template=template, tokenize=False)
        assert result[0] == "error" or "class" not in str(result[1]), template
    with pytest.raises(SecurityError):
        pair.worker.apply_chat_template(CHATS["user"], chat_template=escapes[2], tokenize=False)


def test_inputs_are_not_modified(pair: Pair) -> None:
    for name, template in (("rich", FEATURES), ("tool_calls", QWEN25)):
        chat = copy.deepcopy(CHATS[name])
        pair.worker.apply_chat_template(chat, chat_template=template, tools=TOOLS, tokenize=False)
        assert chat == CHATS[name]
    chat = copy.deepcopy(CHATS["tool_calls"])
    pair.worker.apply_chat_template(chat, chat_template=QWEN25, tokenize=False, continue_final_message=True)
    assert chat == CHATS["tool_calls"]


@pytest.mark.slow
def test_the_default_models_tokenizer(tmp_path: Path) -> None:
    """SmolLM2's GGUF tokenizer, exported as the engine process exports it: its template, ids, offsets, every
    token's text."""
    oracle = load_tokenizer(resolve_model(None))
    default = Pair(oracle, export_tokenizer(oracle, str(tmp_path / "tokenizer")))
    for chat in ("user", "system"):
        for prompt in (True, False):
            assert same(default, CHATS[chat], tokenize=False, add_generation_prompt=prompt)[0] == "ok"
    for chat in ("tool_calls", "rich"):  # content missing or a list: refused alike
        same(default, CHATS[chat], tokenize=False)
    for text in TEXTS + default.special_texts():
        want = oracle(text, return_offsets_mapping=True)
        got = default.worker(text, return_offsets_mapping=True)
        assert got["input_ids"] == want["input_ids"]
        assert got["offset_mapping"] == [tuple(o) for o in want["offset_mapping"]]
        assert default.worker.decode(got["input_ids"], skip_special_tokens=True) == oracle.decode(
            want["input_ids"], skip_special_tokens=True
        )
    for i in range(len(oracle)):
        assert default.worker.decode([i]) == oracle.decode([i]), i
