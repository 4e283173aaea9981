"""Demo domain `math`: generated arithmetic and algebra word problems, worked and answered.

Every document is one problem: `Problem: …`, a worked `Solution: …` and
`Answer: <integer>`. Problems come from a fixed-seed generator, are deduplicated by
their question, and are assigned to a split by a hash of the question, so no test
question appears in training text. Evaluation tasks are (prompt up to `Solution:`,
exact answer) pairs.
"""

from __future__ import annotations

import random

from jbtx.data.demo.splits import split_of

VERSION = "v1"
N_PROBLEMS = 12000
_NAMES = ("Ada", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun",
          "Kira", "Luis", "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tove")
_ITEMS = ("apples", "pencils", "marbles", "stamps", "books", "cards", "shells", "coins")

Problem = tuple[str, str, int]  # (question, worked solution, answer)


def _arithmetic(rng: random.Random) -> Problem:
  a, b, c = rng.randint(2, 99), rng.randint(2, 30), rng.randint(2, 30)
  product = b * c
  return (f"Compute {a} + {b} × {c}.",
          f"Multiplication comes first: {b} × {c} = {product}. "
          f"Then {a} + {product} = {a + product}.", a + product)


def _linear(rng: random.Random) -> Problem:
  x, a, b = rng.randint(-20, 20), rng.randint(2, 12), rng.randint(1, 60)
  rhs = a * x + b
  return (f"Solve for x: {a}x + {b} = {rhs}.",
          f"Subtract {b} from both sides: {a}x = {rhs - b}. "
          f"Divide both sides by {a}: x = {x}.", x)


def _shopping(rng: random.Random) -> Problem:
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  boxes, per_box = rng.randint(2, 15), rng.randint(3, 24)
  total = boxes * per_box
  given = rng.randint(1, total - 1)
  return (f"{name} buys {boxes} boxes of {item} with {per_box} {item} in each box and "
          f"gives away {given} {item}. How many {item} does {name} have left?",
          f"{name} buys {boxes} × {per_box} = {total} {item}. "
          f"After giving away {given}, {total} − {given} = {total - given} remain.",
          total - given)


def _percent(rng: random.Random) -> Problem:
  percent = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75))
  whole = rng.randint(1, 60) * 20
  part = whole * percent // 100
  return (f"What is {percent}% of {whole}?",
          f"{percent}% of {whole} is {whole} × {percent} / 100 = {part}.", part)


def _distance(rng: random.Random) -> Problem:
  speed, hours = rng.randint(3, 120), rng.randint(2, 9)
  return (f"A traveller moves at {speed} km per hour for {hours} hours. "
          "How many kilometres does the traveller cover?",
          f"Distance is speed × time: {speed} × {hours} = {speed * hours} km.",
          speed * hours)


def _system(rng: random.Random) -> Problem:
  x, y = rng.randint(-15, 15), rng.randint(-15, 15)
  return (f"Find x if x + y = {x + y} and x − y = {x - y}.",
          f"Adding the two equations gives 2x = {2 * x}, so x = {x} (and y = {y}).", x)


_GENERATORS = (_arithmetic, _linear, _shopping, _percent, _distance, _system)


def problems(n: int = N_PROBLEMS, seed: int = 0) -> list[Problem]:
  """`n` generated problems with distinct questions, in generation order."""
  rng = random.Random(seed)
  seen: dict[str, Problem] = {}
  while len(seen) < n:
    problem = rng.choice(_GENERATORS)(rng)
    seen.setdefault(problem[0], problem)
  return list(seen.values())


def build() -> tuple[dict[str, list[str]], dict[str, list[dict[str, str]]]]:
  """Documents and evaluation tasks (`{"prompt", "answer"}`) per split."""
  docs: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
  tasks: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
  for question, solution, answer in problems():
    split = split_of(question)
    prompt = f"Problem: {question}\nSolution:"
    docs[split].append(f"{prompt} {solution}\nAnswer: {answer}\n")
    tasks[split].append({"prompt": prompt, "answer": str(answer)})
  return docs, tasks
