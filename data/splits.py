"""train.py's data: the train / eval examples of a config (sources loaded, sampled, mixed, split, packed; or a
--stream Stream) and its batch order."""
import random

from . import datasets
from .batches import PREFERENCE_REFUSED, BatchOrder, load_examples, pack, prompt_ids
from .pairs import load_preference
from .records import DataError
from .stream import Stream, StreamOrder


def _load_sources(tok, cfg, items: str, verbose: bool, mixed: bool = True):
    """Each source of --data (or --eval-data) loaded, sampled (num_samples) and mixed (--mix); stats summed."""
    lists, total = [], {}
    stage = getattr(cfg, "stage", "sft")
    for src in datasets.sources(cfg, items, verbose):
        if stage != "sft":  # preference pairs / labelled completions (data/pairs.py)
            exs, st = load_preference(tok, src.paths, stage, cfg.seq_len, cfg.template or None, opts=src.opts)
        elif src.ranking:
            raise DataError(f"{cfg.dataset_dir}/dataset_info.json: {src.name}: ranking: {PREFERENCE_REFUSED}")
        else:
            exs, st = load_examples(tok, src.paths, cfg.seq_len, cfg.template or None, cfg.train_on_prompt,
                                    opts=src.opts, truncation=cfg.truncation)
        lists.append(datasets.sample(exs, src.num_samples, cfg.seed))
        for k, v in st.items():
            total[k] = total.get(k, 0) + v if not isinstance(v, list) else total.get(k, []) + v
    if not mixed:  # held-out data: all of it, whatever --mix says of the training sources
        return datasets.mix(lists, "concat", None, cfg.seed), total
    return datasets.mix(lists, cfg.mix, datasets.mix_probs(cfg.mix_probs, len(lists)), cfg.seed), total


def make_order(examples, global_batch: int, seed: int, bucket: bool = True):
    """train.py's batch order: BatchOrder over a list of examples, StreamOrder over a --stream Stream."""
    if isinstance(examples, list):
        return BatchOrder([len(e) for e in examples], global_batch, seed, bucket)
    return StreamOrder(examples, global_batch)


def load_splits(tok, cfg, verbose: bool = True):
    """train.py's train / eval examples (validated, tokenised, mixed, optionally packed) and stats, for a config
    with train.py's fields (data, eval_data, eval_split, seq_len, template, the data flags...). stats["prompts"]:
    the prompt tokens of up to eval_samples eval examples (held-out data only), for sample answers. DataError on
    bad data. --stream: the training examples are a data.stream.Stream, tokenised as training goes."""
    if getattr(cfg, "stream", False):
        train = Stream(tok, cfg, verbose)
        next(train._source(train.sources[0]), None)  # the first record checked before anything is written
        ev, _ = _load_sources(tok, cfg, cfg.eval_data, verbose, mixed=False) if cfg.eval_data else ([], None)
        if verbose:
            print(f"data: streaming {cfg.data} (tokenised as training goes); {len(ev)} eval examples", flush=True)
        return train, pack(ev, cfg.seq_len) if cfg.pack else ev, {
            "prompts": [p for p in map(prompt_ids, ev) if p][:cfg.eval_samples]}
    train, st = _load_sources(tok, cfg, cfg.data, verbose)
    ev, est = _load_sources(tok, cfg, cfg.eval_data, verbose, mixed=False) if cfg.eval_data else ([], None)
    if cfg.eval_split and not cfg.eval_data:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n = max(1, int(len(train) * cfg.eval_split))
        ev, train = [train[i] for i in order[:n]], [train[i] for i in sorted(order[n:])]
    if verbose:
        print(f"data: {st['records']} records -> {len(train)} train / {len(ev)} eval examples; "
              f"{st['truncated']} truncated to {cfg.seq_len} tokens ({cfg.truncation})"
              + (f", {st['too_long']} longer dropped" if cfg.truncation == "drop" else "")
              + f"; {st['no_target']} without trained tokens dropped"
              + (f"; {st['prompt_truncated']} whose completion starts past --seq-len dropped"
                 if "prompt_truncated" in st else "")
              + (f"; {st['bad'] + (est or {}).get('bad', 0)} bad records skipped" if cfg.skip_bad_records else ""),
              flush=True)
    st["prompts"] = [p for p in map(prompt_ids, ev) if p][:cfg.eval_samples]  # a pair's: its chosen row's
    if cfg.pack:
        train, ev = pack(train, cfg.seq_len), pack(ev, cfg.seq_len)
    if not train:
        raise DataError(f"{cfg.data}: no usable training examples")
    return train, ev, st
