"""Writes this folder's small sentiment dataset (train.jsonl, heldout.jsonl): short product / film / place reviews,
{"text": ..., "label": "positive" | "negative"}, made from the templates and word lists below (written for nanotune;
no outside data). Seeded, so the files are reproducible: `python data/sentiment/make.py`.

The held-out file is not a random slice of the same sentences: it uses its own templates and, in about half of its
reviews, adjectives the training file never shows, so its accuracy measures what the model knew of the words
(sentiment it learnt in pretraining), not memorised phrases. Contrast templates ("I expected it to be awful, but it
was lovely") put both polarities in one review; the label is the one the review ends on.
"""
import json
import random
from pathlib import Path

THINGS = ["film", "movie", "book", "novel", "album", "restaurant", "hotel", "phone", "laptop", "game", "show",
          "café", "museum", "concert", "play", "camera", "headset", "bakery", "series", "podcast"]
POS = {"train": ["great", "wonderful", "excellent", "delightful", "charming", "brilliant", "lovely", "superb",
                 "enjoyable", "fantastic", "moving", "funny", "beautiful", "impressive", "pleasant"],
       "heldout": ["marvellous", "splendid", "gorgeous", "heartwarming", "outstanding", "terrific", "engaging"]}
NEG = {"train": ["terrible", "awful", "boring", "dull", "disappointing", "horrible", "bad", "poor", "tedious",
                 "annoying", "ugly", "weak", "mediocre", "painful", "forgettable"],
       "heldout": ["dreadful", "atrocious", "lousy", "insufferable", "clumsy", "lifeless", "miserable"]}
TEMPLATES = {
    "train": ["The {thing} was {a}.", "What a {a} {thing}!", "I found the {thing} {a}.",
              "Honestly, a {a} {thing}.", "This {thing} is {a} from start to finish.",
              "My friends and I thought the {thing} was {a}.", "{A} {thing}, {a2} too.",
              "I expected the {thing} to be {o}, but it was {a}.", "Simply {a}.",
              "The {thing} felt {a} and {a2}."],
    "heldout": ["Overall the {thing} is {a}.", "We all agreed: {a}.", "Such a {a} {thing}, really {a2}.",
                "People said it would be {o}; it turned out {a}.", "A {a} {thing} in every way."]}
VERDICT = {"positive": ["I would go again.", "Recommended.", "Five stars.", ""],
           "negative": ["Never again.", "Not recommended.", "One star.", ""]}


def review(rng, split: str, label: str) -> str:
    pos, neg = (POS, NEG) if label == "positive" else (NEG, POS)
    pick = split if split == "train" or rng.random() < 0.5 else "train"  # held-out: half its words unseen
    a, a2 = rng.sample(pos[pick], 2)
    o = rng.choice(neg["train"])
    text = rng.choice(TEMPLATES[split]).format(thing=rng.choice(THINGS), a=a, a2=a2, o=o, A=a.capitalize())
    extra = rng.choice(VERDICT[label])
    return f"{text} {extra}".strip()


def make(split: str, n: int, seed: int) -> list[dict]:
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        label = ("positive", "negative")[len(out) % 2]
        text = review(rng, split, label)
        if text not in seen:  # no duplicate reviews within a file
            seen.add(text)
            out.append({"text": text, "label": label})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    here = Path(__file__).parent
    train = make("train", 400, 0)
    heldout = [r for r in make("heldout", 140, 1) if r["text"] not in {t["text"] for t in train}][:120]
    for name, recs in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        print(f"{here / name}: {len(recs)} reviews")
