"""Which files, read how: --data paths (files or directories) or LLaMA-Factory dataset names (--dataset-dir with a
dataset_info.json), --columns, --max-samples, and several sources mixed (--mix concat | interleave, --mix-probs).

dataset_info.json (LLaMA-Factory's format, local files only): {"name": {"file_name": "x.json", "formatting":
"alpaca" | "sharegpt" | "openai", "columns": {"prompt": "question", ...}, "tags": {"role_tag": "role", ...},
"ranking": bool, "num_samples": N}}. Their column names map to ours (prompt -> instruction, query -> input,
response -> output, messages -> conversations or messages); tags rename a conversation's keys and role names.
"""
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import DataError
from .records import ReadOptions
from .sources import expand

MIX = ("concat", "interleave")
TRUNCATION = ("auto", "keep-start", "keep-end", "drop")
TEXT_SPLIT = ("blank", "lines", "file")
LF_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
              "sharegpt": {"messages": "conversations"}, "openai": {"messages": "messages"}}
LF_KEYS = ("file_name", "formatting", "columns", "tags", "ranking", "num_samples", "split", "load_from")
LF_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")


@dataclass
class Source:
    name: str                 # the --data item (a path, or a dataset_info.json name)
    paths: list               # its files
    opts: ReadOptions
    num_samples: int = 0      # dataset_info.json: sample this many examples (seeded), 0: all
    ranking: bool = False     # dataset_info.json: a preference dataset


def check_flags(cfg) -> str | None:
    """The data flags' choices and ranges (train.py's parse_args, before anything is loaded): an error or None."""
    for k, allowed in (("mix", MIX), ("truncation", TRUNCATION), ("text_split", TEXT_SPLIT)):
        if getattr(cfg, k) not in allowed:
            return f"--{k.replace('_', '-')} {getattr(cfg, k)!r}: expected one of {', '.join(allowed)}"
    if cfg.max_samples < 0:
        return f"--max-samples {cfg.max_samples}: expected a number >= 0 (0: all)"
    try:
        columns(cfg.columns)
        probs = mix_probs(cfg.mix_probs, len(cfg.data.split(",")))
    except DataError as e:
        return str(e)
    if probs and cfg.mix != "interleave":
        return "--mix-probs needs --mix interleave"
    if getattr(cfg, "stage", "sft") != "sft" and cfg.truncation != "auto":
        return f"--truncation {cfg.truncation}: not with --stage {cfg.stage} (pairs always keep their start)"
    if getattr(cfg, "stream", False) and getattr(cfg, "stage", "sft") != "sft":
        return f"--stream: not with --stage {cfg.stage} (pairs are tokenised up front)"
    if getattr(cfg, "stream", False) and (not cfg.max_steps or cfg.eval_split):
        return "--stream needs --max-steps (the number of examples is not known up front) and no --eval-split"
    return None


def columns(spec: str) -> dict:
    """--columns instruction=question,output=answer -> {"instruction": "question", ...} (ours = the file's)."""
    out = {}
    for item in filter(None, spec.split(",")):
        ours, _, theirs = item.partition("=")
        if not ours.strip() or not theirs.strip():
            raise DataError(f"--columns {spec!r}: expected OUR=THEIRS[,...], e.g. instruction=question")
        out[ours.strip()] = theirs.strip()
    return out


def mix_probs(spec: str, n: int) -> list[float] | None:
    if not spec:
        return None
    try:
        p = [float(x) for x in spec.split(",")]
    except ValueError:
        raise DataError(f"--mix-probs {spec!r}: expected comma-separated numbers") from None
    if len(p) != n or any(not x >= 0 for x in p) or not sum(p) > 0:
        raise DataError(f"--mix-probs {spec!r}: expected {n} numbers >= 0 (one per --data item), not all 0")
    return [x / sum(p) for x in p]


