"""The built-in tasks: the toy task the demo learns (problems a small model can do with a tool
but not in its head, each with its teacher's turns for SFT) and GSM8K-format word problems (the
real run's data).

    problems = toy_problems(1000, seed=0)      # each {"problem", "answer", "teacher": [turns], ...}
    held_out = toy_held_out(100)               # disjoint from toy_problems(3000, seed=0)
    rows = word_problems(150, seed=0)          # {"id", "question", "answer": "<work> #### N"}

    python tasks.py OUT_DIR                    # the real run's train.jsonl (150) and test.jsonl (50)
"""

import json
import os
import random

# ---------------------------------------------------------------- the built-in toy task
#
# Problems a small model cannot do in its head but can with a tool: modular powers, products of
# large numbers, counting with a condition; and two-step problems whose second tool call needs the
# first call's printed output (two dependent tool turns). Every answer is computed here; the
# teacher writes what a solver would: one code block per tool turn, then the boxed answer, and
# with probability mistake_rate one call with a mistake (an undefined name) before the right one,
# so SFT shows reading an error and fixing it in the next turn.

TOY_FAMILIES = ("pow", "mul", "count", "chain_pow", "chain_digits")
TWO_STEP_FAMILIES = ("chain_pow", "chain_digits")


def _toy_problem(family, rng):
    """(problem text, answer, steps); steps[k] = (code, the same code with a mistake) of tool turn
    k, with earlier outputs written in as the literals a solver would copy from the output."""
    r = rng.randint
    if family == "pow":
        a, b, m = r(2, 99), r(10, 999), r(100, 9999)
        code = f"print(pow({a}, {b}, {m}))"
        return f"What is {a}^{b} mod {m}?", pow(a, b, m), [(code, code.replace("pow", "powmod"))]
    if family == "mul":
        a, b = r(100, 9999), r(100, 9999)
        return f"What is {a} * {b}?", a * b, [(f"print({a} * {b})", f"print({a} * b)")]
    if family == "count":
        x, a, b = r(100, 9999), r(2, 19), r(2, 19)
        code = f"print(sum(1 for n in range(1, {x} + 1) if n % {a} == 0 or n % {b} == 0))"  # x as written
        count = sum(1 for n in range(1, x + 1) if n % a == 0 or n % b == 0)
        return (
            f"How many n from 1 to {x} are multiples of {a} or {b}?",
            count,
            [(code, code.replace("n %", "k %", 1))],
        )
    if family == "chain_pow":
        a, b, m, c = r(2, 99), r(10, 999), r(100, 9999), r(11, 999)
        x, first = pow(a, b, m), f"print(pow({a}, {b}, {m}))"
        steps = [(first, first.replace("pow", "powmod")), (f"print({x} * {c})", f"print(x * {c})")]
        return f"Let x = {a}^{b} mod {m}. What is x * {c}?", x * c, steps
    if family == "chain_digits":
        a, b, c = r(2, 99), r(10, 99), r(11, 999)
        s, first = sum(map(int, str(a**b))), f"print(sum(int(d) for d in str({a} ** {b})))"
        steps = [(first, first.replace("int(d)", "int(digit)")), (f"print({s} * {c})", f"print(s * {c})")]
        return f"Let s be the digit sum of {a}^{b}. What is s * {c}?", s * c, steps
    raise ValueError(f"unknown toy family {family!r}; known: {TOY_FAMILIES}")


def toy_problems(n, seed=0, families=TOY_FAMILIES, mistake_rate=0.25):
    """n toy problems, families in turn; each holds problem, answer, id, family and teacher (the
    assistant's turn texts: at most 4, for a two-step problem with a mistake). The same arguments
    give the same problems."""
    rng = random.Random(seed)
    problems = []
    for k in range(n):
        family = families[k % len(families)]
        text, answer, steps = _toy_problem(family, rng)
        slip = rng.randrange(len(steps)) if rng.random() < mistake_rate else None  # at most one mistake
        teacher = []
        for j, (code, wrong) in enumerate(steps):
            if j == slip:
                teacher.append(f"```python\n{wrong}\n```")  # the error comes back; the next turn fixes it
            teacher.append(f"```python\n{code}\n```")
        teacher.append(f"\\boxed{{{answer}}}")
        problems.append(
            {"problem": text, "answer": str(answer), "id": f"toy-{seed}-{k}", "family": family, "teacher": teacher}
        )
    return problems


