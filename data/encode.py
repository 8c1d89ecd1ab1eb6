"""Tokenise a record through the model's chat template and mark which tokens are trained.

A conversation is rendered once with the chat template and tokenised once (so the ids are exactly what
`transformers`' apply_chat_template + tokenize gives). The trained character spans are found by rendering
prefixes: assistant turn i spans from the end of render(messages[:i], add_generation_prompt=True) to the end of
render(messages[:i+1]) with trailing whitespace removed, i.e. the answer plus its end-of-turn token. Tokens whose
first character lies in a trained span are trained; everything else (system, user, role headers) gets label -100.
"""
from dataclasses import dataclass

import numpy as np

from model.tokenizer import END_OF_TURN


@dataclass
class Example:
    ids: np.ndarray       # (T,) int32 token ids
    train: np.ndarray     # (T,) bool: this token is a training target (label = id), else label -100
    truncated: bool = False
    seg: np.ndarray | None = None  # (T,) int32 example index inside a packed row; None when not packed


def assistant_spans(tok, messages, template=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the assistant answers + end-of-turn tokens."""
    render = tok.chat_renderer(template)
    text = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], add_generation_prompt=True) if i else ""
        upto = render(messages[:i + 1]) if i + 1 < len(messages) else text
        if i and text.startswith(prefix) and text.startswith(upto) and len(prefix) >= cursor:
            start, end = len(prefix), len(upto.rstrip())
        else:  # a template whose prefixes are not stable (e.g. adds a system prompt only for some turns)
            start = text.find(m["content"], cursor)
            if start < 0:
                raise ValueError("the chat template does not reproduce an assistant message verbatim")
            end = start + len(m["content"])
            rest = text[end:]
            end += len(rest) - len(rest.lstrip())  # whitespace, then the end-of-turn token if one follows
            eot = next((t for t in (*END_OF_TURN, tok.eos_token or "") if t and rest.lstrip().startswith(t)), None)
            end = end + len(eot) if eot else start + len(m["content"])
        spans.append((start, end))
        cursor = end
    return text, spans


def _tokenise_spans(tok, text, spans):
    """ids of `text` and a bool per token: does the token start inside one of the spans."""
    if not tok.is_sp:  # HF tokenizers give character offsets: tokenise the whole text once
        enc = tok.backend.encode(text, add_special_tokens=False)
        starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
        train = np.zeros(len(enc.ids), dtype=bool)
        for s, e in spans:
            train |= (starts >= s) & (starts < e)
        return np.array(enc.ids, dtype=np.int32), train
    ids, train, pos = [], [], 0  # sentencepiece: tokenise piece by piece at the span boundaries
    for s, e in spans + [(len(text), len(text))]:
        for a, b, flag in ((pos, s, False), (s, e, True)):
            if b > a:
                piece = tok.encode(text[a:b], add_special_tokens=False)
                ids += piece
                train += [flag] * len(piece)
        pos = e
    return np.array(ids, dtype=np.int32), np.array(train, dtype=bool)


def encode_record(tok, kind: str, payload, seq_len: int, template=None, train_on_prompt=False) -> list[Example]:
    """One record -> examples. Chats longer than seq_len are truncated (keeping the start, flagged);
    raw text gets BOS/EOS and is cut into seq_len chunks (nothing is lost, so not "truncated")."""
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
    text, spans = assistant_spans(tok, payload, template)
    ids, train = _tokenise_spans(tok, text, spans)
    if train_on_prompt:
        train[:] = True
    truncated = len(ids) > seq_len
    return [Example(ids[:seq_len], train[:seq_len], truncated)]