def _info(dataset_dir: Path) -> dict:
    f = dataset_dir / "dataset_info.json"
    try:
        info = json.loads(f.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise DataError(f"{f}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DataError(f"{f}: expected an object of dataset entries")
    return info


def _lf_source(info, name, dataset_dir: Path, base: ReadOptions) -> Source:
    f = dataset_dir / "dataset_info.json"
    if name not in info:
        raise DataError(f"{f}: no dataset {name!r} (has: {', '.join(info) or 'none'})")
    e = info[name]
    if "file_name" not in e:
        hub = next((k for k in e if k.endswith("_url") or k == "cloud_file_name"), "file_name")
        raise DataError(f"{f}: {name}: {hub} is not supported (nanotune reads local files: give 'file_name')")
    fmt = e.get("formatting", "alpaca")
    if fmt not in LF_COLUMNS:
        raise DataError(f"{f}: {name}: formatting {fmt!r}: expected one of {', '.join(LF_COLUMNS)}")
    cols, tags = e.get("columns") or {}, e.get("tags") or {}
    bad = [k for k in e if k not in LF_KEYS] + [k for k in tags if k not in LF_TAGS]
    if bad or e.get("split", "train") != "train":
        raise DataError(f"{f}: {name}: {(bad or ['split'])[0]!r} is not supported (keys: {', '.join(LF_KEYS)}; "
                        f"tags: {', '.join(LF_TAGS)}; split: train)")
    if not isinstance(cols, dict) or not all(isinstance(v, str) for v in [*cols.values(), *tags.values()]):
        raise DataError(f"{f}: {name}: 'columns' and 'tags' must map names to strings")
    ours = {LF_COLUMNS[fmt].get(k, k): v for k, v in cols.items()}
    if fmt != "alpaca":  # the conversation's default key in LLaMA-Factory's files
        ours.setdefault(LF_COLUMNS[fmt]["messages"], "conversations" if fmt == "sharegpt" else "messages")
    n = e.get("num_samples", 0)
    if not isinstance(n, int) or n < 0:
        raise DataError(f"{f}: {name}: num_samples must be an integer >= 0")
    opts = replace(base, columns={**ours, **base.columns}, tags=tags)
    return Source(name, expand([dataset_dir / e["file_name"]]), opts, n, bool(e.get("ranking")))


def sources(cfg, items: str, verbose: bool = True) -> list[Source]:
    """The --data (or --eval-data) items of a train.py config as Sources."""
    base = ReadOptions(skip_bad=cfg.skip_bad_records, strict=cfg.strict_data, text_split=cfg.text_split,
                       system=cfg.system, max_samples=cfg.max_samples, columns=columns(cfg.columns),
                       verbose=verbose)
    if not cfg.dataset_dir:
        return [Source(p, expand([p]), base) for p in items.split(",")]
    d = Path(cfg.dataset_dir)
    info = _info(d)
    return [_lf_source(info, name, d, base) for name in items.split(",")]


def fingerprint(cfg) -> list[str]:
    """Every file the training data comes from, with its size and hash (train.py's resume check)."""
    from dist.run import file_hash
    files = [p for s in sources(cfg, cfg.data, verbose=False) for p in s.paths]
    if cfg.dataset_dir:
        files.insert(0, Path(cfg.dataset_dir) / "dataset_info.json")
    return [f"{p} ({os.path.getsize(p)} bytes, blake2b {file_hash(Path(p))})" for p in files]


def sample(examples: list, n: int, seed: int) -> list:
    """dataset_info.json num_samples: n examples, a seeded random subset (all of them, repeated, and a subset of
    the rest when n is larger)."""
    if not n:
        return examples
    rng = random.Random(seed)
    whole, rest = divmod(n, len(examples)) if examples else (0, 0)
    return examples * whole + [examples[i] for i in sorted(rng.sample(range(len(examples)), rest))]


def interleave_iter(iterables, probs: list[float] | None, seed: int):
    """(source, item) pairs: each draw picks a source with `probs` (equal without) and takes its next item, until a
    draw finds its source exhausted (HF datasets' interleave "first_exhausted", LLaMA-Factory's interleave_under).
    A pure function of the sources, probs and seed: a resumed run sees the same data."""
    rng, its, end = random.Random(seed), [iter(x) for x in iterables], object()
    weights = probs or [1.0] * len(its)
    while True:
        s = rng.choices(range(len(its)), weights)[0]
        x = next(its[s], end)
        if x is end:
            return
        yield s, x


def interleave(sizes: list[int], probs: list[float] | None, seed: int) -> list[tuple[int, int]]:
    """interleave_iter over sources of `sizes` examples: (source, index) pairs."""
    return list(interleave_iter([range(n) for n in sizes], probs, seed))


def mix(lists: list[list], how: str, probs: list[float] | None, seed: int) -> list:
    if how == "concat" or len(lists) == 1:
        return [e for lst in lists for e in lst]
    return [lists[s][i] for s, i in interleave([len(x) for x in lists], probs, seed)]
