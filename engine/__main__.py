"""CLI: `python -m engine "What is the capital of France?"` answers with the default model."""

from __future__ import annotations

import argparse

from engine import LLM, SamplingParams


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    ap.add_argument("prompt", help="the user message (sent through the model's chat template)")
    ap.add_argument("--model", default=None, help="model dir, .gguf file or hub id (default: SmolLM2-135M)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.raw or not getattr(llm.tokenizer, "chat_template", None):
        out = llm.generate(args.prompt, params)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    print(out.text.strip())


if __name__ == "__main__":
    main()
