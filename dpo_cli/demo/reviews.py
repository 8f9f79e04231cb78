"""A small, seeded generator of movie-review-like text of both sentiments (the built-in offline demo).

Reviews open with a neutral sentence (title, genre, director), continue with two to four sentences of
one sentiment (a few mix in a contrasting clause), and close with a verdict and a rating. The sentiment
words are ones a lexicon-based judge (VADER) scores, so the demo's stand-in for human raters can tell
positive from negative continuations.
"""

from __future__ import annotations

import random
import re

TITLE_WORDS = (
    ["Silent", "Broken", "Golden", "Last", "Hidden", "Crimson", "Distant", "Wild", "Frozen", "Electric", "Lonely", "Burning"],
    ["Harbor", "Garden", "Kingdom", "River", "Letter", "Road", "Dream", "Storm", "Island", "Mirror", "Summer", "Machine"],
)
GENRES = ["drama", "comedy", "thriller", "horror film", "romance", "documentary", "animated film", "western", "science fiction film", "mystery"]
FIRST = ["Anna", "Marco", "Lena", "David", "Sofia", "James", "Clara", "Omar", "Julia", "Peter", "Nina", "Tom"]
LAST = ["Berg", "Costa", "Novak", "Reyes", "Fischer", "Moreau", "Lind", "Okafor", "Santos", "Kowalski", "Weber", "Hart"]
ASPECTS = ["acting", "script", "story", "soundtrack", "camera work", "pacing", "dialogue", "ending", "cast", "direction", "score", "editing"]
ROLES = ["detective", "young teacher", "old sailor", "lost child", "tired doctor", "small-town mayor", "singer", "soldier", "widow", "farmer"]
PLOTS = [
    "returns home after twenty years",
    "finds a letter that changes everything",
    "must cross the country in one week",
    "tries to save a failing restaurant",
    "falls in love with a stranger",
    "hunts for a missing brother",
    "loses everything in one night",
    "starts a band with old friends",
]
POSITIVE = ["wonderful", "brilliant", "beautiful", "excellent", "superb", "delightful", "charming", "great", "fantastic", "amazing", "stunning", "lovely", "powerful", "gorgeous", "perfect", "enjoyable"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "bad", "weak", "clumsy", "painful", "horrible", "disappointing", "stupid", "ugly", "lifeless", "tedious", "mediocre", "messy"]
INTENSIFIERS = ["", "", "truly ", "really ", "simply ", "quite ", "absolutely "]

OPENINGS = [
    "{title} is a {genre} directed by {director}.",
    "I watched {title} last {day}.",
    "{title} is the new {genre} from {director}.",
    "In {title}, {actor} plays a {role} who {plot}.",
    "{director} returns with {title}, a {genre} about a {role} who {plot}.",
    "The {genre} {title} runs for {minutes} minutes.",
]
DAYS = ["night", "weekend", "Sunday", "Friday", "month"]

BODY = {
    "positive": [
        "The {aspect} is {intens}{adj}.",
        "{actor} gives a {adj} performance as the {role}.",
        "The {aspect} was {intens}{adj} and the {aspect2} was {adj2}.",
        "I loved every minute of it.",
        "It is one of the best films of the year.",
        "Every scene feels {adj} and full of life.",
        "The {aspect} made me smile from start to finish.",
        "{director} handles the {aspect} with a {adj} touch.",
    ],
    "negative": [
        "The {aspect} is {intens}{adj}.",
        "{actor} gives a {adj} performance as the {role}.",
        "The {aspect} was {intens}{adj} and the {aspect2} was {adj2}.",
        "I hated almost every minute of it.",
        "It is one of the worst films of the year.",
        "Every scene feels {adj} and empty.",
        "The {aspect} made me want to leave early.",
        "{director} handles the {aspect} with a {adj} touch.",
    ],
}
CONTRAST = {
    "positive": "The {aspect} is a little {adj}, but it hardly matters.",
    "negative": "The {aspect} is {adj}, but it cannot save the film.",
}
CLOSINGS = {
    "positive": ["Highly recommended.", "I would happily watch it again.", "A {adj} film.", "Do not miss it."],
    "negative": ["Avoid this one.", "I would never watch it again.", "A {adj} film.", "Save your money."],
}


def _articles(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _fill(template: str, rng: random.Random, sentiment: str, names: dict[str, str]) -> str:
    words = POSITIVE if sentiment == "positive" else NEGATIVE
    adj, adj2 = rng.sample(words, 2)
    aspect, aspect2 = rng.sample(ASPECTS, 2)
    return template.format(adj=adj, adj2=adj2, aspect=aspect, aspect2=aspect2, intens=rng.choice(INTENSIFIERS), **names)


def make_review(rng: random.Random, sentiment: str | None = None) -> dict[str, str]:
    """One review as {opening, continuation, text, sentiment, rating}."""
    sentiment = sentiment or rng.choice(["positive", "negative"])
    names = {
        "title": f"The {rng.choice(TITLE_WORDS[0])} {rng.choice(TITLE_WORDS[1])}",
        "genre": rng.choice(GENRES),
        "director": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "actor": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "role": rng.choice(ROLES),
        "plot": rng.choice(PLOTS),
        "day": rng.choice(DAYS),
        "minutes": str(rng.randrange(85, 170, 5)),
    }
    opening = _articles(rng.choice(OPENINGS).format(**names))
    body = [_fill(t, rng, sentiment, names) for t in rng.sample(BODY[sentiment], rng.randint(2, 4))]
    if rng.random() < 0.15:  # a contrasting remark, as real reviews have
        other = "negative" if sentiment == "positive" else "positive"
        body.insert(rng.randrange(len(body) + 1), _fill(CONTRAST[sentiment], rng, other, names))
    closing = _fill(rng.choice(CLOSINGS[sentiment]), rng, sentiment, names)
    rating = rng.randint(7, 10) if sentiment == "positive" else rng.randint(1, 4)
    continuation = _articles(" ".join([*body, closing, f"Rating: {rating}/10."]))
    return {
        "opening": opening,
        "continuation": continuation,
        "text": f"{opening} {continuation}",
        "sentiment": sentiment,
        "rating": str(rating),
    }


def reviews(n: int, seed: int, sentiment: str | None = None) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_review(rng, sentiment) for _ in range(n)]
