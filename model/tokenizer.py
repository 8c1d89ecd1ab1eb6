"""Tokenizers (`tokenizer.json` via `tokenizers`, `tokenizer.model` via sentencepiece) and chat templates.

Chat templates are the model's own Jinja template (`chat_template` in tokenizer_config.json or
`chat_template.jinja`), rendered with the same Jinja settings as transformers' `apply_chat_template`
(trim_blocks, lstrip_blocks, a sandbox, `raise_exception`); models that ship none can use a built-in one.
"""
import contextlib
import functools
import json
import re
import signal
import threading
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '')"
        " + m['content'] | trim + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim"
        " + ' ' + eos_token }}{% endif %}{% endfor %}"),
    # Stanford Alpaca's prompt (its no-input preamble unless a system message is given, "### Instruction:\n",
    # "### Response:\n", EOS after the answer); turns are separated by a blank line
    "alpaca": (
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        "{% set messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. Write a "
        "response that appropriately completes the request.\n\n' }}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token }}"
        "{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
}
# tokens that end an assistant turn in the common templates (generation stops at any of them)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>", "<end_of_turn>")


@functools.cache
def _jinja_env():
    """The one sandboxed environment (built once: compiling a template in a new environment costs milliseconds)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=64)
def _compiled(source: str):
    """A template source compiled once; a data run renders the same one or two templates for every record."""
    return _jinja_env().from_string(source)


# a chat template is code from a model's files: its rendering is bounded in time and output (the sandbox bounds
# what it can reach; a loop over range(100000) inside another one would still run for hours)
TEMPLATE_SECONDS, TEMPLATE_MAX_CHARS = 10.0, 1 << 24


@contextlib.contextmanager
def _time_limit(seconds: float):
    """TemplateError after `seconds` (SIGALRM; only in the main thread, where train.py and generate.py run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise jinja2.exceptions.TemplateError(f"the chat template ran for more than {seconds:g} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def supports_tools(source: str) -> bool:
    """Does a chat template render tool definitions and calls itself (Qwen2.5, Llama 3.1, Mistral, Hermes...)?"""
    return "tool_calls" in source and re.search(r"\btools\b", source) is not None


HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>{}\n</tools>\n\nFor each function call, return "
    "a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def hermes_messages(messages, tools=None) -> list[dict]:
    """The built-in tool rendering for templates without tool support: Qwen2.5's (Hermes-style) text as plain
    messages. Tool definitions are appended to the system message (one is added when there is none; it replaces a
    template's default system prompt), each call becomes `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
    in the assistant's content, and consecutive tool results one user message of `<tool_response>` blocks. On a
    ChatML template this is exactly Qwen2.5's apply_chat_template(tools=...) when the chat has a system message."""
    dump = functools.partial(json.dumps, ensure_ascii=False)
    out = []
    if tools:
        block = HERMES_TOOLS.format("".join("\n" + dump(t) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + block})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "".join('\n<tool_call>\n{"name": "' + c["function"]["name"] + '", "arguments": '
                            + dump(c["function"]["arguments"]) + "}\n</tool_call>" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": m["content"] + calls if m["content"] else calls[1:]})
        elif m["role"] == "tool":
            block = "\n<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += block
            else:
                out.append({"role": "user", "content": block[1:], "_tool": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def _check_tools_rendered(text, messages, tools):
    """A template that says it supports tools must show every tool, call and result: else a one-line error."""
    names = [t.get("function", t).get("name", "") for t in tools or ()]
    names += [c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    missing = next((x for x in names + results if x not in text), None)
    if missing is not None:
        raise ValueError(f"the chat template dropped tool text {missing[:40]!r}: use --template chatml (nanotune's "
                         "built-in Hermes-style tool rendering)")


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    """encode/decode + chat template over either backend. `stop_ids` are EOS plus end-of-turn tokens."""

    def __init__(self, backend, config: dict, chat_template: str | None = None):
        self.backend, self.config = backend, config
        self.is_sp = not hasattr(backend, "token_to_id")  # sentencepiece processor
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.add_bos = bool(config.get("add_bos_token", self.is_sp))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.chat_template = chat_template
        self.bos_id, self.eos_id, self.pad_id = (self.token_to_id(t) for t in
                                                 (self.bos_token, self.eos_token, self.pad_token))
        self.stop_ids = {i for i in [self.eos_id, *map(self.token_to_id, END_OF_TURN)] if i is not None}
        specials = [_token_str(t) for t in (config.get("added_tokens_decoder") or {}).values()]
        self.special_tokens = sorted({s for s in specials + [self.bos_token, self.eos_token] if s}, key=len,
                                     reverse=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_piece_size() if self.is_sp else self.backend.get_vocab_size()

    def token_to_id(self, token):
        if token is None:
            return None
        if self.is_sp:
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.is_sp:
            ids = self._sp_encode(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        if add_special_tokens and self.add_eos and self.eos_id is not None and ids[-1:] != [self.eos_id]:
            ids = ids + [self.eos_id]
        return ids

    def _sp_encode(self, text):
        # sentencepiece knows nothing of special tokens written in text ("<s>", "[INST]"): split them out first
        if not self.special_tokens:
            return self.backend.encode(text)
        ids = []
        for i, part in enumerate(re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)):
            if i % 2:
                ids.append(self.token_to_id(part))
            elif part:
                ids.extend(self.backend.encode(part))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.is_sp:
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            template: str | None = None, tools: list | None = None) -> str:
        """Render a conversation to text. `template`: a built-in name (chatml, llama3, llama2, alpaca) or Jinja.
        `tools`: JSON-schema function definitions, as transformers' apply_chat_template(tools=...)."""
        return self.chat_renderer(template)(messages, add_generation_prompt, tools)

    def chat_renderer(self, template: str | None = None):
        """`render(messages, add_generation_prompt=False, tools=None) -> str` for one template, with the compiled
        template and the special-token variables looked up once (data/encode.py renders 1 + 2 x turns prefixes of
        each record). Tools: as transformers' apply_chat_template(tools=...) for a template that renders them;
        for one that does not, the conversation is first rewritten to the built-in Hermes / Qwen2.5 form
        (`hermes_messages`), so no tool definition, call or result is ever dropped."""
        source = BUILTIN_TEMPLATES.get(template, template) or self.chat_template
        if source is None:
            raise ValueError(f"this tokenizer has no chat template; pick one of {', '.join(BUILTIN_TEMPLATES)}")
        compiled = _compiled(source)
        kw = {k: _token_str(v) for k, v in self.config.items() if k.endswith("_token")}
        kw.update(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        native = supports_tools(source)

        def render(messages, add_generation_prompt=False, tools=None):
            uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
            if uses_tools and not native:
                messages, tools = hermes_messages(messages, tools), None
            out, n = [], 0
            with _time_limit(TEMPLATE_SECONDS):
                for chunk in compiled.generate(messages=messages, tools=tools,
                                               add_generation_prompt=add_generation_prompt, **kw):
                    n += len(chunk)
                    if n > TEMPLATE_MAX_CHARS:
                        raise jinja2.exceptions.TemplateError(
                            f"the chat template's output exceeds {TEMPLATE_MAX_CHARS:,} characters")
                    out.append(chunk)
            text = "".join(out)
            if uses_tools and native:
                _check_tools_rendered(text, messages, tools)
            return text
        return render

    def save(self, path):
        """Write tokenizer.json / tokenizer.model + tokenizer_config.json (with the chat template)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.is_sp:
            (path / "tokenizer.model").write_bytes(self.backend.serialized_model_proto())
        else:
            self.backend.save(str(path / "tokenizer.json"))
        cfg = dict(self.config)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(path) -> Tokenizer:
    """An HF model dir (tokenizer.json or tokenizer.model + tokenizer_config.json) or a .gguf file -> Tokenizer."""
    path = Path(path)
    if path.suffix == ".gguf":
        from .gguf import gguf_tokenizer
        return Tokenizer(*gguf_tokenizer(path))
    cfg_file = path / "tokenizer_config.json"
    try:
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "tokenizer.model").is_file():
        import sentencepiece as spm
        backend = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    else:
        raise ValueError(f"{path}: no tokenizer.json or tokenizer.model")
    return Tokenizer(backend, config, template)
