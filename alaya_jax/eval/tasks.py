"""RULER-style long-context tasks, written for alaya_jax with generated filler text.

Five tasks (after RULER, arXiv 2404.06654, with our own text):

    passkey      one number hidden in the filler; asked back
    multikey     several key -> number needles; one key asked
    multivalue   one key with several numbers at different depths; all asked
    vartrack     a chain of variable assignments (VAR A = 123, VAR B = VAR A, ...) in the
                 filler; every variable holding the value asked
    freqword     a long list of made-up words with Zipf frequencies; the three most frequent asked

The filler is sentences drawn from templates and word lists by a seeded generator, so no two
contexts repeat the same paragraph and nothing copyrighted is used. A sample's length is the
number of prompt tokens with the model's tokenizer, chat template included: the prompt fills
`length - GEN_BUDGET` tokens (within `LENGTH_TOLERANCE` below), so the prompt plus the answer
fits `length`. A needle's depth is the fraction of the document's tokens before it, out of all but its own
(0: it opens the document, 1: it closes it); the asked needle's depth is spread over
0, 0.1, ..., 1 by sample index (0, 0.075, ..., 0.75 for the first link of a vartrack chain,
whose other links follow it). Everything is a pure function of (seed, task, length, index).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

import numpy as np

from alaya_jax.errors import ConfigError

GEN_BUDGET = 64  # tokens kept free for the answer: a prompt for length L has <= L - 64 tokens
LENGTH_TOLERANCE = 0.04  # a prompt has at least (1 - tol) * (L - GEN_BUDGET) tokens
DEPTHS = tuple(i / 10 for i in range(11))

# --- word lists for the filler ------------------------------------------------------------
_ADJ = ("quiet", "amber", "narrow", "ancient", "restless", "silver", "gentle", "crooked", "bright",
        "hollow", "patient", "distant", "woolen", "brittle", "curious", "faded", "heavy", "tidy",
        "wild", "careful", "dusty", "golden", "humble", "lively", "muddy", "noble", "polished",
        "rusty", "sleepy", "steady", "tall", "tiny", "warm", "windy", "young", "bitter", "calm",
        "clever", "copper", "early", "empty", "frozen", "grassy", "hidden", "late", "little",
        "lonely", "modest", "open", "pale", "plain", "proud", "rough", "salty", "sharp", "shy",
        "slow", "soft", "spare", "stony", "sunny", "swift", "velvet", "weary", "wooden")
_NOUN = ("lantern", "orchard", "harbor", "notebook", "violin", "bridge", "meadow", "kettle",
         "cathedral", "bicycle", "compass", "garden", "ladder", "mirror", "village", "wagon",
         "blanket", "canal", "chimney", "cottage", "fountain", "glacier", "hammer", "island",
         "journal", "kitchen", "library", "market", "mountain", "necklace", "ocean", "painting",
         "pencil", "quarry", "river", "saddle", "scarf", "ship", "staircase", "telescope",
         "theatre", "tower", "tunnel", "umbrella", "valley", "window", "workshop", "anchor",
         "basket", "candle", "carpet", "clock", "drum", "feather", "fence", "forest", "gate",
         "helmet", "horse", "letter", "map", "mill", "nest", "piano", "pond", "road", "rope",
         "school", "shell", "stable", "statue", "table", "train", "well", "whistle")
_VERB = ("repaired", "painted", "carried", "found", "sold", "described", "visited", "measured",
         "cleaned", "borrowed", "noticed", "photographed", "admired", "studied", "mended",
         "opened", "moved", "guarded", "weighed", "counted", "sketched", "polished", "followed",
         "ignored", "remembered", "crossed", "lifted", "wrapped", "traded", "collected")
_PLACE = ("the northern valley", "the old port", "a small town by the sea", "the river delta",
          "the eastern hills", "the capital", "a mountain village", "the market square",
          "the western plains", "an island harbor", "the forest edge", "the university district",
          "the lower city", "a farm near the border", "the railway station", "the southern coast")
_NAME = ("Mara", "Tomas", "Ines", "Oskar", "Lena", "Rafael", "Yusuf", "Greta", "Nikolai", "Amara",
         "Pavel", "Sofia", "Idris", "Hanna", "Mateo", "Elif", "Jonas", "Priya", "Emil", "Noor",
         "Bruno", "Clara", "Dario", "Freya", "Kenji", "Lucia", "Milan", "Olga", "Ravi", "Talia")
_TIME = ("in the morning", "before dawn", "late at night", "during the winter", "on a rainy day",
         "after the festival", "every spring", "last autumn", "at noon", "in the evening",
         "once a year", "after the storm", "on most Sundays", "before the harvest")
_TEMPLATES = (
    "The {adj} {noun} near the {noun2} was {verb} by {name} {time}.",
    "{name} {verb} a {adj} {noun} in {place} {time}.",
    "In {place}, people still talk about the {adj} {noun} that {name} {verb}.",
    "Nobody expected the {noun} to look so {adj} {time}.",
    "Every {noun} in {place} was {adj}, and {name} {verb} each one.",
    "A {adj} {noun} stood beside the {noun2} while {name} {verb} the {noun3}.",
    "{name} wrote that the {noun} had been {verb} {time}, though the {noun2} was {adj}.",
    "Some say the {adj} {noun} of {place} was first {verb} by a traveller.",
    "The {noun2} and the {noun} were both {adj} {time}.",
    "After {name} {verb} the {noun}, the {adj} {noun2} was left alone.",
    "It is said that {place} has a {adj} {noun} and a {adj2} {noun2}.",
    "{name} and {name2} {verb} the {adj} {noun} together {time}.",
    "There was a {adj} {noun} on the {noun2}, and it was {verb} {time}.",
    "The {adj} {noun} was never {verb} again after {name} left {place}.",
)
_SYLLABLES = ("ba", "ko", "ri", "mu", "te", "lo", "ska", "vi", "dor", "pe", "zu", "ni", "gal", "fo",
              "tri", "sen", "wu", "ya", "mek", "ju", "ha", "qua", "rel", "ost")


_SLOTS = ("adj", "adj2", "noun", "noun2", "noun3", "verb", "place", "name", "name2", "time")
_LISTS = (_ADJ, _ADJ, _NOUN, _NOUN, _NOUN, _VERB, _PLACE, _NAME, _NAME, _TIME)


def filler_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n varied filler sentences (the generator decides the template and every word)."""
    picks = rng.integers(0, 1 << 30, (n, len(_SLOTS) + 1))
    out = []
    for row in picks:
        words = {k: xs[int(r) % len(xs)] for k, xs, r in zip(_SLOTS, _LISTS, row[1:])}
        out.append(_TEMPLATES[int(row[0]) % len(_TEMPLATES)].format(**words))
    return out


