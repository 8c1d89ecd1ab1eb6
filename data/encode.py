"""Tokenise a record through the model's chat template and mark which tokens are trained.

A conversation is rendered once with the chat template and tokenised once (so the ids are exactly what
`transformers`' apply_chat_template + tokenize gives). The trained character spans are found by rendering
prefixes: assistant turn i spans from the end of render(messages[:i], add_generation_prompt=True) to the end of
render(messages[:i+1]) with trailing whitespace removed, i.e. the answer plus its end-of-turn token. Tokens whose
first character lies in a trained span are trained; everything else (system, user, role headers) gets label -100.
"""
import functools
import re
from dataclasses import dataclass

import numpy as np

from model.tokenizer import END_OF_TURN


@dataclass
class Example:
    ids: np.ndarray       # (T,) int32 token ids
    train: np.ndarray     # (T,) bool: this token is a training target (label = id), else label -100
    truncated: bool = False
    seg: np.ndarray | None = None  # (T,) int32 example index inside a packed row; None when not packed

    def __len__(self):
        return len(self.ids)


def assistant_spans(tok, messages, template=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the trained assistant answers (a tool-call turn
    is an answer; tool results are not; a data.Chat's `untrained` turns are skipped) + end-of-turn tokens."""
    render = functools.partial(tok.chat_renderer(template), tools=getattr(messages, "tools", None))
    untrained = getattr(messages, "untrained", ())
    messages = list(messages)
    text = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i in untrained:
            continue
        prefix = render(messages[:i], add_generation_prompt=True) if i else ""
        upto = render(messages[:i + 1]) if i + 1 < len(messages) else text
        if i and text.startswith(prefix) and text.startswith(upto) and len(prefix) >= cursor:
            start, end = len(prefix), len(upto.rstrip())
        else:  # a template whose prefixes are not stable (e.g. adds a system prompt only for some turns)
            start, end = _find_answer(tok, text, messages, i, cursor)
        spans.append((start, end))
        cursor = end
    return text, spans


def _find_answer(tok, text, messages, i, cursor):
    """The span of messages[i] found verbatim in `text` (templates may trim it): searched after the message before
    it (so an answer quoted in its question is not taken for it), then after `cursor`; plus whitespace and the
    end-of-turn token if one follows."""
    if messages[i].get("tool_calls"):
        raise ValueError("the chat template's prefixes are not stable and a tool-call turn cannot be found verbatim")
    content = messages[i]["content"].strip() or messages[i]["content"]
    before = messages[i - 1]["content"].strip() if i else ""
    at = text.find(before, cursor) if before else -1
    start = text.find(content, at + len(before)) if at >= 0 else -1
    if start < 0:
        start = text.find(content, cursor)
    if start < 0:
        raise ValueError("the chat template does not reproduce an assistant message verbatim")
    end = start + len(content)
    rest = text[end:].lstrip()
    eot = next((t for t in (*END_OF_TURN, tok.eos_token or "") if t and rest.startswith(t)), None)
    return start, (len(text) - len(rest) + len(eot)) if eot else end


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = buf[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i


def _skip(buf: bytes, i: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, i)[1]
    if wire == 2:
        n, i = _varint(buf, i)
        return i + n
    return i + {1: 8, 5: 4}[wire]


def _sp_pieces(buf: bytes) -> list[tuple[int, int]]:
    """(id, first byte in the input) of each piece of a serialized sentencepiece `SentencePieceText`
    (field 2: pieces; in a piece, field 2: id, field 4: begin). Parsed here so that protobuf is not a dependency."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        if key != (2 << 3 | 2):
            i = _skip(buf, i, key & 7)
            continue
        n, i = _varint(buf, i)
        j, end, fields = i, i + n, {2: 0, 4: 0}
        while j < end:
            k, j = _varint(buf, j)
            if k & 7 == 0 and k >> 3 in fields:
                fields[k >> 3], j = _varint(buf, j)
            else:
                j = _skip(buf, j, k & 7)
        out.append((fields[2], fields[4]))
        i = end
    return out


def _sp_ids_starts(tok, text):
    """sentencepiece: the ids of tok.encode(text, add_special_tokens=False) (special tokens split out first, the rest
    encoded as a whole) and the character where each token starts."""
    ids, starts, pos = [], [], 0
    pattern = "|".join(map(re.escape, tok.special_tokens))
    for m in [*(re.finditer(pattern, text) if pattern else ()), None]:
        a = m.start() if m else len(text)
        if a > pos:
            part = text[pos:a]
            pieces = _sp_pieces(tok.backend.encode(part, out_type="serialized_proto"))
            ids += [i for i, _ in pieces]
            begins = np.array([b for _, b in pieces], dtype=np.int64)
            if not part.isascii():  # byte offsets -> character offsets
                char_bytes = np.cumsum([0] + [len(c.encode()) for c in part])[:-1]
                begins = np.searchsorted(char_bytes, begins, side="right") - 1
            starts += (begins + pos).tolist()
        if m:
            ids.append(tok.token_to_id(m.group()))
            starts.append(a)
            pos = m.end()
    return ids, starts


def _tokenise_spans(tok, text, spans):
    """ids of `text` (tokenised once, as a whole) and a bool per token: does the token start inside one of the spans."""
    if tok.is_sp:
        ids, starts = _sp_ids_starts(tok, text)
    else:  # HF tokenizers give character offsets
        enc = tok.backend.encode(text, add_special_tokens=False)
        ids, starts = enc.ids, [s for s, _ in enc.offsets]
    starts = np.array(starts, dtype=np.int64)
    train = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        train |= (starts >= s) & (starts < e)
    return np.array(ids, dtype=np.int32), train


def _truncate(ids, train, seq_len, how):
    """A chat longer than seq_len: keep-start, keep-end, drop (None), or auto: when the final answer fits in
    seq_len, keep it whole with the context right before it (the prompt loses its start), else keep the start."""
    if how == "drop":
        return None
    trained = np.flatnonzero(train)
    end = int(trained[-1]) + 1 if len(trained) else len(ids)       # the end of the final answer
    gaps = np.flatnonzero(~train[:end])
    start = int(gaps[-1]) + 1 if len(gaps) else 0                    # its first token
    if how == "keep-end":
        return ids[-seq_len:], train[-seq_len:]
    if how == "auto" and len(trained) and end > seq_len and end - start < seq_len:
        stop = len(ids) if len(ids) - start <= seq_len else end
        return ids[stop - seq_len:stop], train[stop - seq_len:stop]
    return ids[:seq_len], train[:seq_len]


def _spans_encode(tok, text, spans, bos=True):
    """ids + trained flags of plain text (no chat template), BOS first when the tokenizer adds one."""
    lead = tok.bos_token if bos and tok.add_bos and tok.bos_token else ""
    return _tokenise_spans(tok, lead + text, [(s + len(lead), e + len(lead)) for s, e in spans])


def encode_record(tok, kind: str, payload, seq_len: int, template=None, train_on_prompt=False,
                  truncation: str = "auto") -> list[Example]:
    """One record -> examples. Raw text gets BOS/EOS and is cut into seq_len chunks (nothing is lost, so not
    "truncated"). Chats, completions and segments longer than seq_len are truncated by `truncation` (flagged; an
    empty list when dropped). Completions (TRL standard): prompt + completion + EOS, the completion and EOS
    trained. Segments (axolotl input_output): each tokenised alone, concatenated, the labelled ones trained."""
    if kind == "text":
        ids = tok.encode(payload, add_special_tokens=True)
        if tok.eos_id is not None:
            ids = ids + [tok.eos_id]
        ids = np.array(ids, dtype=np.int32)
        # chunks overlap by one token: a chunk's first token is never a target (nothing predicts it), so starting
        # each chunk on the previous chunk's last token makes every token after the first a target exactly once
        step = max(1, seq_len - 1)
        return [Example(ids[i:i + seq_len], np.ones(len(ids[i:i + seq_len]), dtype=bool))
                for i in range(0, max(1, len(ids) - 1), step)]
    if kind == "chat":
        ids, train = _tokenise_spans(tok, *assistant_spans(tok, payload, template))
    elif kind == "completion":
        prompt, completion = payload
        eos = tok.eos_token if tok.eos_token and not completion.endswith(tok.eos_token) else ""
        ids, train = _spans_encode(tok, prompt + completion + eos, [(len(prompt), len(prompt + completion + eos))])
    elif kind == "segments":
        parts = [tok.encode(t, add_special_tokens=False) for t, _ in payload]
        ids = np.array([i for p in parts for i in p], dtype=np.int32)
        train = np.array([lab for p, (_, lab) in zip(parts, payload) for _ in p], dtype=bool)
    else:
        raise ValueError(f"{kind} records cannot be trained by supervised fine-tuning")
    if train_on_prompt:
        train[:] = True
    if len(ids) <= seq_len:
        return [Example(ids, train)]
    cut = _truncate(ids, train, seq_len, truncation)
    return [Example(*cut, truncated=True)] if cut else []
