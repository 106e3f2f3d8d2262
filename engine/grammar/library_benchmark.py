"""Grammar libraries side by side on one tokenizer: llguidance, xgrammar and outlines-core (docs/structured-output.md).

Per schema: the time from a schema to the first token mask, and the mean cost of a mask after each token; per JSON
Schema feature: whether the library compiles it and whether every output of random constrained walks validates.
Prints a table and writes JSON. `python -m engine.grammar.library_benchmark [--tokenizer DIR] [--out FILE]`
(the default tokenizer is the embedded default model's; the libraries not installed are reported as such).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Walker = tuple[Callable[[np.ndarray], None], Callable[[int], bool], Callable[[], bool]]  # fill, accept, finished

_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
}
_TOOLS = {  # the shape a tool call is constrained to: one of the functions, with its arguments
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "name": {"const": f"tool_{i}"},
                "arguments": _PERSON
                if i == 0
                else {
                    "type": "object",
                    "properties": {f"p{j}": {"type": "integer"} for j in range(5)},
                    "required": ["p0"],
                },
            },
            "required": ["name", "arguments"],
        }
        for i in range(8)
    ]
}
_WIDE = {
    "type": "object",
    "properties": {f"field_{i}": {"enum": [f"v{i}_{k}" for k in range(10)]} for i in range(60)},
    "required": [f"field_{i}" for i in range(0, 60, 2)],
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested": _PERSON,
    "tool_calls_8": _TOOLS,
    "wide_60_enums": _WIDE,
}
_TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["v"],
        }
    },
    "$ref": "#/$defs/node",
}


def _obj(prop: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"x": prop}, "required": ["x"], "additionalProperties": False, **extra}


FEATURES: dict[str, dict[str, Any]] = {
    "integer min/max": _obj({"type": "integer", "minimum": -5, "maximum": 300}),
    "number min/max": _obj({"type": "number", "minimum": 0.5, "maximum": 2.5}),
    "exclusiveMinimum": _obj({"type": "integer", "exclusiveMinimum": 10}),
    "multipleOf": _obj({"type": "integer", "multipleOf": 5}),
    "string min/maxLength": _obj({"type": "string", "minLength": 2, "maxLength": 5}),
    "pattern": _obj({"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}),
    "format date-time": _obj({"type": "string", "format": "date-time"}),
    "format email": _obj({"type": "string", "format": "email"}),
    "format uuid": _obj({"type": "string", "format": "uuid"}),
    "enum": _obj({"enum": ["red", "green", 3, None]}),
    "const": _obj({"const": "fixed"}),
    "type list (nullable)": _obj({"type": ["string", "null"]}),
    "anyOf": _obj({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}),
    "oneOf": _obj({"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}),
    "allOf": _obj({"allOf": [{"type": "integer"}, {"minimum": 3, "maximum": 9}]}),
    "$ref recursive": _TREE,
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "patternProperties": {
        "type": "object",
        "patternProperties": {"^k[0-9]$": {"type": "integer"}},
        "additionalProperties": False,
    },
    "min/maxItems": _obj({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}),
    "prefixItems": _obj({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False}),
    "uniqueItems": _obj({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True}),
    "min/maxProperties": {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "minProperties": 1,
        "maxProperties": 2,
    },
    "not": _obj({"not": {"type": "string"}}),
    "if/then/else": _obj({"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 9}, "else": {"maximum": -9}}),
}


@functools.cache
def _byte_table() -> dict[str, int]:
    """GPT-2's printable character of each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


def _bytes_of_token(token: str) -> bytes:
    """A byte-level BPE token string -> its bytes."""
    table = _byte_table()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode()


class Library:
    """One library's adapter: compile(schema JSON) -> handle; walker(handle) -> fill/accept/finished."""

    name = ""

    def __init__(self, tokenizer: Any, vocab: int, eos: int) -> None:
        self.tokenizer, self.vocab, self.eos = tokenizer, vocab, eos

    def compile(self, schema: str) -> Any: ...

    def walker(self, handle: Any) -> Walker: ...


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int, eos: int) -> None:
        super().__init__(tokenizer, vocab, eos)
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)

    def compile(self, schema: str) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        return grammar

    def walker(self, handle: Any) -> Walker:
        m = self.ll.LLMatcher(self.tok, handle, log_level=0)
        return (lambda mask: m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)), m.consume_token, m.is_stopped


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int, eos: int) -> None:
        super().__init__(tokenizer, vocab, eos)
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def walker(self, handle: Any) -> Walker:
        m = self.xgr.GrammarMatcher(handle)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)

        def fill(mask: np.ndarray) -> None:
            m.fill_next_token_bitmask(bitmask, 0)
            mask[:] = bitmask[0].numpy()

        return fill, m.accept_token, m.is_terminated


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tokenizer: Any, vocab: int, eos: int) -> None:
        super().__init__(tokenizer, vocab, eos)
        import outlines_core

        self.oc = outlines_core
        special = set(tokenizer.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i not in special and i < vocab:
                tokens.setdefault(_bytes_of_token(token), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema: str) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(schema), self.vocabulary)

    def walker(self, handle: Any) -> Walker:
        guide = self.oc.Guide(handle)

        def fill(mask: np.ndarray) -> None:
            mask[:] = 0
            guide.write_mask_into(mask.ctypes.data, mask.size, 4)

        def accept(token: int) -> bool:
            guide.advance(token)
            return True

        return fill, accept, guide.is_finished