def _number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))  # 7 digits


def _key(rng, taken: set) -> str:
    while True:
        k = f"{_ADJ[int(rng.integers(len(_ADJ)))]}-{_NOUN[int(rng.integers(len(_NOUN)))]}"
        if k not in taken:
            taken.add(k)
            return k


def _var_name(rng, taken: set) -> str:
    while True:
        v = "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5))
        if v not in taken:
            taken.add(v)
            return v


def _nonce_word(rng, taken: set) -> str:
    while True:
        w = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), int(rng.integers(2, 4))))
        if w not in taken:
            taken.add(w)
            return w


# --- samples -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt with its answers. depths: the document fraction before each needle (the
    asked one first), empty for freqword. prompt_ids: the full chat prompt, answer prefix
    included (what the model is fed)."""

    task: str
    length: int  # the target context length L (prompt + answer <= L tokens)
    index: int
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]
    depths: tuple[float, ...]
    needles: tuple[str, ...]  # needle sentences, in the order of `depths`
    document: str
    question: str
    max_new_tokens: int

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a task puts in the document and asks: built before the filler is sized."""

    needles: list[str]  # sentences to insert
    depths: list[float]  # where, as document fractions (needles stay in this order if sorted)
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int


_INSTRUCTION = ("Below is a long text. Some sentences in it hold special information. "
                "Read it carefully and answer the question after it.")


def _passkey(rng, depth) -> _Spec:
    n = _number(rng)
    return _Spec([f"The secret pass key is {n}. Remember it: {n} is the pass key."], [depth],
                 "What is the secret pass key mentioned in the text? Answer with the number only.",
                 "The secret pass key is", [n], 16)


def _multikey(rng, depth, n_keys=4) -> _Spec:
    taken: set = set()
    keys = [_key(rng, taken) for _ in range(n_keys)]
    nums = [_number(rng) for _ in range(n_keys)]
    others = list(rng.uniform(0, 1, n_keys - 1))
    needles = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, nums)]
    return _Spec(needles, [depth] + others,
                 f"What is the special magic number for {keys[0]} mentioned in the text? "
                 f"Answer with the number only.",
                 f"The special magic number for {keys[0]} is", [nums[0]], 16)


def _multivalue(rng, depth, n_values=4) -> _Spec:
    key = _key(rng, set())
    nums = [_number(rng) for _ in range(n_values)]
    depths = [depth] + list(rng.uniform(0, 1, n_values - 1))
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in nums]
    return _Spec(needles, depths,
                 f"What are all the special magic numbers for {key} mentioned in the text? "
                 f"List every one of them.",
                 f"The special magic numbers for {key} are:", nums, 56)


