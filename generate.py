"""Chat with (or complete text from) a model, optionally with a trained adapter.

    python generate.py --model DIR|FILE.gguf --prompt "What is the capital of France?" --greedy
    python generate.py --adapter runs/lora/adapter          # interactive chat (no --prompt)
    python generate.py --adapter runs/lora/adapter --prompts heldout.jsonl --compare-base --greedy

Only the completion goes to stdout; logs go to stderr.
"""
import argparse
import sys
import time

import torch

from model import CheckpointError, load_pretrained, load_tokenizer
from model.sampling import generate
from model.tokenizer import BUILTIN_TEMPLATES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", help="a PEFT adapter dir saved by train.py (or by HF PEFT)")
    ap.add_argument("--prompt", help="one prompt; without it, an interactive chat loop")
    ap.add_argument("--prompts", help="a file of chats in any format train.py reads: answer each one's conversation "
                    "up to its first assistant turn")
    ap.add_argument("--compare-base", action="store_true", help="with --adapter and --prompts: also the base "
                    "model's answers (before / after)")
    ap.add_argument("--system", help="system message (default: the chat template's own)")
    ap.add_argument("--raw", action="store_true", help="no chat template: complete the prompt text as is")
    ap.add_argument("--template", choices=sorted(BUILTIN_TEMPLATES), help="built-in chat template to use "
                    "instead of the model's own")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def load(args, adapter: bool = True):
    if args.model is None and args.adapter:  # an adapter remembers the base it was trained on
        import json
        from pathlib import Path
        cfg = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
        args.model = cfg.get("base_model_name_or_path")
    if args.model is None:
        from model.gguf import default_model
        args.model = str(default_model())
    model = load_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    tok = load_tokenizer(args.model)
    if args.adapter and adapter:
        model = with_adapter(model, args)
    return model, tok


def with_adapter(model, args):
    import peft
    return peft.load_adapter(model, args.adapter).eval()


def answer_file(args, model, tok, temperature, gen):
    """--prompts: one block per chat record, "Q: <last user turn>" then the answer(s)."""
    from data import DataError, read_records
    try:
        chats = [p for _, kind, p in read_records([args.prompts]) if kind == "chat"]
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
    chats = [c[:next((i for i, m in enumerate(c) if m["role"] == "assistant"), len(c))] for c in chats]

    def answers(m):
        return [tok.decode(generate(m, tok.encode(tok.apply_chat_template(c, add_generation_prompt=True,
                                                                           template=args.template),
                                                  add_special_tokens=False),
                                    args.max_new_tokens, tok.stop_ids, temperature, args.top_k, args.top_p, gen))
                for c in chats]
    before = answers(model) if args.compare_base and args.adapter else None
    after = answers(with_adapter(model, args) if before is not None else model)
    for i, c in enumerate(chats):
        q = next((m["content"] for m in reversed(c) if m["role"] == "user"), "")
        print(f"Q: {q}\n" + (f"  before: {before[i]}\n  after:  {after[i]}\n" if before else f"  A: {after[i]}\n"))


def main(argv=None):
    args = parse_args(argv)
    if args.compare_base and not (args.adapter and args.prompts):
        sys.exit("error: --compare-base needs --adapter and --prompts")
    try:
        model, tok = load(args, adapter=not args.compare_base)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    temperature = 0.0 if args.greedy else args.temperature
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.prompts:
        return answer_file(args, model, tok, temperature, gen)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def reply(user_text: str, stream) -> str:
        if args.raw:
            ids = tok.encode(user_text)
        else:
            history.append({"role": "user", "content": user_text})
            ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True, template=args.template),
                             add_special_tokens=False)
        printed = ""

        def on_token(out):  # stream the text decoded so far, holding back an incomplete UTF-8 character
            nonlocal printed
            text = tok.decode(out)
            if not text.endswith("\ufffd"):
                stream.write(text[len(printed):])
                stream.flush()
                printed = text

        t0 = time.perf_counter()
        out = generate(model, ids, args.max_new_tokens, tok.stop_ids, temperature, args.top_k, args.top_p, gen,
                       on_token)
        text = tok.decode(out)
        stream.write(text[len(printed):] + "\n")
        stream.flush()
        dt = time.perf_counter() - t0
        print(f"[{len(out)} tokens, {len(out) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
        if not args.raw:
            history.append({"role": "assistant", "content": text})
        return text

    if args.prompt is not None:
        reply(args.prompt, sys.stdout)
        return
    print("chat (Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if user.strip():
            reply(user, sys.stdout)


if __name__ == "__main__":
    main()
