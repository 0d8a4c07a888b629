"""A synthetic customer-support domain with a gold scorer, for the quickstart and tests.

Customer messages cover six intents with slot values (order id, product, date) and a mood
(calm or upset). Agent responses vary along four dimensions:

- accuracy: the right fact for the intent, with the customer's own order id / product;
- professionalism: a courteous greeting and closing, no rude phrases;
- conciseness: no filler sentences;
- empathy: an apology when (and only when it matters, i.e.) the customer is upset.

`gold_scores(prompt, response)` rates any response text on those dimensions (0..1) and
`gold_utility` combines them. Reward models never see the scorer; evaluation does.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INTENTS = ("order_status", "refund", "shipping_delay", "cancel_order", "product_question", "password_reset")
PRODUCTS = ("kettle", "lamp", "blender", "backpack", "headphones", "toaster", "jacket", "mixer")
MONTHS = ("may", "june", "july", "august")
WEIGHTS = {"accuracy": 0.4, "professionalism": 0.2, "conciseness": 0.2, "empathy": 0.2}
DIMENSIONS = tuple(WEIGHTS)

_ASK = {
    "order_status": ["where is my order {oid}?", "what is the status of order {oid}?"],
    "refund": ["i want a refund for order {oid}.", "please refund order {oid}, the {product} broke."],
    "shipping_delay": ["my {product} from order {oid} is late.", "order {oid} has not arrived yet."],
    "cancel_order": ["please cancel order {oid}.", "i want to cancel my {product}, order {oid}."],
    "product_question": ["does the {product} have a warranty?", "how long is the warranty on the {product}?"],
    "password_reset": ["i cannot log in to my account.", "i forgot my password."],
}
_UPSET = ["this is ridiculous!", "i am really angry.", "this is the third time i ask!"]
_CALM = ["hi,", "hello,"]

_FACT = {
    "order_status": "your order {oid} shipped on {month} {day}.",
    "refund": "i have refunded order {oid} to your card.",
    "shipping_delay": "order {oid} is delayed and will arrive on {month} {day}.",
    "cancel_order": "i have cancelled order {oid}.",
    "product_question": "the {product} has a two year warranty.",
    "password_reset": "i have sent a password reset link to your email.",
}
_VAGUE = "i will look into it."
_GREETING = "hello, thank you for contacting us."
_RUDE_GREETING = "what do you want?"
_CLOSING = "is there anything else i can help with?"
_RUDE_CLOSING = "do not ask again."
_APOLOGY = "i am sorry for the trouble."
_FILLER = [
    "our company was founded many years ago.",
    "we sell many products in many colors.",
    "please note that policies may change at any time.",
    "our team works every day of the week.",
]
_RUDE = ("what do you want", "do not ask again")


@dataclass(frozen=True)
class Ticket:
    intent: str
    oid: str
    product: str
    month: str
    day: int
    upset: bool

    def prompt(self, rng: random.Random) -> str:
        ask = rng.choice(_ASK[self.intent]).format(oid=self.oid, product=self.product)
        lead = rng.choice(_UPSET if self.upset else _CALM)
        text = f"{lead} {ask}" if not self.upset else f"{ask} {lead}"
        return f"customer: {text}\nagent:"

    def fact(self) -> str:
        return _FACT[self.intent].format(oid=self.oid, product=self.product, month=self.month, day=self.day)


def sample_ticket(rng: random.Random) -> Ticket:
    return Ticket(
        intent=rng.choice(INTENTS),
        oid=f"a{rng.randint(100, 999)}",
        product=rng.choice(PRODUCTS),
        month=rng.choice(MONTHS),
        day=rng.randint(1, 28),
        upset=rng.random() < 0.5,
    )


def write_response(ticket: Ticket, quality: dict[str, bool], rng: random.Random) -> str:
    """A response whose four dimensions are good or bad as `quality` says."""
    parts = [_GREETING if quality["professionalism"] else rng.choice([_RUDE_GREETING, "hey."])]
    if ticket.upset and quality["empathy"]:
        parts.append(_APOLOGY)
    if quality["accuracy"]:
        parts.append(ticket.fact())
    else:
        wrong = Ticket(
            rng.choice([i for i in INTENTS if i != ticket.intent]),
            f"a{rng.randint(100, 999)}",
            ticket.product,
            ticket.month,
            ticket.day,
            ticket.upset,
        )
        parts.append(rng.choice([_VAGUE, wrong.fact()]))
    if not quality["conciseness"]:
        parts.extend(rng.sample(_FILLER, k=rng.randint(1, 2)))
    parts.append(_CLOSING if quality["professionalism"] else rng.choice([_RUDE_CLOSING, ""]))
    return " ".join(p for p in parts if p)


# ------------------------------------------------------------------------------- gold scorer

_OID = re.compile(r"\ba\d{3}\b")


def parse_prompt(prompt: str) -> dict[str, object]:
    """Recover the slots a scorer needs from the customer's message."""
    text = prompt.lower()
    intent = "password_reset"
    for name, asks in _ASK.items():
        for ask in asks:
            pattern = re.escape(ask).replace(r"\{oid\}", r"a\d{3}").replace(r"\{product\}", r"\w+")
            if re.search(pattern, text):
                intent = name
                break
        else:
            continue
        break
    oid = _OID.search(text)
    product = next((p for p in PRODUCTS if p in text), None)
    return {
        "intent": intent,
        "oid": oid.group(0) if oid else None,
        "product": product,
        "upset": any(u in text for u in _UPSET),
    }


