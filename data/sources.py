"""File formats: every reader yields (where, record) with `where` = "file:line" (the row for CSV, Parquet, Arrow),
and a record that cannot be parsed is yielded as its DataError (so --skip-bad-records can go on with the next).

  .jsonl / .json / other   JSONL (streamed line by line), a JSON array of records, or one JSON object; UTF-8 with
                           or without a BOM
  .csv / .tsv              stdlib csv, a header row naming the fields; a cell of a list-valued field
                           (conversations, messages, ...) holds JSON
  .parquet / .arrow        through pyarrow (optional: `pip install pyarrow`), streamed in record batches
  .txt                     --text-split blank (documents separated by blank lines) | lines | file
  X.gz                     gzip'd X (streamed)
  a directory              every file of a known suffix under it, in sorted order
"""
import csv
import gzip
import io
import json
from pathlib import Path

from .errors import DataError

SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
# fields whose value is a list or object: a CSV cell holding one is JSON
JSON_FIELDS = ("conversations", "messages", "history", "segments", "tools", "chosen", "rejected", "prompt",
               "completion")
TEXT_OR_JSON = ("prompt", "completion", "chosen", "rejected")  # a string, or JSON messages
BOOL_FIELDS = ("label", "kto_tag")
BOM = b"\xef\xbb\xbf"
SINGLE_OBJECT_MAX = 1 << 26  # bytes: a larger file whose first line is not JSON is JSONL (its line 1 is the error)


def _suffix(path: Path) -> str:
    s = path.suffixes
    return (s[-2] if len(s) > 1 and s[-1] == ".gz" else path.suffix).lower()


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _loads(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
    except (RecursionError, ValueError) as e:  # nesting past the recursion limit, a 5000-digit number
        return DataError(f"{where}: JSON too deeply nested or a number too long ({type(e).__name__})")


def _jsonl(path: Path):
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = decode(raw.removeprefix(BOM) if n == 1 else raw, where).strip()
            except DataError as e:
                yield where, e
                continue
            if line:
                yield where, _loads(line, where)


def _json_text(path: Path):
    """A JSON array walked element by element (so each record knows its line), or one JSON object."""
    with _open(path) as f:
        text = decode(f.read().removeprefix(BOM), f"{path}:1")
    dec, i = json.JSONDecoder(), 0

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line(i):
        return text.count("\n", 0, i) + 1
    i = skip(i)
    if text.startswith("{", i):  # one object (a JSONL file's first line did not parse alone)
        rec = _loads(text, f"{path}:{line(i)}")
        yield f"{path}:{line(i)}", rec if isinstance(rec, (dict, DataError)) else DataError(
            f"{path}:1: expected a JSON array of records, one JSON object or JSONL")
        return
    if not text.startswith("[", i):
        raise DataError(f"{path}:{line(i)}: expected a JSON array of records, one JSON object or JSONL")
    i = skip(i + 1)
    while i < len(text) and text[i] != "]":
        where = f"{path}:{line(i)}"
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
            raise DataError(f"{path}:{line(i)}: invalid JSON (expected ',' or ']')")
    if i >= len(text):
        raise DataError(f"{path}:{line(len(text))}: invalid JSON (unterminated array)")


def _json_or_jsonl(path: Path):
    with _open(path) as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
        if head.startswith(b"{"):  # JSONL, unless its first line is not a whole object (one pretty-printed object)
            f.seek(0)
            first = f.readline().removeprefix(BOM)
    if head.startswith(b"["):
        return _json_text(path)
    if head.startswith(b"{") and isinstance(_loads(first.decode("utf-8", "replace"), ""), DataError) \
            and path.stat().st_size < SINGLE_OBJECT_MAX:  # one object over several lines, or JSONL whose 1st is bad
        with _open(path) as f:
            whole = _loads(f.read().removeprefix(BOM).decode("utf-8", "replace"), "")
        if isinstance(whole, dict):
            return _json_text(path)
    return _jsonl(path)


def _csv(path: Path):
    with _open(path) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        rows = csv.DictReader(f, delimiter="\t" if _suffix(path) == ".tsv" else ",")
        line = 2
        try:
            for row in rows:
                where = f"{path}:{line}"
                line = rows.line_num + 1
                rec = {}
                for k, v in row.items():
                    if k is None or v is None:
                        rec = DataError(f"{where}: {'more' if k is None else 'fewer'} cells than header columns")
                        break
                    if v == "":  # CSV has no "missing": an empty cell is an absent field
                        continue
                    if k in JSON_FIELDS and v.lstrip()[:1] in ("[", "{"):
                        parsed = _loads(v, f"{where}: column '{k}'")
                        if isinstance(parsed, DataError) and k not in TEXT_OR_JSON:
                            rec = parsed
                            break
                        v = v if isinstance(parsed, DataError) else parsed  # "[INST] ..." stays a prompt string
                    elif k in BOOL_FIELDS and v.strip().lower() in ("true", "false"):
                        v = v.strip().lower() == "true"
                    rec[k] = v
                yield where, rec
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line}: not UTF-8 ({e.reason})") from None
        except csv.Error as e:
            raise DataError(f"{path}:{line}: invalid CSV ({e})") from None


def _arrow(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading {_suffix(path)} files needs pyarrow (pip install pyarrow)") from None
    try:
        if _suffix(path) == ".parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        else:  # Arrow IPC: the file format, or the stream format (what HF datasets writes)
            try:
                batches = iter(pa.ipc.open_file(path))
            except pa.ArrowInvalid:
                batches = iter(pa.ipc.open_stream(path))
        n = 0
        for batch in batches:
            for rec in batch.to_pylist():
                n += 1
                yield f"{path}:{n}", {k: v for k, v in rec.items() if v is not None}
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable {_suffix(path)} file ({str(e).splitlines()[0]})") from None


def _txt(path: Path, split: str = "blank"):
    """Raw-text documents: one per blank-line-separated block (blank), per non-empty line (lines), or the file."""
    if split == "file":
        with _open(path) as f:
            text = decode(f.read().removeprefix(BOM), f"{path}:1").strip("\n")
        if text.strip():
            yield f"{path}:1", {"text": text}
        return
    doc, start = [], 1
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            line = decode(raw.removeprefix(BOM) if n == 1 else raw, f"{path}:{n}")
            if split == "lines":
                if line.strip():
                    yield f"{path}:{n}", {"text": line.rstrip("\r\n")}
            elif line.strip():
                start = start if doc else n
                doc.append(line)
            elif doc:
                yield f"{path}:{start}", {"text": "".join(doc).rstrip("\n")}
                doc = []
    if doc:
        yield f"{path}:{start}", {"text": "".join(doc).rstrip("\n")}


def expand(paths) -> list[Path]:
    """Files of the given paths, directories expanded (their files of known suffixes, sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and _suffix(f) in SUFFIXES and f.name != "dataset_info.json")
            if not found:
                raise DataError(f"{p}: a directory with no data files ({', '.join(SUFFIXES)}, or .gz of them)")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file")
    return out


def iter_file(path: Path, text_split: str = "blank"):
    """(where, record or DataError) for each record of one file, by its suffix."""
    s = _suffix(path)
    if s == ".txt":
        return _txt(path, text_split)
    if s in (".csv", ".tsv"):
        return _csv(path)
    if s in (".parquet", ".arrow"):
        return _arrow(path)
    return _json_or_jsonl(path)
