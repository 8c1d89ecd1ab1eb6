"""Normalise records of any accepted shape to chat messages, raw text, completions or segments (docs/train.md).

Shapes (detected per record by its keys; --columns / dataset_info.json rename a file's keys to these first):
  messages     {"messages": [{"role", "content", "tool_calls"?, ...}], "tools"?}   OpenAI / TRL conversational
  sharegpt     {"conversations": [{"from", "value"}], "system"?, "tools"?}          incl. function_call/observation
  alpaca       {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  completion   {"prompt", "completion"}: strings (TRL standard, no template) or message lists (TRL conversational)
  segments     {"segments": [{"label": bool, "text": str}]}                         axolotl input_output
  text         {"text": str}, or a .txt file
  preference   chosen/rejected pairs, KTO label: read by data/preference.py, refused by SFT
A message's content may be a list of parts ([{"type": "text", "text": ...}]); a message may carry train / weight /
loss_weight (0 or 1). Whatever a record holds that is not read is counted and said once per file (data/errors.py).
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, Notes
from .sources import expand, iter_file

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "developer": "system",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "developer": "system"}
WEIGHT_KEYS = ("train", "weight", "loss_weight")
TEXT_PARTS = ("text", "input_text", "output_text")
PLACEHOLDER = re.compile(r"\{\{\s*[\w.\- ]{1,40}\s*\}\}")
MEDIA_TAG = re.compile(r"<(image|video|audio)>")


class Chat(list):
    """A conversation: the messages apply_chat_template takes ({"role", "content", "tool_calls"?, "tool_call_id"?,
    "name"?}), plus `tools` (JSON-schema function list, or None) and `untrained` (indices of assistant turns that
    are not trained: per-message train: false / weight: 0, the assistant turns of a TRL prompt)."""

    def __init__(self, messages=(), tools=None, untrained=()):
        super().__init__(messages)
        self.tools, self.untrained = tools, frozenset(untrained)

    def with_system(self, text: str):
        """--system: a system message for a chat that has none (the record's own wins)."""
        if not text or (self and self[0]["role"] == "system"):
            return self
        return Chat([{"role": "system", "content": text}, *self], self.tools, {i + 1 for i in self.untrained})


@dataclass
class ReadOptions:
    """How files are read (train.py's data flags)."""
    skip_bad: bool = False
    strict: bool = False              # --strict-data: a warning is an error
    text_split: str = "blank"         # .txt documents: blank | lines | file
    system: str = ""                  # --system: for chats without one
    max_samples: int = 0              # records per file (0: all)
    columns: dict = field(default_factory=dict)  # our field name -> the file's (--columns, dataset_info.json)
    tags: dict = field(default_factory=dict)     # LLaMA-Factory sharegpt tags (role_tag, user_tag, ...)
    verbose: bool = True


def _str(rec, key, where, optional=False):
    if key not in rec:
        if optional:
            return None
        raise DataError(f"{where}: missing field '{key}'")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def _json(v, what, where):
    """A field that may hold JSON as a string (LLaMA-Factory's tools and function calls)."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise DataError(f"{where}: {what} is a string but not valid JSON") from None


def tools_list(v, where):
    """`tools`: a list (or LLaMA-Factory's JSON string) of function schemas, each {"type": "function", "function":
    {...}} as transformers' apply_chat_template(tools=...) takes them; a bare {"name", ...} is wrapped so."""
    v = _json(v, "field 'tools'", where) if v != "" else None
    if not v:
        return None
    v = [v] if isinstance(v, dict) else v
    if not isinstance(v, list) or not all(isinstance(t, dict) and ("function" in t or "name" in t) for t in v):
        raise DataError(f"{where}: field 'tools' must be a list of function schemas ({{'name', 'parameters'}})")
    return [t if t.get("type") == "function" or "function" in t else {"type": "function", "function": t} for t in v]


def tool_calls(v, where):
    """Assistant tool calls -> [{"type": "function", "function": {"name", "arguments": dict}}, ...] (OpenAI's JSON
    string arguments parsed: templates write them with tojson)."""
    v = _json(v, "the tool call", where)
    v = [v] if isinstance(v, dict) else v
    if not isinstance(v, list) or not v:
        raise DataError(f"{where}: tool calls must be a non-empty list of {{'name', 'arguments'}} objects")
    out = []
    for j, c in enumerate(v):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: tool call {j} must be an object with a string 'name'")
        args = _json(fn.get("arguments", {}), f"tool call {j}'s arguments", where)
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        out.append({**({"id": c["id"]} if isinstance(c.get("id"), str) else {}), **call})
    return out


def _content(v, w, where, notes, key):
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # OpenAI / LLaMA-Factory content parts: text parts joined; others said, never trained
        parts = []
        for j, p in enumerate(v):
            if not isinstance(p, dict) or not isinstance(p.get("type"), str):
                raise DataError(f"{w}: {key}[{j}] must be a content part {{'type', ...}}")
            if p["type"] in TEXT_PARTS:
                parts.append(_str(p, "text", f"{w}: {key}[{j}]"))
            else:
                notes.add(where, f"content part of type '{p['type']}' dropped (only text is read)")
        return "".join(parts)
    raise DataError(f"{w}: field '{key}' must be a string or a list of content parts, got {type(v).__name__}")


def _weight(t, w):
    """Per-message training control: axolotl's train, OpenAI fine-tuning's weight, loss_weight: 0/1 or a bool."""
    for k in WEIGHT_KEYS:
        if k in t:
            v = t[k]
            if not isinstance(v, (bool, int, float)) or v not in (0, 1):
                raise DataError(f"{w}: field '{k}' must be 0 or 1 (or true/false), got {v!r}: fractional loss "
                                "weights are not supported")
            return bool(v)
    return None


def _turns(rec, key, role_key, text_key, roles, where, notes):
    turns = rec[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise DataError(f"{where}: empty conversation in '{key}'")
    msgs, untrained = [], set()
    for i, t in enumerate(turns):
        w = f"{where}: {key}[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"{w} must be an object, got {type(t).__name__}")
        role = _str(t, role_key, w)
        if role not in roles:
            raise DataError(f"{w}: unknown role {role!r} (expected one of {', '.join(roles)})")
        mapped = roles[role]
        if role == "developer":
            notes.add(where, "role 'developer' read as 'system'")
        if mapped == "function_call":  # LLaMA-Factory sharegpt: the assistant's call(s), JSON in the value
            m = {"role": "assistant", "content": "", "tool_calls": tool_calls(t.get(text_key), w)}
        else:
            has_calls = mapped == "assistant" and t.get("tool_calls")
            v = t.get(text_key)
            m = {"role": mapped, "content": "" if v is None and has_calls else _content(v, w, where, notes,
                                                                                        text_key)}
            if has_calls:
                m["tool_calls"] = tool_calls(t["tool_calls"], w)
            for k in ("tool_call_id", "name"):
                if isinstance(t.get(k), str):
                    m[k] = t[k]
        train = _weight(t, w)
        if train is False and m["role"] == "assistant":
            untrained.add(len(msgs))
        elif train and m["role"] != "assistant":
            notes.add(where, f"'{next(k for k in WEIGHT_KEYS if k in t)}' on a {m['role']} message ignored "
                      "(only assistant turns train; --train-on-prompt trains every token)")
        read = {role_key, text_key, "tool_calls", "tool_call_id", "name", *WEIGHT_KEYS}
        for k in t:
            if k not in read:
                notes.add(where, f"field '{key}[].{k}' ignored")
        msgs.append(m)
    return msgs, untrained


def _tags(tags, key):
    """Role and content keys and the role names of a conversation list (LLaMA-Factory's tags override them)."""
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    roles = dict(ROLES if key == "messages" else SHAREGPT_ROLES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("observation_tag", "tool"),
                      ("function_tag", "function_call"), ("system_tag", "system")):
        if tag in tags:
            roles[tags[tag]] = role
    return tags.get("role_tag", role_key), tags.get("content_tag", text_key), roles


def conversation(rec, key, where, notes, tags=None) -> Chat:
    """A messages / conversations list (+ top-level system and tools) -> Chat."""
    msgs, untrained = _turns(rec, key, *_tags(tags or {}, key), where, notes)
    chat = Chat(msgs, tools_list(rec.get("tools"), where), untrained)
    system = _str(rec, "system", where, optional=True)
    if system and chat[0]["role"] == "system":
        notes.add(where, "top-level 'system' ignored (the conversation has its own system turn)")
    return chat.with_system(system or "")


def _alpaca(rec, where):
    instr, out = _str(rec, "instruction", where), _str(rec, "output", where)
    inp, system = _str(rec, "input", where, True), _str(rec, "system", where, True)
    msgs = [{"role": "system", "content": system}] if system else []
    hist = rec.get("history") or []
    if not isinstance(hist, list) or not all(isinstance(h, list) and len(h) == 2 and
                                             all(isinstance(s, str) for s in h) for h in hist):
        raise DataError(f"{where}: field 'history' must be a list of [user, assistant] string pairs")
    for q, a in hist:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Chat(msgs + [{"role": "user", "content": f"{instr}\n\n{inp}" if inp else instr},
                        {"role": "assistant", "content": out}])


def _completion(rec, where, notes, tags):
    p, c = rec["prompt"], rec.get("completion")
    if isinstance(p, str) and isinstance(c, str):  # TRL standard: prompt + completion + EOS, no chat template
        return "completion", (p, c)
    if isinstance(p, list) and isinstance(c, list):  # TRL conversational: only the completion's turns train
        prompt = conversation({"messages": p}, "messages", where, notes, tags)
        comp = conversation({"messages": c}, "messages", where, notes, tags)
        untrained = {i for i, m in enumerate(prompt) if m["role"] == "assistant"} | \
                    {len(prompt) + i for i in comp.untrained}
        return "chat", Chat([*prompt, *comp], tools_list(rec.get("tools"), where), untrained)
    raise DataError(f"{where}: fields 'prompt' and 'completion' must both be strings or both message lists")


def _segments(rec, where):
    segs = rec["segments"]
    if not isinstance(segs, list) or not segs:
        raise DataError(f"{where}: field 'segments' must be a non-empty list of {{'label', 'text'}}")
    out = []
    for j, s in enumerate(segs):
        w = f"{where}: segments[{j}]"
        if not isinstance(s, dict) or not isinstance(s.get("label"), bool):
            raise DataError(f"{w} must be an object with a boolean 'label' and a string 'text'")
        out.append((_str(s, "text", w), s["label"]))
    return "segments", out


# what each shape reads (everything else in a record is said to be ignored)
READS = {"messages": ("messages", "tools", "system"), "conversations": ("conversations", "tools", "system"),
         "alpaca": ("instruction", "input", "output", "system", "history"), "completion": ("prompt", "completion",
                                                                                             "tools"),
         "segments": ("segments",), "text": ("text",)}


def normalise(rec, where: str, notes: Notes | None = None, tags: dict | None = None):
    """One parsed record -> (kind, payload): ("chat", Chat), ("text", str), ("completion", (prompt, completion)),
    ("segments", [(text, trained)]) or ("preference", data.preference.Preference). Raises DataError."""
    notes = notes if notes is not None else Notes(verbose=False)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    if {"chosen", "rejected", "kto_tag"} & rec.keys() or ("label" in rec and "completion" in rec):
        from .preference import parse
        return "preference", parse(rec, where, notes, tags)
    if "messages" in rec or "conversations" in rec:
        shape = "messages" if "messages" in rec else "conversations"
        kind, payload = "chat", conversation(rec, shape, where, notes, tags)
    elif "instruction" in rec or "output" in rec:
        shape, kind, payload = "alpaca", "chat", _alpaca(rec, where)
    elif "prompt" in rec and "completion" in rec:
        shape, (kind, payload) = "completion", _completion(rec, where, notes, tags)
    elif "segments" in rec:
        shape, (kind, payload) = "segments", _segments(rec, where)
    elif "text" in rec:
        shape, kind, payload = "text", "text", _str(rec, "text", where)
    else:
        raise DataError(f"{where}: missing field: expected 'messages', 'conversations', 'instruction'/'output', "
                        f"'prompt'/'completion', 'segments' or 'text' (got keys: {', '.join(rec) or 'none'})")
    if kind == "chat" and not any(m["role"] == "assistant" for m in payload):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to train on)")
    for k in rec:
        if k not in READS[shape]:
            media = k in ("images", "videos", "audios", "image", "video", "audio")
            notes.add(where, f"field '{k}' ignored" + (" (images, video and audio are not read)" * media))
    scan(kind, payload, where, notes)
    return kind, payload


def texts(kind, payload) -> list[str]:
    if kind == "chat":
        return [m["content"] for m in payload]
    return {"text": lambda: [payload], "completion": lambda: list(payload),
            "segments": lambda: [t for t, _ in payload]}.get(kind, list)()


def scan(kind, payload, where, notes):
    """Text that looks like it was meant to be replaced: {{placeholders}}, <image> tags (trained as written)."""
    for t in texts(kind, payload):
        m = PLACEHOLDER.search(t)
        if m:
            notes.add(where, f"placeholder-like '{m.group()}' trained literally (fill it in the data)")
        m = MEDIA_TAG.search(t)
        if m:
            notes.add(where, f"'{m.group()}' tag trained as text ({m.group(1)} inputs are not read)")


def rename(rec, columns: dict):
    """--columns / dataset_info.json: the file's keys renamed to ours ({ours: theirs})."""
    if not columns or not isinstance(rec, dict):
        return rec
    out = {k: v for k, v in rec.items() if k not in columns.values()}
    out.update({ours: rec[theirs] for ours, theirs in columns.items() if theirs in rec})
    return out


def read_records(paths, skip_bad: bool = False, stats: dict | None = None, opts: ReadOptions | None = None):
    """Yield (where, kind, payload) for every record of every file (directories expanded); kind as normalise's.
    With skip_bad, malformed records are skipped (each said by file:line) and counted in stats["bad"] (file-level
    problems still raise). stats["warnings"]: the warning lines said."""
    opts = opts or ReadOptions(skip_bad=skip_bad)
    stats = stats if stats is not None else {}
    stats.setdefault("bad", 0)
    notes = Notes(opts.strict, opts.verbose)
    for path in expand(paths):
        count = bad = 0
        first = None  # a .txt file read as a single document: said, it may hold one document per line
        for where, rec in iter_file(Path(path), opts.text_split):
            if opts.max_samples and count >= opts.max_samples:
                break
            try:
                if isinstance(rec, DataError):
                    raise rec
                kind, payload = normalise(rename(rec, opts.columns), where, notes, opts.tags)
            except DataError as e:
                if not opts.skip_bad:
                    raise
                notes.skip(e)
                bad += 1
                continue
            count += 1
            if kind == "chat":
                payload = payload.with_system(opts.system)
            first = (where, payload) if count == 1 and kind == "text" and path.suffix == ".txt" else None
            yield where, kind, payload
        if first and "\n" in first[1] and opts.text_split == "blank":
            notes.add(first[0], "no blank line between documents: the whole file is one document "
                      "(--text-split lines: one per line)")
        stats["bad"] += bad
        notes.flush(path)
        if count == 0 and not bad:
            raise DataError(f"{path}:1: empty file (no records)")
    stats["warnings"] = stats.get("warnings", []) + notes.lines
