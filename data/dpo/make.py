"""Writes train.jsonl and heldout.jsonl: a small preference dataset written for nanotune (regenerate: python -m
data.dpo.make), for the README's DPO example. Every pair answers the same question twice: the chosen answer
is brief and starts with "In short:", the rejected one says the same fact buried in hedging filler. After DPO the
model should answer held-out questions (never in train.jsonl) in the chosen style: shorter, "In short: ...".
Records use TRL's conversational shape (prompt / chosen / rejected as message lists) and LLaMA-Factory's sharegpt
pairs, both rendered through the model's chat template."""
import json
import random
from pathlib import Path

FACTS = [
    ("What is the capital of France?", "the capital of France is Paris"),
    ("What is the capital of Japan?", "the capital of Japan is Tokyo"),
    ("What is the capital of Spain?", "the capital of Spain is Madrid"),
    ("What is the capital of Canada?", "the capital of Canada is Ottawa"),
    ("What is the capital of Egypt?", "the capital of Egypt is Cairo"),
    ("How many days are in a week?", "a week has seven days"),
    ("How many hours are in a day?", "a day has 24 hours"),
    ("How many legs does a spider have?", "a spider has eight legs"),
    ("How many continents are there?", "there are seven continents"),
    ("What do bees make?", "bees make honey"),
    ("What is water made of?", "water is made of hydrogen and oxygen"),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system"),
    ("What is the closest star to Earth?", "the Sun is the closest star to Earth"),
    ("What gas do plants take in?", "plants take in carbon dioxide"),
    ("What is the freezing point of water?", "water freezes at 0 degrees Celsius"),
    ("What is the boiling point of water?", "water boils at 100 degrees Celsius at sea level"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet"),
    ("What is the fastest land animal?", "the cheetah is the fastest land animal"),
    ("What is the largest ocean?", "the Pacific is the largest ocean"),
    ("What colour is a ripe banana?", "a ripe banana is yellow"),
    ("What is 7 times 8?", "7 times 8 is 56"),
    ("What is the square root of 81?", "the square root of 81 is 9"),
    ("What language is spoken in Brazil?", "Portuguese is the main language of Brazil"),
    ("What is the opposite of cold?", "the opposite of cold is hot"),
    ("Which planet is called the red planet?", "Mars is called the red planet"),
    ("What do caterpillars turn into?", "caterpillars turn into butterflies or moths"),
    ("How many sides does a hexagon have?", "a hexagon has six sides"),
    ("What is the main ingredient of bread?", "bread is mainly made of flour"),
    ("What organ pumps blood?", "the heart pumps blood"),
    ("What is frozen water called?", "frozen water is called ice"),
    ("Which animal says moo?", "a cow says moo"),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain above sea level"),
]
HELDOUT = [("What is the capital of Italy?", "In short: The capital of Italy is Rome."),
           ("How many months are in a year?", "In short: A year has twelve months."),
           ("What do cows drink?", "In short: Cows drink water."),
           ("What is the largest desert?", "In short: Antarctica is the largest desert."),
           ("How many wheels does a bicycle have?", "In short: A bicycle has two wheels."),
           ("What colour is grass?", "In short: Grass is green.")]
FILLERS = ["Well, that is a really interesting question, and there are many ways to think about it. ",
           "Great question! Before I answer, it is worth saying that people often wonder about this. ",
           "Hmm, let me think about that for a moment, because it is not always as simple as it looks. ",
           "That's something a lot of people ask, and honestly the answer can depend on who you ask. "]
ENDINGS = [" I hope this helps, and please let me know if you have any other questions at all!",
           " There is a lot more that could be said about this topic, of course, but that is the basic idea.",
           " Of course, you may want to double-check this with other sources to be completely sure."]


def main():
    rng = random.Random(0)
    out = []
    for i, (q, fact) in enumerate(FACTS):
        for k in range(2):  # two pairs per question, with different filler; TRL's shape and LLaMA-Factory's
            chosen = f"In short: {fact[0].upper() + fact[1:]}."
            rejected = rng.choice(FILLERS) + f"As far as I know, {fact}." + rng.choice(ENDINGS)
            if k == 0:
                out.append({"prompt": [{"role": "user", "content": q}],
                            "chosen": [{"role": "assistant", "content": chosen}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
            else:
                out.append({"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": chosen},
                            "rejected": {"from": "gpt", "value": rejected}})
    rng.shuffle(out)
    here = Path(__file__).parent
    (here / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    (here / "heldout.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                                      {"role": "assistant", "content": a}]}) + "\n"
                                                for q, a in HELDOUT))


if __name__ == "__main__":
    main()
