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
import re
from dataclasses import dataclass, field
from pathlib import Path

from .chat import Chat, alpaca_chat, str_field, conversation, tools_list
from .errors import DataError, Notes
from .preference import Preference, parse as parse_preference
from .sources import expand, iter_file

PLACEHOLDER = re.compile(r"\{\{\s*[\w.\- ]{1,40}\s*\}\}")
MEDIA_TAG = re.compile(r"<(image|video|audio)>")


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
        out.append((str_field(s, "text", w), s["label"]))
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
        return "preference", parse_preference(rec, where, notes, tags)
    if "messages" in rec or "conversations" in rec:
        shape = "messages" if "messages" in rec else "conversations"
        kind, payload = "chat", conversation(rec, shape, where, notes, tags)
    elif "instruction" in rec or "output" in rec:
        shape, kind, payload = "alpaca", "chat", alpaca_chat(rec, where)
    elif "prompt" in rec and "completion" in rec:
        shape, (kind, payload) = "completion", _completion(rec, where, notes, tags)
    elif "segments" in rec:
        shape, (kind, payload) = "segments", _segments(rec, where)
    elif "text" in rec:
        shape, kind, payload = "text", "text", str_field(rec, "text", where)
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


def read_preferences(paths, opts=None) -> list[tuple[str, Preference]]:
    """data/preference.py's records: every record of `paths` as (where, Preference); any other record is a
    DataError naming it."""
    out = []
    for where, kind, payload in read_records(paths, opts=opts):
        if kind != "preference":
            raise DataError(f"{where}: not a preference record (expected chosen/rejected or a KTO label)")
        out.append((where, payload))
    return out
