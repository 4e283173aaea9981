"""Demo domain `knowledge`: encyclopedia articles about a generated fictional world.

A fixed-seed generator invents kingdoms, cities and people with attributes (capital,
ruler, founding year, population, river, birthplace, occupation, …). Every entity gets
an article; all articles are training text, the knowledge to learn. Question–answer
documents about each entity go to the split of that entity (by a hash of its name):
training teaches the question format on train entities, validation and test ask about
the others, so a test question never appears in training text while its answer is
stated in an article. Evaluation tasks are (question prompt, exact answer) pairs.
"""

from __future__ import annotations

import random

from jbtx.data.demo.splits import split_of

VERSION = "v1"
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "br", "kr",
           "st", "vel", "mor", "ash")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
_CODAS = ("", "n", "r", "s", "th", "l", "m", "nd", "sk", "rin")
_OCCUPATIONS = ("astronomer", "shipwright", "poet", "cartographer", "brewer", "physician",
                "architect", "weaver", "historian", "glassblower", "merchant", "composer")
_PRODUCTS = ("amber", "salt", "wool", "copper", "silk", "glass", "tea", "timber", "wine",
             "paper", "iron", "honey")
_COINS = ("crown", "mark", "florin", "talent", "shell", "ring")


def _namer(rng: random.Random):
  """A function returning fresh capitalised names, never the same one twice."""
  used: set[str] = set()

  def name(syllables: int) -> str:
    while True:
      word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
      word = (word + rng.choice(_CODAS)).capitalize()
      if word not in used:
        used.add(word)
        return word
  return name


def world(seed: int = 0, n_kingdoms: int = 12, n_cities: int = 240,
          n_people: int = 480) -> list[dict]:
  """The entities: dicts with "kind", "name", "article" and "facts" [(question, answer)]."""
  rng = random.Random(seed)
  name = _namer(rng)
  kingdoms = [{"name": name(2), "founded": rng.randint(300, 1400),
               "coin": rng.choice(_COINS)} for _ in range(n_kingdoms)]
  cities = [{"name": name(2), "kingdom": rng.choice(kingdoms), "river": name(2),
             "population": rng.randint(2, 900) * 100, "founded": rng.randint(200, 1700),
             "product": rng.choice(_PRODUCTS)} for _ in range(n_cities)]
  people = [{"name": f"{name(2)} {name(3)}", "born_in": rng.choice(cities),
             "born": rng.randint(1500, 1900), "occupation": rng.choice(_OCCUPATIONS)}
            for _ in range(n_people)]
  for kingdom in kingdoms:
    kingdom["capital"] = rng.choice([c for c in cities if c["kingdom"] is kingdom] or cities)
    kingdom["ruler"] = rng.choice(people)
  return ([_kingdom(k) for k in kingdoms] + [_city(c) for c in cities]
          + [_person(p) for p in people])


def _kingdom(k: dict) -> dict:
  article = (f"{k['name']} is a kingdom founded in the year {k['founded']}. Its capital "
             f"is {k['capital']['name']} and it is ruled by {k['ruler']['name']}. The "
             f"currency of {k['name']} is the {k['coin']}.")
  facts = [(f"What is the capital of {k['name']}?", k["capital"]["name"]),
           (f"Who rules {k['name']}?", k["ruler"]["name"]),
           (f"In which year was the kingdom of {k['name']} founded?", str(k["founded"])),
           (f"What is the currency of {k['name']}?", k["coin"])]
  return {"kind": "kingdom", "name": k["name"], "article": article, "facts": facts}


def _city(c: dict) -> dict:
  article = (f"{c['name']} is a city in the kingdom of {c['kingdom']['name']}, on the "
             f"river {c['river']}. It was founded in {c['founded']} and has about "
             f"{c['population']} inhabitants. {c['name']} is known for its "
             f"{c['product']}.")
  facts = [(f"In which kingdom is the city of {c['name']}?", c["kingdom"]["name"]),
           (f"On which river does {c['name']} lie?", c["river"]),
           (f"In which year was the city of {c['name']} founded?", str(c["founded"])),
           (f"What is {c['name']} known for?", c["product"])]
  return {"kind": "city", "name": c["name"], "article": article, "facts": facts}


def _person(p: dict) -> dict:
  article = (f"{p['name']} was a {p['occupation']} born in {p['born']} in the city of "
             f"{p['born_in']['name']}, in the kingdom of {p['born_in']['kingdom']['name']}.")
  facts = [(f"Where was {p['name']} born?", p["born_in"]["name"]),
           (f"In which year was {p['name']} born?", str(p["born"])),
           (f"What was the occupation of {p['name']}?", p["occupation"])]
  return {"kind": "person", "name": p["name"], "article": article, "facts": facts}


def build() -> tuple[dict[str, list[str]], dict[str, list[dict[str, str]]]]:
  """Documents (articles in train; Q&A by entity split) and tasks per split."""
  docs: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
  tasks: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
  for entity in world():
    docs["train"].append(entity["article"])
    split = split_of(entity["name"], held_out=0.1)
    prompts = [(f"Question: {q}\nAnswer:", a) for q, a in entity["facts"]]
    docs[split].append("\n".join(f"{p} {a}" for p, a in prompts) + "\n")
    tasks[split].extend({"prompt": p, "answer": a} for p, a in prompts)
  return docs, tasks
