"""Arithmetic word problems written by the project (GSM8K-like), with worked answers.

Sixteen templates (names, objects and numbers drawn from a seeded ``random.Random``), each a short
multi-step problem whose worked answer shows every computation on its own line and ends with
``The answer is N.`` (the final number). Nothing is copied from a dataset.

Splits (`make_math`), disjoint by construction and by check:

* ``train``: the 12 templates not in `HELDOUT_TEMPLATES`, drawn with ``seed``;
* ``eval``: half from the same 12 templates drawn with another stream (``seen_template``: new
  names and numbers), half from the 4 `HELDOUT_TEMPLATES` that training never sees
  (``heldout_template``); an eval problem whose text also occurs in train is redrawn.

Known flaw, kept so that the shipped adapter's data stays reproducible (its card holds the data's
sha256): the ``change`` template pays $100 also when the purchase costs more, so 32 of the 6,400
default problems (0.5%) have a negative "change" (worked consistently, e.g. ``100 - 108 = $-8``).

`parse_final_number` reads the answer back: ``#### N``, ``The answer is N``, else the last number
in the text (so a model that ignores the answer format is not penalised for it).
"""
from __future__ import annotations

import random
import re
from typing import Callable

from mechdiff.errors import DataError

NAMES = [("Aigerim", "she"), ("Daniyar", "he"), ("Maria", "she"), ("Tom", "he"), ("Aliya", "she"),
         ("Arman", "he"), ("Sofia", "she"), ("Omar", "he"), ("Lena", "she"), ("Ivan", "he"),
         ("Dana", "she"), ("Erlan", "he"), ("Nina", "she"), ("Sam", "he"), ("Zhanna", "she"),
         ("Ruslan", "he"), ("Emma", "she"), ("Ali", "he"), ("Kate", "she"), ("Timur", "he")]