def _vartrack(rng, depth, hops=4) -> _Spec:
    taken: set = set()
    names = [_var_name(rng, taken) for _ in range(hops + 1)]
    value = str(int(rng.integers(10_000, 100_000)))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}."
                                               for i in range(hops)]
    # the chain must read in order: the first assignment at 0.75 x the sample's depth, the
    # rest after it at random places
    first = 0.75 * depth
    rest = sorted(rng.uniform(first, 1, hops))
    return _Spec(needles, [first] + list(rest),
                 f"Find all variables that are assigned the value {value} in the text, "
                 f"directly or through other variables.",
                 f"The variables assigned the value {value} are:", names, 40)


_SPECS: dict[str, Callable] = dict(passkey=_passkey, multikey=_multikey, multivalue=_multivalue,
                                   vartrack=_vartrack)
TASKS = ("passkey", "multikey", "multivalue", "vartrack", "freqword")


_TEMPLATE_PARTS: dict = {}


def _render(tokenizer, document: str, question: str, answer_prefix: str, instruction=_INSTRUCTION):
    """The chat prompt's ids, answer prefix appended. The template is rendered once per
    tokenizer around a marker (templates insert the user content verbatim)."""
    key = id(tokenizer)
    if key not in _TEMPLATE_PARTS:
        marker = "\u0000CONTENT\u0000"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                             add_generation_prompt=True, tokenize=False)
        head, _, tail = text.partition(marker)
        _TEMPLATE_PARTS[key] = (tokenizer, head, tail)  # the tokenizer kept alive: id stays its
    _, head, tail = _TEMPLATE_PARTS[key]
    content = f"{instruction}\n\n{document}\n\n{question}"
    return tokenizer.encode(head + content + tail, add_bos=False) + tokenizer.encode(answer_prefix)


def _fit(build: Callable[[int], tuple[list[int], object]], target: int, probe: int):
    """Finds a unit count n (sentences or words), starting from `probe`, whose prompt has
    between (1 - tol/2) x target and target tokens (else the largest n that fits).
    build(n) -> (prompt ids, payload); the token count grows about linearly with n, the rate
    re-measured at every try."""
    base = len(build(1)[0])
    if base > target:
        raise ConfigError(f"the prompt needs {base} tokens without filler; the target is {target}")
    aim = target * (1 - LENGTH_TOLERANCE / 4) - base
    n, per, best = probe, 1.0, None
    for _ in range(40):
        ids, payload = build(n)
        if n > 1:
            per = max((len(ids) - base) / (n - 1), 0.5)
        guess = 1 + max(0, int(aim / per))
        if len(ids) <= target:
            best = (n, ids, payload)
            if len(ids) >= (1 - LENGTH_TOLERANCE / 2) * target:
                break
            n = max(n + 1, guess)
        else:
            n = max(1, min(n - 1, guess))
            if best is not None and n <= best[0]:
                break
    if best is None:
        raise ConfigError(f"cannot fit a prompt into {target} tokens")
    return best


