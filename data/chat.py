"""Conversations: a Chat (messages + tools + untrained turns) from messages / sharegpt / alpaca fields, with
content parts, tool calls, per-message weights and LLaMA-Factory's tags (data/records.py says which shape a record
is; data/preference.py reads the conversations of preference records through the same functions)."""
import json

from .errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "developer": "system",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "developer": "system"}
WEIGHT_KEYS = ("train", "weight", "loss_weight")
TEXT_PARTS = ("text", "input_text", "output_text")


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


def str_field(rec, key, where, optional=False):
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
                parts.append(str_field(p, "text", f"{w}: {key}[{j}]"))
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
        role = str_field(t, role_key, w)
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
    system = str_field(rec, "system", where, optional=True)
    if system and chat[0]["role"] == "system":
        notes.add(where, "top-level 'system' ignored (the conversation has its own system turn)")
    return chat.with_system(system or "")


def alpaca_chat(rec, where):
    instr, out = str_field(rec, "instruction", where), str_field(rec, "output", where)
    inp, system = str_field(rec, "input", where, True), str_field(rec, "system", where, True)
    msgs = [{"role": "system", "content": system}] if system else []
    hist = rec.get("history") or []
    if not isinstance(hist, list) or not all(isinstance(h, list) and len(h) == 2 and
                                             all(isinstance(s, str) for s in h) for h in hist):
        raise DataError(f"{where}: field 'history' must be a list of [user, assistant] string pairs")
    for q, a in hist:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Chat(msgs + [{"role": "user", "content": f"{instr}\n\n{inp}" if inp else instr},
                        {"role": "assistant", "content": out}])