def walk(lib: Library, handle: Any, rng: np.random.Generator, closers: np.ndarray, budget: int) -> dict[str, Any]:
    """One random constrained generation: a random allowed token each step, half the time one that can close
    something (so walks end), EOS half the time it is allowed."""
    fill, accept, finished = lib.walker(handle)
    mask = np.zeros((lib.vocab + 31) // 32, dtype=np.int32)
    ids: list[int] = []
    mask_s, masks = 0.0, 0
    for _ in range(budget):
        t0 = time.perf_counter()
        fill(mask)
        mask_s += time.perf_counter() - t0
        masks += 1
        allowed = np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[: lib.vocab])[0]
        if not len(allowed):
            return {"ids": ids, "end": "dead", "mask_s": mask_s, "masks": masks}
        if lib.eos in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            return {"ids": ids, "end": "eos", "mask_s": mask_s, "masks": masks}
        allowed = allowed[allowed != lib.eos]
        close = allowed[closers[allowed]]
        token = int(rng.choice(close if len(close) and rng.random() < 0.5 else allowed))
        if not accept(token):
            return {"ids": ids, "end": "rejected", "mask_s": mask_s, "masks": masks}
        ids.append(token)
        if finished():
            return {"ids": ids, "end": "finished", "mask_s": mask_s, "masks": masks}
    return {"ids": ids, "end": "budget", "mask_s": mask_s, "masks": masks}


def _outputs_valid(lib: Library, schema: dict[str, Any], walks: list[dict[str, Any]]) -> tuple[int, int]:
    """(walks that ended, of them how many parse and validate)."""
    import jsonschema

    ended = valid = 0
    for w in walks:
        if w["end"] not in ("eos", "finished"):
            continue
        ended += 1
        ids = [i for i in w["ids"] if i != lib.eos]
        try:
            jsonschema.validate(json.loads(lib.tokenizer.decode(ids, skip_special_tokens=True)), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return ended, valid


def measure(lib: Library, schema: dict[str, Any], walks: int, budget: int, closers: np.ndarray) -> dict[str, Any]:
    text = json.dumps(schema)
    t0 = time.perf_counter()
    try:
        handle = lib.compile(text)
        fill, _, _ = lib.walker(handle)
        fill(np.zeros((lib.vocab + 31) // 32, dtype=np.int32))
    except Exception as e:  # the library refuses the schema
        return {"compiled": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    first_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(0)
    done = [walk(lib, handle, rng, closers, budget) for _ in range(walks)]
    ended, valid = _outputs_valid(lib, schema, done)
    mask_s, masks = sum(w["mask_s"] for w in done), sum(w["masks"] for w in done)
    return {
        "compiled": True,
        "first_mask_ms": first_ms,
        "mask_us": 1e6 * mask_s / max(1, masks),
        "ended": ended,
        "valid": valid,
        "walks": walks,
    }


def _verdict(r: dict[str, Any]) -> str:
    if not r["compiled"]:
        return "refused"
    if r["ended"] == 0:
        return "no output"
    return "enforced" if r["valid"] == r["ended"] else f"NOT enforced ({r['ended'] - r['valid']}/{r['ended']} bad)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="a tokenizer directory (default: the embedded default model's)")
    ap.add_argument("--walks", type=int, default=12)
    ap.add_argument("--budget", type=int, default=300, help="tokens per walk")
    ap.add_argument("--out", default="grammar-libraries.json")
    args = ap.parse_args(argv)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from engine.model_source import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(None))
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    closers = np.array([any(c in tokenizer.decode([i]) for c in '"}]0123456789,') for i in range(vocab)])
    libs: list[Library] = []
    report: dict[str, Any] = {"tokenizer": args.tokenizer or "default", "vocab": vocab, "libraries": {}}
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            t0 = time.perf_counter()
            libs.append(cls(tokenizer, vocab, eos))
            report["libraries"][cls.name] = {"tokenizer_setup_ms": (time.perf_counter() - t0) * 1e3}
        except ImportError as e:
            report["libraries"][cls.name] = {"missing": str(e)}
    print(f"vocabulary {vocab}; schema -> first mask (ms) / mean mask per token (us) / outputs valid")
    print(f"{'schema':<16}" + "".join(f"{lib.name:>32}" for lib in libs))
    for name, schema in SCHEMAS.items():
        cells = []
        for lib in libs:
            r = report["libraries"][lib.name].setdefault("schemas", {})[name] = measure(
                lib, schema, args.walks, args.budget, closers
            )
            cells.append(
                f"{r['first_mask_ms']:.1f} / {r['mask_us']:.0f} / {r['valid']}/{r['ended']}"
                if r["compiled"]
                else "refused"
            )
        print(f"{name:<16}" + "".join(f"{c:>32}" for c in cells))
    print(f"\n{'feature':<28}" + "".join(f"{lib.name:>26}" for lib in libs))
    for name, schema in FEATURES.items():
        cells = []
        for lib in libs:
            r = report["libraries"][lib.name].setdefault("features", {})[name] = measure(
                lib, schema, args.walks, args.budget, closers
            )
            r["verdict"] = _verdict(r)
            cells.append(r["verdict"])
        print(f"{name:<28}" + "".join(f"{c:>26}" for c in cells))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
