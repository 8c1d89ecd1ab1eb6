"""Preference data for train.py --stage dpo (chosen/rejected pairs) and --stage kto (completions labelled
desirable or not): the records data/preference.py reads (every shape and file format data/ reads: TRL's explicit
and implicit prompts, LLaMA-Factory's pairs and kto_tag, KTO's prompt/completion/label; JSONL, CSV, Parquet,
dataset_info.json...), tokenised as pairs of examples.

A conversational prompt and each completion are rendered through the chat template once (prompt + completion);
a string prompt (TRL's standard format) is prompt + completion + EOS without a template, as TRL does. Chosen and
rejected are checked to share their prompt tokens exactly. Only the completion's assistant tokens are trained (the
prompt's own assistant turns are context). A row longer than --seq-len keeps its start (TRL's keep_start: the
prompt is never cut differently before chosen and rejected); a pair whose completion is cut away entirely is dropped
and counted (stats["prompt_truncated"]).
"""
from dataclasses import dataclass

import numpy as np

from model.progress import progress

from .chat import Chat
from .encode import Example, encode_record
from .records import DataError, read_records


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


def encode_completion(tok, prompt, completion, seq_len: int, template=None) -> Example:
    """prompt + completion as one example, only the completion trained (keep-start truncation past seq_len)."""
    if isinstance(prompt, str):  # TRL's standard format: no chat template, the completion + EOS trained
        exs = encode_record(tok, "completion", (prompt, completion), seq_len, truncation="keep-start")
    else:
        context = {i for i, m in enumerate(prompt) if m["role"] == "assistant"}  # the prompt's answers: not trained
        chat = Chat([*prompt, *completion], prompt.tools, set(prompt.untrained) | context)
        exs = encode_record(tok, "chat", chat, seq_len, template, truncation="keep-start")
    return exs[0]


def load_preference(tok, paths, stage: str, seq_len: int, template=None, skip_bad=False, opts=None):
    """Every record of `paths` as Pair (stage "dpo") or Labelled (stage "kto"). Returns (items, stats)."""
    stats = {"bad": 0, "records": 0, "truncated": 0, "prompt_truncated": 0, "no_target": 0, "too_long": 0}
    items, pairs = [], stage == "dpo"
    for where, kind, p in progress(read_records(paths, skip_bad, stats, opts), "tokenising", unit="rec"):
        try:
            if kind != "preference" or (p.label is None) != pairs:
                got = "supervised (SFT)" if kind != "preference" else "paired" if p.label is None else \
                    "KTO (a completion + label)"
                need = "'chosen' and 'rejected'" if pairs else "a completion with a bool 'label' (or 'kto_tag')"
                raise DataError(f"{where}: --stage {stage} needs {need}; this record is {got} data")
            prompt = p.prompt.with_system(opts.system) if opts and isinstance(p.prompt, Chat) else p.prompt
            if not (prompt.strip() if isinstance(prompt, str) else any(m["content"].strip() for m in prompt)):
                raise DataError(f"{where}: preference record has an empty prompt")
            if pairs and p.chosen == p.rejected:
                raise DataError(f"{where}: 'chosen' and 'rejected' are the same completion")
            exs = [encode_completion(tok, prompt, c, seq_len, template) for c in
                   ((p.chosen, p.rejected) if pairs else (p.chosen,))]
            if pairs and not np.array_equal(exs[0].ids[:n_prompt(exs[0])], exs[1].ids[:n_prompt(exs[1])]):
                raise DataError(f"{where}: the chat template renders the prompt differently before 'chosen' and "
                                "'rejected'")
        except DataError:
            if not (skip_bad or (opts and opts.skip_bad)):
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
        items.append(Pair(*exs) if pairs else Labelled(exs[0], p.label))
    rows = [e for it in items for e in ((it.chosen, it.rejected) if pairs else (it.example,))]
    stats.update(examples=len(items), tokens=int(sum(len(e.ids) for e in rows)),
                 trained_tokens=int(sum(e.train[1:].sum() for e in rows)))
    return items, stats


def n_prompt(ex: Example) -> int:
    t = np.flatnonzero(ex.train)
    return int(t[0]) if len(t) else len(ex.ids)