def toy_held_out(n, train_size=3000, train_mistake_rate=0.25, seed=1, exclude=()):
    """The toy task's held-out set: n problems drawn with another seed than training's
    (toy_problems(train_size, 0, mistake_rate=train_mistake_rate)), any that also occur in
    training or in `exclude` (problems, e.g. the held-out set when drawing a validation set) removed."""
    seen = {p["problem"] for p in toy_problems(train_size, seed=0, mistake_rate=train_mistake_rate)}
    seen |= {p["problem"] for p in exclude}
    return [p for p in toy_problems(n, seed=seed) if p["problem"] not in seen]


# ---------------------------------------------------------------- grade-school word problems
#
# A GSM8K-style set written here, for runs on real models (the README's Qwen2.5 run): multi-step
# word problems with whole-number answers, each row in GSM8K's own format (a "question", and an
# "answer" that is a worked solution ending in "#### N"), so loading it exercises the GSM8K adapter.

NAMES = ("Maria", "Tom", "Aisha", "Ben", "Lena", "Omar", "Grace", "Ravi", "Sofia", "Jack", "Mei", "Noah")
ITEMS = (
    ("notebook", "notebooks"),
    ("pen", "pens"),
    ("apple", "apples"),
    ("ticket", "tickets"),
    ("book", "books"),
    ("sandwich", "sandwiches"),
)


