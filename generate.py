"""Chat with (or complete text from) a model, optionally with a trained adapter.

    python generate.py --model DIR|FILE.gguf --prompt "What is the capital of France?" --greedy
    python generate.py --adapter runs/lora/adapter          # interactive chat (no --prompt)
    python generate.py --adapter runs/lora/adapter --prompts heldout.jsonl --compare-base --greedy

Only the completion goes to stdout; logs go to stderr.
"""
import argparse
import math
import os
import sys
import time

import torch
from jinja2 import TemplateError

from model import CheckpointError, load_pretrained, load_tokenizer
from model.io import check_device
from model.sampling import generate
from model.tokenizer import BUILTIN_TEMPLATES
from model.weights import first_line

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error here (argparse's own adds the usage above it)
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--temperature", type=float, default=0.7, help=">= 0; 0 = greedy")
    ap.add_argument("--top-p", type=float, default=0.9, help="in (0, 1]; 1 = off")
    ap.add_argument("--top-k", type=int, default=0, help=">= 0; 0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: bf16 on CUDA, else fp32)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    valid = [("--max-new-tokens", args.max_new_tokens >= 1, "an integer >= 1"),
             ("--temperature", math.isfinite(args.temperature) and args.temperature >= 0, "a finite number >= 0"),
             ("--top-p", 0 < args.top_p <= 1, "a number in (0, 1]"),  # false for nan too
             ("--top-k", args.top_k >= 0, "an integer >= 0"),
             ("--seed", 0 <= args.seed < 2**64, "an integer in 0 .. 2**64-1")]
    for flag, ok, expected in valid:
        if not ok:
            ap.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: expected {expected}")
    if args.raw and args.prompt == "":
        ap.error("--raw --prompt '': an empty prompt has nothing to continue")
    return args


def load(args, adapter: bool = True):
    check_device(args.device)  # before anything is read or converted: a device problem, said as one
    if args.model is None and args.adapter:  # an adapter remembers the base it was trained on
        import peft
        args.model = peft.read_adapter(args.adapter)[0].base_model_name_or_path
    if args.model is None:
        from model.gguf import default_model
        args.model = str(default_model())
    model = load_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    try:
        tok = load_tokenizer(args.model)
    except ValueError:
        raise
    except Exception as e:  # the tokenizers / sentencepiece libraries' own errors for a file they can't parse
        raise ValueError(f"{args.model}: cannot load the tokenizer ({first_line(e)})") from None
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
        chats = [p.with_system(args.system) for _, kind, p in read_records([args.prompts]) if kind == "chat"]
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
    chats = [(c[:next((i for i, m in enumerate(c) if m["role"] == "assistant"), len(c))], c.tools) for c in chats]

    def answers(m):
        return [tok.decode(generate(m, tok.encode(tok.apply_chat_template(c, add_generation_prompt=True,
                                                                           template=args.template, tools=tools),
                                                  add_special_tokens=False),
                                    args.max_new_tokens, tok.stop_ids, temperature, args.top_k, args.top_p, gen))
                for c, tools in chats]
    before = answers(model) if args.compare_base and args.adapter else None
    try:
        model = with_adapter(model, args) if before is not None else model
    except ValueError as e:
        sys.exit(f"error: {e}")
    after = answers(model)
    for i, (c, _) in enumerate(chats):
        q = next((m["content"] for m in reversed(c) if m["role"] == "user"), "")
        print(f"Q: {q}\n" + (f"  before: {before[i]}\n  after:  {after[i]}\n" if before else f"  A: {after[i]}\n"))


def main(argv=None):
    args = parse_args(argv)
    if args.compare_base and not (args.adapter and args.prompts):
        sys.exit("error: --compare-base needs --adapter and --prompts")
    try:
        model, tok = load(args, adapter=not args.compare_base)
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    temperature = 0.0 if args.greedy else args.temperature
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.prompts:
        return answer_file(args, model, tok, temperature, gen)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def reply(user_text: str, stream) -> str:
        """Answer one turn, streamed to `stream`. A prompt that can't be answered is a one-line ValueError."""
        if args.raw:
            ids = tok.encode(user_text)
        else:
            turn = [*history, {"role": "user", "content": user_text}]
            try:
                ids = tok.encode(tok.apply_chat_template(turn, add_generation_prompt=True, template=args.template),
                                 add_special_tokens=False)
            except TemplateError as e:  # the model's own template may refuse a conversation (raise_exception)
                raise ValueError(f"the chat template: {first_line(e)}") from None
        if not ids:
            raise ValueError(f"{user_text!r} encodes to no tokens: nothing to continue")
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
            history.extend([{"role": "user", "content": user_text}, {"role": "assistant", "content": text}])
        return text

    if args.prompt is not None:
        try:
            reply(args.prompt, sys.stdout)
        except ValueError as e:
            sys.exit(f"error: {e}")
        return
    print("chat (Ctrl-D to quit)", file=sys.stderr)
    for user in read_lines(getattr(sys.stdin, "buffer", None)):
        if user.strip():
            try:
                reply(user, sys.stdout)
            except ValueError as e:  # report it and go on chatting
                print(f"error: {e}", file=sys.stderr)


def read_lines(stream):
    """The user's lines from the byte stream `stream` (stdin), as text, until end of input. A line that is not
    UTF-8 (a terminal in another encoding, pasted binary) is reported and skipped: it never ends the chat."""
    while stream is not None:
        print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            print(file=sys.stderr)
            return
        try:
            yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            print(f"error: that line is not UTF-8 text (byte {line[e.start]:#04x} at position {e.start}); it was "
                  f"not sent, type it again", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C, at the prompt or while answering: stop, no traceback
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
