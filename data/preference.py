"""Preference records (chosen / rejected pairs, KTO's labelled completions), read and validated for the preference
stages (train.py --stage dpo|kto, tokenised by data/pairs.py; SFT refuses them, data/batches.py, so a rejected
answer is never trained as a target).

Accepted shapes (after --columns / dataset_info.json renaming):
  TRL explicit prompt   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
  TRL implicit prompt   {"chosen": messages, "rejected": messages}   (the shared leading turns are the prompt)
  TRL / KTO unpaired    {"prompt": str | messages, "completion": str | messages, "label": bool}
  LLaMA-Factory pairs   {"conversations" | "messages": [...], "chosen": turn, "rejected": turn, "system"?,
                         "tools"?}  or alpaca {"instruction", "input"?, "chosen": str, "rejected": str}
  LLaMA-Factory KTO     {"conversations" | "messages": [..., answer], "kto_tag": bool}

The structure the preference stage gets (one per record):
  Preference.prompt     Chat (data/records.py: messages + tools) for conversational data, or a str (TRL standard:
                        no chat template)
  Preference.chosen     the preferred answer: a list of assistant messages, or a str when the prompt is a str
  Preference.rejected   the dispreferred answer (pairs), else None
  Preference.label      KTO: True when `chosen` (the completion) is desirable, False when undesirable; pairs: None
"""
from dataclasses import dataclass

from .chat import Chat, alpaca_chat, conversation
from .errors import DataError


@dataclass
class Preference:
    prompt: object                    # Chat, or str (standard, no template)
    chosen: object                    # list of assistant messages, or str
    rejected: object = None           # same type as chosen; None for KTO
    label: bool | None = None         # KTO desirability; None for pairs


def _answer(v, where, key, notes, tags, want_str):
    """An answer given as a string, one turn {"role"/"from", "content"/"value"} or a list of turns."""
    if isinstance(v, str):
        return v if want_str else [{"role": "assistant", "content": v}]
    turns = [v] if isinstance(v, dict) else v
    if want_str or not isinstance(turns, list):
        raise DataError(f"{where}: field '{key}' must be {'a string' if want_str else 'a message or messages'}, "
                        f"got {type(v).__name__}")
    shape = "messages" if all("role" in t for t in turns if isinstance(t, dict)) else "conversations"
    msgs = list(conversation({shape: turns}, shape, where, notes, tags))
    if any(m["role"] != "assistant" for m in msgs):
        raise DataError(f"{where}: field '{key}' must hold assistant turns only")
    return msgs


def _prompt(rec, where, notes, tags):
    for shape in ("messages", "conversations", "prompt"):
        if shape in rec:
            v = rec[shape]
            if shape == "prompt" and isinstance(v, str):
                return v
            return conversation({**rec, "messages": v} if shape == "prompt" else rec,
                                "messages" if shape == "prompt" else shape, where, notes, tags)
    if "instruction" in rec:  # alpaca ranking: the prompt is the alpaca chat without its answer
        return Chat(alpaca_chat({**rec, "output": ""}, where)[:-1])
    return None


def _split_common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def parse(rec, where, notes, tags=None) -> Preference:
    read = {"prompt", "chosen", "rejected", "completion", "label", "kto_tag", "messages", "conversations",
            "system", "tools", "instruction", "input", "history"}
    for k in rec:
        if k not in read:
            notes.add(where, f"field '{k}' ignored")
    if "kto_tag" in rec or "label" in rec:  # KTO: one completion and whether it is desirable
        key = "kto_tag" if "kto_tag" in rec else "label"
        label = rec[key]
        if not isinstance(label, bool):
            raise DataError(f"{where}: field '{key}' must be true or false, got {label!r}")
        prompt = _prompt(rec, where, notes, tags)
        if "completion" in rec:
            comp = _answer(rec["completion"], where, "completion", notes, tags, isinstance(prompt, str))
        elif isinstance(prompt, Chat) and prompt and prompt[-1]["role"] == "assistant":
            prompt, comp = Chat(prompt[:-1], prompt.tools), [prompt[-1]]
        else:
            raise DataError(f"{where}: a KTO record needs a 'completion' or a conversation ending in an answer")
        return Preference(prompt, comp, None, label)
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise DataError(f"{where}: missing field '{k}' (a preference pair needs both 'chosen' and 'rejected')")
    prompt = _prompt(rec, where, notes, tags)
    if prompt is None:  # TRL's implicit prompt: the conversations share their leading turns
        if not (isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list)):
            raise DataError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be whole conversations")
        c = _answer_turns(rec["chosen"], where, "chosen", notes, tags)
        r = _answer_turns(rec["rejected"], where, "rejected", notes, tags)
        n = _split_common(c, r)
        while n and c[n - 1]["role"] == "assistant":  # the prompt ends before the answers
            n -= 1
        if n == 0 or n == len(c) or n == len(r):
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt or have no differing answer")
        prompt, chosen, rejected = Chat(c[:n], c.tools), c[n:], r[n:]
        for k, v in (("chosen", chosen), ("rejected", rejected)):
            if any(m["role"] != "assistant" for m in v):
                raise DataError(f"{where}: field '{k}' continues with non-assistant turns after the prompt")
        return Preference(prompt, chosen, rejected)
    s = isinstance(prompt, str)
    return Preference(prompt, _answer(rec["chosen"], where, "chosen", notes, tags, s),
                      _answer(rec["rejected"], where, "rejected", notes, tags, s))


def _answer_turns(v, where, key, notes, tags):
    shape = "messages" if all(isinstance(t, dict) and "role" in t for t in v) else "conversations"
    return conversation({shape: v}, shape, where, notes, tags)