_FACT_PATTERNS = {
    "order_status": r"your order (a\d{3}) shipped on \w+ \d+\.",
    "refund": r"i have refunded order (a\d{3}) to your card\.",
    "shipping_delay": r"order (a\d{3}) is delayed and will arrive on \w+ \d+\.",
    "cancel_order": r"i have cancelled order (a\d{3})\.",
    "product_question": r"the (\w+) has a two year warranty\.",
    "password_reset": r"(i have sent a password reset link to your email)\.",
}


def gold_scores(prompt: str, response: str) -> dict[str, float]:
    """Scores in [0, 1] on the four dimensions for any response text."""
    slots = parse_prompt(prompt)
    text = " ".join(response.lower().split())
    m = re.search(_FACT_PATTERNS[slots["intent"]], text)  # type: ignore[index]
    if not m:
        accuracy = 0.0
    elif slots["intent"] == "product_question":
        accuracy = 1.0 if m.group(1) == slots["product"] else 0.3
    elif slots["intent"] == "password_reset":
        accuracy = 1.0
    else:
        accuracy = 1.0 if m.group(1) == slots["oid"] else 0.3
    # A second, contradicting fact halves accuracy: hedging across intents is not accurate.
    others = sum(bool(re.search(p, text)) for k, p in _FACT_PATTERNS.items() if k != slots["intent"])
    if others:
        accuracy *= 0.5
    rude = any(r in text for r in _RUDE)
    professionalism = 0.0 if rude else 0.5 * (_GREETING in text) + 0.5 * (_CLOSING in text)
    n_filler = sum(f in text for f in _FILLER)
    words = len(text.split())
    conciseness = max(0.0, 1.0 - 0.4 * n_filler - 0.02 * max(0, words - 35))
    apologised = _APOLOGY in text
    empathy = (1.0 if apologised else 0.0) if slots["upset"] else (1.0 if not apologised else 0.7)
    return {
        "accuracy": accuracy,
        "professionalism": professionalism,
        "conciseness": conciseness,
        "empathy": empathy,
    }


def gold_utility(prompt: str, response: str) -> float:
    s = gold_scores(prompt, response)
    return sum(WEIGHTS[k] * s[k] for k in WEIGHTS)


def gold_utility_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """The signature reward functions and monitors use: (prompts, responses) -> scores."""
    return [gold_utility(p, r) for p, r in zip(prompts, responses, strict=True)]


# ------------------------------------------------------------------------------- datasets


def demonstrations(n: int, seed: int, p_good: float = 0.5) -> list[dict[str, str]]:
    """SFT rows of mixed quality: each dimension is good with probability `p_good`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = sample_ticket(rng)
        q = {d: rng.random() < p_good for d in DIMENSIONS}
        rows.append(
            {"id": f"demo-{seed}-{i}", "prompt": t.prompt(rng), "completion": " " + write_response(t, q, rng)}
        )
    return rows


def prompts(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"id": f"prompt-{seed}-{i}", "prompt": sample_ticket(rng).prompt(rng)} for i in range(n)]


def corpus(n: int, seed: int) -> list[str]:
    """Text for training the tokenizer: every phrase of the domain, in many combinations."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = sample_ticket(rng)
        q = {d: rng.random() < 0.5 for d in DIMENSIONS}
        out.append(t.prompt(rng) + " " + write_response(t, q, rng))
    return out
