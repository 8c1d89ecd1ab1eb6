"""Preference data for train.py --stage dpo (chosen/rejected pairs) and --stage kto (completions labelled
desirable or not): read, render through the chat template, tokenise, collate.

Record shapes (JSON / JSONL, detected by keys; a str prompt is one user turn, a str completion one assistant turn):
  TRL explicit prompt  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
  TRL implicit prompt  {"chosen": messages, "rejected": messages}: the leading turns both share are the prompt
  LLaMA-Factory        {"conversations": [sharegpt turns], "chosen": {"from": "gpt", "value": str}, "rejected": ...}
                       {"instruction": str, "input"?: str, "system"?: str, "chosen": str, "rejected": str}
  KTO (TRL unpaired)   {"prompt": str | messages, "completion": str | messages, "label": true | false}
Chosen and rejected are rendered after the same prompt (prompt + completion through the chat template, once each)
and their prompt tokens are checked equal token for token. Only the completion's assistant tokens are trained.
A row longer than --seq-len keeps its start (as TRL's keep_start); a pair or example whose completion is cut away
entirely is dropped and counted (stats["prompt_truncated"]).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .encode import Example, assistant_spans, _tokenise_spans
from .records import ROLES, SHAREGPT_ROLES, DataError, _json_array, _jsonl, _str, _turns


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    ref: object = None  # (2,) tensor: the reference log-probs of chosen, rejected (--precompute-ref)

    def __len__(self):
        return max(len(self.chosen.ids), len(self.rejected.ids))


@dataclass
class Labelled:
    example: Example
    desirable: bool

    def __len__(self):
        return len(self.example.ids)


def raw_records(paths):
    """(where, parsed JSON record) for every record of every JSON / JSONL file."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        for where, rec in (_json_array(path) if head.startswith(b"[") else _jsonl(path)):
            if isinstance(rec, DataError):
                raise rec
            yield where, rec


def _messages(v, key, where, role):
    """A str (one `role` turn) or a list of messages / sharegpt turns / one sharegpt turn object."""
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list) and v and isinstance(v[0], dict) and "from" in v[0]:
        return _turns(v, key, "from", "value", SHAREGPT_ROLES, where)
    return _turns(v, key, "role", "content", ROLES, where)


def normalise_preference(rec, where: str):
    """-> ("pair", prompt, chosen, rejected) or ("kto", prompt, completion, desirable); None for an SFT record."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    if "completion" in rec and "label" in rec:
        if not isinstance(rec["label"], bool):
            raise DataError(f"{where}: field 'label' must be true or false, got {rec['label']!r}")
        prompt = _messages(rec.get("prompt"), "prompt", where, "user") if "prompt" in rec else None
        if not prompt:
            raise DataError(f"{where}: KTO record needs a non-empty 'prompt'")
        return "kto", prompt, _messages(rec["completion"], "completion", where, "assistant"), rec["label"]
    if "chosen" not in rec and "rejected" not in rec:
        return None
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise DataError(f"{where}: preference record has no '{k}' (a pair needs 'chosen' and 'rejected')")
    chosen = _messages(rec["chosen"], "chosen", where, "assistant")
    rejected = _messages(rec["rejected"], "rejected", where, "assistant")
    if "prompt" in rec:
        prompt = _messages(rec["prompt"], "prompt", where, "user")
    elif "conversations" in rec:
        prompt = _turns(rec["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, where)
    elif "instruction" in rec:
        instr, inp, system = (_str(rec, k, where, k != "instruction") for k in ("instruction", "input", "system"))
        prompt = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": f"{instr}\n\n{inp}" if inp else instr}]
    else:  # implicit prompt: the turns chosen and rejected share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise DataError(f"{where}: preference record has an empty prompt")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same completion")
    for k, c in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in c):
            raise DataError(f"{where}: '{k}' has no assistant turn")
    return "pair", prompt, chosen, rejected


def encode_completion(tok, prompt, completion, seq_len: int, template=None) -> Example:
    """prompt + completion rendered once; only the completion's assistant turns are trained."""
    msgs = prompt + completion
    text, spans = assistant_spans(tok, msgs, template)
    first = sum(m["role"] == "assistant" for m in prompt)  # the prompt's own assistant turns: not trained
    ids, train = _tokenise_spans(tok, text, spans[first:])
    return Example(ids[:seq_len], train[:seq_len], len(ids) > seq_len)


def n_prompt(ex: Example) -> int:
    t = np.flatnonzero(ex.train)
    return int(t[0]) if len(t) else len(ex.ids)


def load_preference(tok, paths, stage: str, seq_len: int, template=None, skip_bad=False):
    """Every record of `paths` as Pair (stage "dpo") or Labelled (stage "kto"). Returns (items, stats)."""
    stats = {"bad": 0, "records": 0, "truncated": 0, "prompt_truncated": 0, "no_target": 0}
    items, want = [], "pair" if stage == "dpo" else "kto"
    for where, rec in raw_records(paths):
        try:
            r = normalise_preference(rec, where)
            if r is None or r[0] != want:
                got = "supervised (SFT)" if r is None else "KTO (completion + label)" if r[0] == "kto" else "paired"
                need = ("'chosen' and 'rejected'" if want == "pair" else "'prompt', 'completion' and a bool 'label'")
                raise DataError(f"{where}: --stage {stage} needs {need}; this record is {got} data")
            exs = [encode_completion(tok, r[1], c, seq_len, template) for c in r[2:4 if want == "pair" else 3]]
            if want == "pair" and not np.array_equal(exs[0].ids[:n_prompt(exs[0])], exs[1].ids[:n_prompt(exs[1])]):
                raise DataError(f"{where}: the chat template renders the prompt differently before 'chosen' and "
                                "'rejected'")
        except DataError:
            if not skip_bad:
                raise
            stats["bad"] += 1
            continue
        except Exception as e:  # template errors name the record too
            raise DataError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        stats["records"] += 1
        stats["truncated"] += any(e.truncated for e in exs)
        if not all(e.train[1:].any() for e in exs):
            stats["prompt_truncated"] += 1  # the completion starts past --seq-len: nothing to compare
            continue
        items.append(Pair(*exs) if want == "pair" else Labelled(exs[0], r[3]))
    rows = [e for it in items for e in ((it.chosen, it.rejected) if want == "pair" else (it.example,))]
    stats.update(examples=len(items), tokens=int(sum(len(e.ids) for e in rows)),
                 trained_tokens=int(sum(e.train[1:].sum() for e in rows)))
    return items, stats