ITEMS = ["clips", "stickers", "postcards", "cupcakes", "bracelets", "candles", "notebooks", "badges"]
PRICED = [("pen", "pens"), ("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
          ("toy car", "toy cars"), ("mug", "mugs"), ("book", "books")]
FRUIT = ["apples", "oranges", "pears", "plums", "peaches", "lemons"]
THINGS = ["bicycle", "jacket", "lamp", "backpack", "chair", "guitar", "watch", "kettle"]
FLOWERS = ["tulips", "roses", "daisies", "sunflowers", "lilies"]
MONTHS = [("April", "May"), ("June", "July"), ("March", "April"), ("September", "October")]
WORK = ["babysitting", "tutoring", "walking dogs", "washing cars", "gardening"]

Problem = tuple[str, list[str], int]


def _who(rng: random.Random, avoid: str | None = None) -> tuple[str, str, str]:
    name, pron = rng.choice([n for n in NAMES if n[0] != avoid])
    return name, pron, pron.capitalize()


def t_sold_half(rng: random.Random) -> Problem:
    n, _, _ = _who(rng)
    a = 2 * rng.randint(6, 49)
    item = rng.choice(ITEMS)
    m1, m2 = rng.choice(MONTHS)
    h = a // 2
    q = (f"{n} sold {a} {item} in {m1}, and then sold half as many {item} in {m2}. "
         f"How many {item} did {n} sell altogether in {m1} and {m2}?")
    return q, [f"In {m2}, {n} sold {a} / 2 = {h} {item}.", f"Altogether, {n} sold {a} + {h} = {a + h} {item}."], a + h


def t_wage(rng: random.Random) -> Problem:
    n, p, P = _who(rng)
    w, h, d = rng.randint(5, 25), rng.randint(2, 8), rng.randint(2, 6)
    job = rng.choice(WORK)
    q = f"{n} earns ${w} an hour for {job}. {P} works {h} hours a day for {d} days. How much money does {n} earn?"
    return q, [f"In one day, {n} earns {w} * {h} = ${w * h}.", f"In {d} days, {p} earns {w * h} * {d} = ${w * h * d}."], w * h * d


def t_change(rng: random.Random) -> Problem:
    n, p, P = _who(rng)
    one, many = rng.choice(PRICED)
    k, c = rng.randint(2, 9), rng.randint(2, 15)
    bill = 50 if k * c < 50 else 100
    q = f"{n} buys {k} {many} for ${c} each and pays with a ${bill} bill. How much change does {p} get?"
    return q, [f"The {many} cost {k} * {c} = ${k * c}.", f"The change is {bill} - {k * c} = ${bill - k * c}."], bill - k * c


def t_fruit(rng: random.Random) -> Problem:
    n, p, P = _who(rng)
    f, _, _ = _who(rng, avoid=n)
    fruit = rng.choice(FRUIT)
    a = rng.randint(20, 80)
    b, c = rng.randint(3, a - 5), rng.randint(5, 40)
    q = f"{n} has {a} {fruit}. {P} gives {b} of them to {f} and then buys {c} more. How many {fruit} does {n} have now?"
    return q, [f"After giving some away, {n} has {a} - {b} = {a - b} {fruit}.",
               f"After buying more, {p} has {a - b} + {c} = {a - b + c} {fruit}."], a - b + c


def t_eggs(rng: random.Random) -> Problem:
    n, _, _ = _who(rng)
    r, c = rng.randint(2, 8), rng.randint(3, 12)
    u = rng.randint(1, r * c - 1)
    q = f"A box holds {r} rows of {c} eggs. {n} uses {u} eggs for baking. How many eggs are left in the box?"
    return q, [f"The box holds {r} * {c} = {r * c} eggs.", f"After baking, {r * c} - {u} = {r * c - u} eggs are left."], r * c - u


def t_pages(rng: random.Random) -> Problem:
    n, _, _ = _who(rng)
    r, d = rng.randint(5, 30), rng.randint(2, 9)
    total = r * d + rng.randint(10, 150)
    q = f"A book has {total} pages. {n} reads {r} pages every day for {d} days. How many pages are left to read?"
    return q, [f"{n} reads {r} * {d} = {r * d} pages.", f"Pages left: {total} - {r * d} = {total - r * d}."], total - r * d


def t_savings(rng: random.Random) -> Problem:
    n, p, P = _who(rng)
    s, w = rng.randint(5, 40), rng.randint(3, 12)
    e = rng.randint(1, s * w - 1)
    thing = rng.choice(THINGS)
    q = f"{n} saves ${s} every week for {w} weeks and then spends ${e} on a {thing}. How much money does {p} have left?"
    return q, [f"{n} saves {s} * {w} = ${s * w}.", f"After buying the {thing}, {p} has {s * w} - {e} = ${s * w - e} left."], s * w - e


def t_teams(rng: random.Random) -> Problem:
    t = rng.randint(2, 6)
    total = t * rng.randint(3, 10)
    g = rng.randint(1, total - 1)
    b = total - g
    q = f"A class has {g} girls and {b} boys. The teacher splits the class into teams of {t}. How many teams are there?"
    return q, [f"The class has {g} + {b} = {total} children.", f"There are {total} / {t} = {total // t} teams."], total // t


def t_discount(rng: random.Random) -> Problem:
    thing = rng.choice(THINGS)
    k = rng.choice([10, 20, 25, 50])
    p = 20 * rng.randint(1, 20)
    d = p * k // 100
    q = f"A {thing} costs ${p}. The shop gives a {k}% discount. How much does the {thing} cost after the discount?"
    return q, [f"The discount is {p} * {k} / 100 = ${d}.", f"The new price is {p} - {d} = ${p - d}."], p - d


def t_drive(rng: random.Random) -> Problem:
    n, p, P = _who(rng)
    v, h, u = 5 * rng.randint(6, 18), rng.randint(2, 5), rng.randint(5, 60)
    q = f"{n} drives at {v} km per hour for {h} hours and then drives {u} more km. How many km does {p} drive in total?"
    return q, [f"In {h} hours, {n} drives {v} * {h} = {v * h} km.", f"In total, {p} drives {v * h} + {u} = {v * h + u} km."], v * h + u


def t_ages(rng: random.Random) -> Problem:
    n, _, _ = _who(rng)
    m, _, _ = _who(rng, avoid=n)
    x, k, y = rng.randint(3, 15), rng.randint(2, 4), rng.randint(2, 10)
    a = x * k
    q = f"{n} is {x} years old. {m} is {k} times as old as {n}. How old will {m} be in {y} years?"
    return q, [f"{m} is {x} * {k} = {a} years old now.", f"In {y} years, {m} will be {a} + {y} = {a + y} years old."], a + y


def t_cookies(rng: random.Random) -> Problem:
    b = rng.randint(2, 6)
    n, m = rng.randint(2, 6), rng.randint(6, 12)
    total = n * m
    left = b * rng.randint(1, (total - 1) // b)
    s = total - left
    q = (f"A bakery bakes {n} trays of {m} cookies. It sells {s} cookies and packs the rest in bags of {b}. "
         f"How many bags does it fill?")
    return q, [f"The bakery bakes {n} * {m} = {total} cookies.", f"After selling, {total} - {s} = {left} cookies are left.",
               f"They fill {left} / {b} = {left // b} bags."], left // b


def t_share(rng: random.Random) -> Problem:
    k, each = rng.randint(2, 8), rng.randint(5, 40)
    e = rng.randint(1, each - 1)
    total = k * each
    q = f"{k} friends share ${total} equally. Each of them spends ${e}. How much money does each friend have left?"
    return q, [f"Each friend gets {total} / {k} = ${each}.", f"Each friend has {each} - {e} = ${each - e} left."], each - e


def t_marbles(rng: random.Random) -> Problem:
    n, _, _ = _who(rng)
    m, _, _ = _who(rng, avoid=n)
    x, k = rng.randint(4, 40), rng.randint(2, 5)
    q = f"{n} has {x} marbles. {m} has {k} times as many marbles as {n}. How many marbles do they have together?"
    return q, [f"{m} has {x} * {k} = {x * k} marbles.", f"Together they have {x} + {x * k} = {x + x * k} marbles."], x + x * k


def t_films(rng: random.Random) -> Problem:
    n, _, _ = _who(rng)
    h, m, m2 = rng.randint(1, 3), rng.randint(5, 55), rng.randint(20, 100)
    q = (f"{n} watches two films. The first lasts {h} hours and {m} minutes, and the second lasts {m2} minutes. "
         f"How many minutes does {n} watch in total?")
    return q, [f"{h} hours is {h} * 60 = {60 * h} minutes.", f"The first film lasts {60 * h} + {m} = {60 * h + m} minutes.",
               f"Together: {60 * h + m} + {m2} = {60 * h + m + m2} minutes."], 60 * h + m + m2


def t_garden(rng: random.Random) -> Problem:
    n, p, P = _who(rng)
    fl = rng.choice(FLOWERS)
    r, c = rng.randint(2, 9), rng.randint(3, 12)
    k, add = rng.randint(1, r * c - 1), rng.randint(2, 30)
    q = (f"{n} plants {r} rows of {c} {fl}. {k} of them do not grow, so {p} plants {add} more. "
         f"How many {fl} are growing now?")
    return q, [f"{n} plants {r} * {c} = {r * c} {fl}.", f"{r * c} - {k} = {r * c - k} of them grow.",
               f"With the new ones: {r * c - k} + {add} = {r * c - k + add} {fl}."], r * c - k + add


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "sold_half": t_sold_half, "wage": t_wage, "change": t_change, "fruit": t_fruit, "eggs": t_eggs,
    "pages": t_pages, "savings": t_savings, "teams": t_teams, "discount": t_discount, "drive": t_drive,
    "ages": t_ages, "cookies": t_cookies, "share": t_share, "marbles": t_marbles, "films": t_films,
    "garden": t_garden,
}
#: Templates that only the eval split uses (one additive, one percent, one three-step, one product).
HELDOUT_TEMPLATES: tuple[str, ...] = ("fruit", "discount", "cookies", "marbles")
TRAIN_TEMPLATES: tuple[str, ...] = tuple(t for t in TEMPLATES if t not in HELDOUT_TEMPLATES)


def worked_answer(steps: list[str], answer: int) -> str:
    return "\n".join(steps) + f"\nThe answer is {answer}."


def _draw(rng: random.Random, template: str) -> dict:
    q, steps, a = TEMPLATES[template](rng)
    return {"question": q, "answer_text": worked_answer(steps, a), "answer": a, "template": template}


def make_math(seed: int = 0, n_train: int = 6000, n_eval: int = 400) -> dict[str, list[dict]]:
    """Train and eval splits: ``{"train": [...], "eval": [...]}``; rows are ``{id, question,
    answer_text, answer, template, split, kind}`` (kind: train | seen_template | heldout_template).

    Deterministic for a given (seed, n_train, n_eval); train and eval share no question text.
    """
    if n_train < 1 or n_eval < 2:
        raise DataError("make_math needs n_train >= 1 and n_eval >= 2")
    rng = random.Random(f"mechdiff-math-train-{seed}")
    train, seen = [], set()
    while len(train) < n_train:
        row = _draw(rng, TRAIN_TEMPLATES[len(train) % len(TRAIN_TEMPLATES)])
        if row["question"] in seen:  # no duplicates inside train either
            continue
        seen.add(row["question"])
        train.append({"id": f"math-train-{len(train)}", **row, "split": "train", "kind": "train"})
    rng = random.Random(f"mechdiff-math-eval-{seed}")
    ev: list[dict] = []
    for kind, pool, n in (("seen_template", TRAIN_TEMPLATES, n_eval // 2),
                          ("heldout_template", HELDOUT_TEMPLATES, n_eval - n_eval // 2)):
        k = 0
        while k < n:
            row = _draw(rng, pool[k % len(pool)])
            if row["question"] in seen:
                continue
            seen.add(row["question"])
            ev.append({"id": f"math-eval-{len(ev)}", **row, "split": "eval", "kind": kind})
            k += 1
    return {"train": train, "eval": ev}


_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _to_number(s: str) -> float | None:
    s = s.replace("$", "").replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


_FINAL = re.compile(rf"(?:####|answer is:?)\s*\**\s*({_NUM})", flags=re.IGNORECASE)


def parse_final_number(text: str) -> float | None:
    """The answer a generation commits to: the first ``#### N`` or ``answer is N``, else the last
    number in the text (a model that ignores the answer format is not penalised for it)."""
    m = _FINAL.search(text)
    if m:
        return _to_number(m.group(1))
    nums = re.findall(_NUM, text)
    return _to_number(nums[-1]) if nums else None


def is_correct(text: str, answer: int) -> bool:
    v = parse_final_number(text)
    return v is not None and abs(v - answer) < 1e-6