def _word_problem(kind, rng):
    """(question, worked solution, answer) of one template, numbers drawn from rng."""
    r, who = rng.randint, rng.choice(NAMES)
    if kind == "change":
        (_, a_name), (_, b_name) = rng.sample(ITEMS, 2)
        a, p, b, q = r(2, 9), r(2, 15), r(2, 9), r(1, 9)
        cost = a * p + b * q
        bill = next(x for x in (20, 50, 100, 200) if x > cost)
        return (
            f"{who} buys {a} {a_name} at ${p} each and {b} {b_name} at ${q} each. {who} pays with a "
            f"${bill} bill. How much change, in dollars, does {who} get back?",
            f"{a}*{p} + {b}*{q} = {cost}. {bill} - {cost} = {bill - cost}.",
            bill - cost,
        )
    if kind == "trip":
        v, t, w, u = r(30, 70), r(2, 6), r(20, 60), r(1, 5)
        return (
            f"A bus drives at {v} miles per hour for {t} hours, then at {w} miles per hour for {u} "
            "hours. How many miles does it drive in total?",
            f"{v}*{t} = {v * t}. {w}*{u} = {w * u}. {v * t} + {w * u} = {v * t + w * u}.",
            v * t + w * u,
        )
    if kind == "discount":
        d, p = rng.choice((10, 20, 25, 30, 40, 50)), 20 * r(2, 30)
        sale = p - p * d // 100
        return (
            f"A jacket costs ${p}. It is on sale for {d}% off. What is the sale price in dollars?",
            f"{d}% of {p} is {p * d // 100}. {p} - {p * d // 100} = {sale}.",
            sale,
        )
    if kind == "wages":
        h, hours, days, weeks = r(9, 30), r(3, 8), r(2, 6), r(2, 8)
        total = h * hours * days * weeks
        return (
            f"{who} earns ${h} an hour and works {hours} hours a day, {days} days a week. How many "
            f"dollars does {who} earn in {weeks} weeks?",
            f"{h}*{hours}*{days}*{weeks} = {total}.",
            total,
        )
    if kind == "percent":
        n = rng.choice((20, 25, 40, 50))
        k = r(1, n - 1)
        while 100 * k % n:
            k = r(1, n - 1)
        return (
            f"A class has {n} students and {k} of them walk to school. What percent of the students walk to school?",
            f"{k}/{n} = {k / n}, which is {100 * k // n}%.",
            100 * k // n,
        )
    if kind == "legs":
        c, h, s = r(3, 40), r(5, 60), r(1, 20)
        legs = 4 * c + 2 * h + 4 * s
        return (
            f"A farm has {c} cows, {h} chickens and {s} sheep. How many legs do the animals have altogether?",
            f"4*{c} + 2*{h} + 4*{s} = {legs}.",
            legs,
        )
    if kind == "savings":
        s, price, has = r(5, 40), r(100, 900), r(0, 90)
        weeks = -(-(price - has) // s)
        return (
            f"{who} wants a bike that costs ${price}, has ${has} saved, and saves ${s} more every "
            f"week. After how many weeks can {who} first afford the bike?",
            f"{price} - {has} = {price - has}. {price - has}/{s} rounded up is {weeks}.",
            weeks,
        )
    if kind == "average":
        m, a, b, c = r(70, 90), r(60, 100), r(60, 100), r(60, 100)
        need = 4 * m - a - b - c
        while not 0 <= need <= 100:
            m, a, b, c = r(70, 90), r(60, 100), r(60, 100), r(60, 100)
            need = 4 * m - a - b - c
        return (
            f"{who} scored {a}, {b} and {c} on three tests. What score does {who} need on the fourth "
            f"test to average exactly {m} over all four?",
            f"4*{m} = {4 * m}. {4 * m} - {a} - {b} - {c} = {need}.",
            need,
        )
    if kind == "fence":
        length, width, c = r(5, 60), r(5, 40), r(2, 15)
        perimeter = 2 * (length + width)
        return (
            f"A rectangular garden is {length} feet long and {width} feet wide. Fencing costs ${c} per "
            "foot. How many dollars does it cost to fence the whole garden?",
            f"2*({length} + {width}) = {perimeter}. {perimeter}*{c} = {perimeter * c}.",
            perimeter * c,
        )
    if kind == "boxes":
        (_, items), per, boxes, sold = rng.choice(ITEMS), r(6, 24), r(5, 40), r(10, 90)
        total = per * boxes
        sold = min(sold, total)
        return (
            f"A shop gets {boxes} boxes with {per} {items} in each box and sells {sold} {items}. "
            f"How many {items} are left?",
            f"{boxes}*{per} = {total}. {total} - {sold} = {total - sold}.",
            total - sold,
        )
    raise ValueError(f"unknown word problem kind {kind!r}; known: {WORD_KINDS}")


WORD_KINDS = ("change", "trip", "discount", "wages", "percent", "legs", "savings", "average", "fence", "boxes")


def word_problems(n, seed=0, exclude=()):
    """n GSM8K-format rows {"id", "question", "answer": "<worked solution> #### N"}, kinds in turn,
    no question repeated or in `exclude` (questions). The same arguments give the same rows."""
    rng, seen, rows = random.Random(seed), set(exclude), []
    while len(rows) < n:
        question, work, answer = _word_problem(WORD_KINDS[len(rows) % len(WORD_KINDS)], rng)
        if question not in seen:
            seen.add(question)
            rows.append({"id": f"words-{seed}-{len(rows)}", "question": question, "answer": f"{work}\n#### {answer}"})
    return rows


if __name__ == "__main__":  # python tasks.py OUT_DIR: the README's train.jsonl (150) and test.jsonl (50)
    import sys

    out_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/words"
    os.makedirs(out_dir, exist_ok=True)
    train = word_problems(150, seed=0)
    test = word_problems(50, seed=1, exclude={row["question"] for row in train})
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{out_dir}/{name}.jsonl: {len(rows)} problems")