def _needle_task(task, tokenizer, length, index, rng) -> Sample:
    target = length - GEN_BUDGET
    depth = DEPTHS[index % len(DEPTHS)]
    spec = _SPECS[task](rng, depth)
    pool = filler_sentences(rng, max(64, target // 12))  # about enough (~14 tokens each)
    counts: list[int] = []  # tokens per pool sentence
    needle_counts = [_n_tokens(tokenizer, x) for x in spec.needles]
    order = sorted(range(len(spec.needles)), key=lambda j: spec.depths[j])

    def build(n):
        while len(pool) < n:
            pool.extend(filler_sentences(rng, n - len(pool) + 16))
        while len(counts) < n:
            counts.append(_n_tokens(tokenizer, pool[len(counts)]))
        # a needle goes to the sentence boundary nearest to its depth in document tokens
        total = sum(counts[:n]) + sum(needle_counts)
        sents, done, j = [], 0, 0
        for sent, c in zip(pool[:n], counts[:n]):
            while (j < len(order)
                   and done + c / 2 > spec.depths[order[j]] * (total - needle_counts[order[j]])):
                sents.append(spec.needles[order[j]])
                done += needle_counts[order[j]]
                j += 1
            sents.append(sent)
            done += c
        sents += [spec.needles[k] for k in order[j:]]
        doc = _paragraphs(sents)
        return _render(tokenizer, doc, spec.question, spec.answer_prefix), doc

    # first guess from the sentences' own token counts (joined text tokenizes about additively)
    over = len(build(1)[0]) - _n_tokens(tokenizer, pool[0])
    aim = target * (1 - LENGTH_TOLERANCE / 4) - over
    counts.extend(_n_tokens(tokenizer, x) for x in pool[len(counts):])
    while sum(counts) < aim:
        more = filler_sentences(rng, 32)
        pool.extend(more)
        counts.extend(_n_tokens(tokenizer, x) for x in more)
    guess = max(2, int(np.searchsorted(np.cumsum(counts), aim, side="right")))
    n, ids, doc = _fit(build, target, guess)
    return Sample(task, length, index, tuple(ids), tuple(spec.answers),
                  tuple(float(d) for d in spec.depths),
                  tuple(spec.needles), doc, spec.question, spec.max_new_tokens)


def _n_tokens(tokenizer, sentence: str) -> int:
    return len(tokenizer.encode(" " + sentence))


def _paragraphs(sents: list[str], size: int = 6) -> str:
    return "\n".join(" ".join(sents[i:i + size]) for i in range(0, len(sents), size))


def _freqword(tokenizer, length, index, rng, alpha: float = 2.0, vocab: int = 400) -> Sample:
    """The three most frequent made-up words of a Zipf-distributed word list (RULER's fwe)."""
    target = length - GEN_BUDGET
    taken: set = set()
    words = [_nonce_word(rng, taken) for _ in range(vocab)]
    seed = int(rng.integers(2**31))
    question = ("Above is a list of made-up words. Which three words appear most often in the "
                "list? Answer with the three words.")
    prefix = "The three most frequent words are:"
    instruction = "Read the following list of made-up words and count how often each word appears."

    def build(n):
        counts = _zipf_counts(n, len(words), alpha)
        seq = np.repeat(np.arange(len(words)), counts)
        np.random.default_rng(seed).shuffle(seq)
        doc = " ".join(words[i] for i in seq)
        return _render(tokenizer, doc, question, prefix, instruction), (doc, counts)

    n, ids, (doc, counts) = _fit(build, target, max(2, int(target / 3)))
    top = [words[i] for i in np.argsort(-counts, kind="stable")[:3]]
    return Sample("freqword", length, index, tuple(ids), tuple(top), (), (), doc, question, 24)


def _zipf_counts(n: int, vocab: int, alpha: float) -> np.ndarray:
    """Counts summing to n, word r (1-based) about n / r^alpha / H, every word at least once
    where n allows; the top 4 strictly decreasing so the top 3 are unambiguous."""
    p = 1.0 / np.arange(1, vocab + 1) ** alpha
    counts = np.floor(n * p / p.sum()).astype(np.int64)
    counts = np.maximum(counts, 1) if n >= 2 * vocab else counts
    for r in range(3, 0, -1):  # strict gaps among the top 4
        if counts[r - 1] <= counts[r]:
            counts[r - 1] = counts[r] + 1
    diff = n - counts.sum()  # give the rest to the tail (rank > 4) to keep the top fixed
    tail = np.arange(4, vocab)
    if diff > 0:
        counts[tail[:diff % len(tail)]] += 1
        counts[tail] += diff // len(tail)
    elif diff < 0:
        for i in tail[::-1]:
            take = min(-diff, counts[i])
            counts[i] -= take
            diff += take
            if diff == 0:
                break
    return counts


def make_sample(task: str, tokenizer, length: int, index: int, seed: int = 0) -> Sample:
    """Sample `index` of `task` at context length `length` (tokens): deterministic by seed."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if length - GEN_BUDGET < 128:
        raise ConfigError(f"length {length} is too short (at least {GEN_BUDGET + 128} tokens)")
    rng = np.random.default_rng([seed, TASKS.index(task), length, index])
    try:
        if task == "freqword":
            return _freqword(tokenizer, length, index, rng)
        return _needle_task(task, tokenizer, length, index, rng)
    except ValueError as e:
        raise ConfigError(f"{task} at length {length}: {e}") from None


def make_samples(tasks: Sequence[str], tokenizer, length: int, n: int, seed: int = 0,
                 workers: int | None = None) -> list[Sample]:
    """Samples 0..n-1 of every task (task-major), made on threads (the tokenizer's encode
    releases the GIL); the result does not depend on the number of workers."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(t, i) for t in tasks for i in range(n)]
    with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as ex:
        return list(ex.map(lambda ti: make_sample(ti[0], tokenizer, length, ti[1], seed), jobs))


# --- scoring -------------------------------------------------------------------------------
def _found(answer: str, output: str) -> bool:
    if answer.isdigit():  # a number must not be part of a longer number
        return re.search(rf"(?<!\d){answer}(?!\d)", output) is not None
    return re.search(rf"(?<![A-Za-z]){re.escape(answer)}(?![A-Za-z])", output, re.IGNORECASE) is not None


def score(sample: Sample, output: str) -> float:
    """The fraction of the sample's answers found in the model's output (RULER's string
    match: all-or-nothing for one answer, partial credit for several)."""
    return sum(_found(a, output) for a in sample.answers) / len(sample.answers)
