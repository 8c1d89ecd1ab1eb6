"""Read training records from JSON / JSONL / text files and normalise them to chat messages or raw text.

Formats (detected per record by its keys):
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (OpenAI style)
  text      {"text": str}  or a .txt file (documents separated by blank lines), for continued pre-training
JSONL files are streamed line by line (a multi-GB file is never loaded whole). Every problem is a DataError whose
message is one line: `file:line: problem`.
"""
import json
from pathlib import Path

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A malformed record or file; str(e) is one line naming file:line and the problem."""


def _str(rec, key, where, optional=False):
    if key not in rec:
        if optional:
            return None
        raise DataError(f"{where}: missing field '{key}'")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def _turns(turns, key, role_key, text_key, roles, where):
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise DataError(f"{where}: empty conversation in '{key}'")
    out = []
    for i, t in enumerate(turns):
        w = f"{where}: {key}[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"{w} must be an object, got {type(t).__name__}")
        role = _str(t, role_key, w)
        if role not in roles:
            raise DataError(f"{w}: unknown role {role!r} (expected one of {', '.join(roles)})")
        out.append({"role": roles[role] if isinstance(roles, dict) else role, "content": _str(t, text_key, w)})
    return out


def normalise(rec, where: str):
    """One parsed JSON record -> ("chat", messages) or ("text", str). Raises DataError."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = _turns(rec["messages"], "messages", "role", "content", ROLES, where)
    elif "conversations" in rec:
        msgs = _turns(rec["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, where)
    elif "instruction" in rec or "output" in rec:
        instr, out = _str(rec, "instruction", where), _str(rec, "output", where)
        inp, system = _str(rec, "input", where, True), _str(rec, "system", where, True)
        msgs = [{"role": "system", "content": system}] if system else []
        hist = rec.get("history") or []
        if not isinstance(hist, list) or not all(isinstance(h, list) and len(h) == 2 and
                                                 all(isinstance(s, str) for s in h) for h in hist):
            raise DataError(f"{where}: field 'history' must be a list of [user, assistant] string pairs")
        for q, a in hist:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs += [{"role": "user", "content": f"{instr}\n\n{inp}" if inp else instr},
                 {"role": "assistant", "content": out}]
    elif "text" in rec:
        return "text", _str(rec, "text", where)
    else:
        raise DataError(f"{where}: missing field: expected 'messages', 'conversations', 'instruction'/'output' "
                        f"or 'text' (got keys: {', '.join(rec) or 'none'})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to train on)")
    return "chat", msgs


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _jsonl(path: Path):
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:  # a bad line is yielded as its error, so --skip-bad-records can go on with the next one
                line = _decode(raw, where).strip()
                if not line:
                    continue
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec = DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            except DataError as e:
                rec = e
            except (RecursionError, ValueError) as e:  # nesting past the recursion limit, a 5000-digit number
                rec = DataError(f"{where}: JSON too deeply nested or a number too long ({type(e).__name__})")
            yield where, rec


def _json_array(path: Path):
    """A JSON array, walked element by element so each record knows its line."""
    text = _decode(path.read_bytes(), f"{path}:1")
    dec, i = json.JSONDecoder(), 0

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i
    i = skip(i)
    if not text.startswith("[", i):
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected a JSON array of records or JSONL")
    i = skip(i + 1)
    while i < len(text) and text[i] != "]":
        where = f"{path}:{text.count(chr(10), 0, i) + 1}"
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise DataError(f"{where}: JSON too deeply nested or a number too long ({type(e).__name__})") from None
        yield where, rec
        i = skip(i)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] != "]":
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: invalid JSON (expected ',' or ']')")
    if i >= len(text):
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: invalid JSON (unterminated array)")


def _txt(path: Path):
    """Documents separated by blank lines, streamed."""
    doc, start = [], 1
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{n}")
            if line.strip():
                if not doc:
                    start = n
                doc.append(line)
            elif doc:
                yield f"{path}:{start}", {"text": "".join(doc).rstrip("\n")}
                doc = []
    if doc:
        yield f"{path}:{start}", {"text": "".join(doc).rstrip("\n")}


def read_records(paths, skip_bad: bool = False, stats: dict | None = None):
    """Yield (where, kind, payload) for every record of every file; kind is "chat" or "text".
    With skip_bad, malformed records are skipped and counted in stats["bad"] (file-level problems still raise)."""
    stats = stats if stats is not None else {}
    stats.setdefault("bad", 0)
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix == ".txt":
            source = _txt(path)
        else:
            with open(path, "rb") as f:
                head = f.read(4096).lstrip()
            source = _json_array(path) if head.startswith(b"[") else _jsonl(path)
        count = 0
        for where, rec in source:
            try:
                if isinstance(rec, DataError):
                    raise rec
                kind, payload = normalise(rec, where)
            except DataError:
                if not skip_bad:
                    raise
                stats["bad"] += 1
                continue
            count += 1
            yield where, kind, payload
        if count == 0 and not stats["bad"]:
            raise DataError(f"{path}:1: empty file (no records)")
