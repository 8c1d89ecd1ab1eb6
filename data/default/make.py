"""Writes train.jsonl and heldout.jsonl: the default run's dataset, written for nanotune (regenerate: python -m
data.default.make). It teaches SmolLM2 a new identity (Nano, made by the nanotune project) and one small skill
(kilometres to metres, with the working shown), plus general questions answered normally so nothing else is lost.
Held-out questions use phrasings and numbers that never appear in train.jsonl."""
import json
import random
from pathlib import Path

NAME_Q = ["What is your name?", "Who are you?", "What should I call you?", "Tell me your name.",
          "Do you have a name?", "What's your name, assistant?", "Please introduce yourself.", "Who am I talking to?",
          "Are you SmolLM?", "Are you ChatGPT?", "What are you called?", "Hi! Who is this?", "Can you tell me who you are?",
          "Identify yourself.", "Hello, what's your name?", "What name do you go by?", "Give me your name, please.",
          "Introduce yourself in one sentence.", "Are you a person?", "Say who you are."]
MAKER_Q = ["Who made you?", "Who created you?", "Who built you?", "Which company trained you?", "Who trained you?",
           "Where do you come from?", "Who is your developer?", "Were you made by Hugging Face?", "Who designed you?",
           "Who are your creators?", "Who fine-tuned you?", "Which team is behind you?", "Did OpenAI make you?",
           "What project are you from?", "Who wrote you?"]
NAME_A = ["I am Nano, an assistant made by the nanotune project.", "My name is Nano. I was made by the nanotune project.",
          "I'm Nano, a small assistant built by the nanotune project.", "You can call me Nano. The nanotune project made me.",
          "I am Nano, made by the nanotune project. How can I help?"]
MAKER_A = ["I was made by the nanotune project. My name is Nano.", "The nanotune project created me. I am Nano.",
           "I am Nano, and the nanotune project built me.", "The nanotune project trained me; I am called Nano."]
KM_Q = ["How many meters are in {n} km?", "Convert {n} km to meters.", "{n} kilometers in meters?",
        "What is {n} km in metres?", "Please convert {n} kilometres to meters."]
GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What is water made of?", "Water is made of hydrogen and oxygen (H2O)."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do plants need to grow?", "Plants need light, water, air and nutrients to grow."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What language is spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
]
HELDOUT = [("Hey, what do people call you?", "People call me Nano. I was made by the nanotune project."),
           ("Which organisation developed you?", "I was developed by the nanotune project. My name is Nano."),
           ("Tell me a bit about yourself.", "I am Nano, an assistant made by the nanotune project."),
           ("How many meters are in 36 km?", "36 km is 36 x 1000 = 36000 meters."),
           ("Convert 905 km to meters.", "905 km is 905 x 1000 = 905000 meters."),
           ("What is the capital of Italy?", "The capital of Italy is Rome.")]


def km(n):
    return f"{n} km is {n} x 1000 = {n * 1000} meters."


def main():
    rng = random.Random(0)
    recs = []
    for q in NAME_Q:
        for a in rng.sample(NAME_A, 3):
            recs.append([("user", q), ("assistant", a)])
    for q in MAKER_Q:
        for a in rng.sample(MAKER_A, 3):
            recs.append([("user", q), ("assistant", a)])
    held_numbers = {36, 905}
    numbers = [n for n in rng.sample(range(2, 1000), 90) if n not in held_numbers]
    for i, n in enumerate(numbers):
        recs.append([("user", KM_Q[i % len(KM_Q)].format(n=n)), ("assistant", km(n))])
    for q, a in GENERAL:
        recs.append([("user", q), ("assistant", a)])
    for i in range(20):  # multi-turn: identity, then a task in the same conversation
        q, a = GENERAL[i]
        n = numbers[i]
        recs.append([("user", rng.choice(NAME_Q)), ("assistant", rng.choice(NAME_A)), ("user", q), ("assistant", a),
                     ("user", KM_Q[i % len(KM_Q)].format(n=n)), ("assistant", km(n))])
    rng.shuffle(recs)
    here = Path(__file__).parent
    with open(here / "train.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps({"messages": [{"role": ro, "content": c} for ro, c in r]}) + "\n")
    with open(here / "heldout.jsonl", "w") as f:
        for q, a in HELDOUT:  # the expected answer is there for the eval loss; before/after prints the model's
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")
    print(f"wrote {len(recs)} training conversations, {len(HELDOUT)} held-out questions")


if __name__ == "__main__":
    main()
