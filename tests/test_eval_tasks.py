"""The evaluation tasks: lengths, needle depths, recoverable answers, scoring, determinism."""

import collections
import re

import numpy as np
import pytest

from alaya_jax.eval import tasks as T
from alaya_jax.eval.harness import MethodSpecError, parse_method


@pytest.fixture(scope="module")
def tok():
    """The tiny byte-level tokenizer (one token per byte) with a plain chat template: SmolLM2's
    GGUF takes 15-60 s to parse here; the real tokenizer is exercised by the CPU eval run."""
    from alaya_jax.model.tokenizer import Tokenizer
    from tests.tiny_llama import _byte_tokenizer

    t = _byte_tokenizer()
    return Tokenizer(t, bos_id=None, eos_id=t.token_to_id("<|im_end|>"),
                     chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                   "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


LENGTHS = (4096, 8192)  # 40-100-byte sentences: the fit and the depths need many


@pytest.fixture(scope="module")
def samples(tok):
    return {(t, L, i): T.make_sample(t, tok, L, i) for t in T.TASKS for L in LENGTHS
            for i in (0, 4, 10)}


def test_lengths_within_tolerance(samples):
    for (t, L, i), s in samples.items():
        target = L - T.GEN_BUDGET
        assert (1 - T.LENGTH_TOLERANCE) * target <= s.n_tokens <= target, (t, L, i, s.n_tokens)
        assert s.length == L and s.task == t and s.index == i


def test_prompt_is_a_chat_prompt_ending_in_the_answer_prefix(tok, samples):
    s = samples[("passkey", 4096, 0)]
    text = tok.decode(s.prompt_ids)
    assert text.count("<|im_start|>user") == 1 and "<|im_start|>assistant\n" in text
    assert text.endswith("The secret pass key is")
    assert s.question in text and s.document in text


def test_needles_sit_at_the_stated_depths(tok, samples):
    for (t, L, i), s in samples.items():
        if t == "freqword":
            assert s.depths == () and s.needles == ()
            continue
        assert s.depths[0] == T.DEPTHS[i % len(T.DEPTHS)] * (0.75 if t == "vartrack" else 1)
        doc_tokens = len(tok.encode(s.document))
        positions = []
        for needle, depth in zip(s.needles, s.depths):
            at = s.document.index(needle)
            assert s.document.count(needle) == 1
            frac = len(tok.encode(s.document[:at])) / (doc_tokens - len(tok.encode(" " + needle)))
            # at the nearest sentence boundary: off by at most half a sentence (<= 50 bytes),
            # plus any other needle sharing that boundary
            near = sum(len(o) + 1 for o in s.needles
                       if o != needle and abs(s.document.index(o) - at) < len(o) + 110)
            assert abs(frac - depth) < (60 + near) / doc_tokens, (t, L, i, depth, frac)
            positions.append(at)
        if t == "vartrack":  # the chain reads in order
            assert positions == sorted(positions)


def test_answers_are_recoverable_from_the_document(samples):
    for (t, L, i), s in samples.items():
        doc = s.document
        if t == "passkey":
            assert f"pass key is {s.answers[0]}" in doc
        elif t == "multikey":
            key = re.search(r"number for (\S+) mentioned", s.question).group(1)
            assert f"number for {key} is: {s.answers[0]}." in doc
            assert len(re.findall(r"special magic number for \S+ is: \d+", doc)) == 4
        elif t == "multivalue":
            key = re.search(r"numbers for (\S+) mentioned", s.question).group(1)
            assert sorted(re.findall(rf"numbers for {key} is: (\d+)", doc)) == sorted(s.answers)
        elif t == "vartrack":
            value = re.search(r"value (\d+)", s.question).group(1)
            # follow the chain from the value through the document
            held, changed = set(), True
            assigns = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", doc)
            while changed:
                changed = False
                for name, rhs in assigns:
                    if name not in held and (rhs == value or rhs[4:] in held):
                        held.add(name)
                        changed = True
            assert held == set(s.answers) and len(held) == 5
        else:
            counts = collections.Counter(doc.split())
            top = [w for w, _ in counts.most_common(4)]
            assert top[:3] == list(s.answers)
            assert counts[top[2]] > counts[top[3]]  # unambiguous


def test_filler_varies(samples):
    doc = samples[("passkey", 4096, 0)].document
    sents = re.split(r"(?<=\.) ", doc.replace("\n", " "))
    assert len(set(sents)) > 0.9 * len(sents)
    assert samples[("passkey", 4096, 0)].document[:500] != samples[("passkey", 4096, 4)].document[:500]


def test_deterministic_by_seed(tok):
    a = T.make_sample("multikey", tok, 2048, 3, seed=0)
    assert T.make_sample("multikey", tok, 2048, 3, seed=0) == a
    b = T.make_sample("multikey", tok, 2048, 3, seed=1)
    assert b.answers != a.answers and b.document != a.document


def _sample(answers):
    return T.Sample("x", 1024, 0, (1,), tuple(answers), (), (), "", "", 8)


@pytest.mark.parametrize("answers, output, expected", [
    (["4817203"], " 4817203.", 1.0),
    (["4817203"], "The pass key is 4817203", 1.0),
    (["4817203"], "48172030", 0.0),  # part of a longer number
    (["4817203"], "4817 203", 0.0),
    (["4817203"], "", 0.0),
    (["1234567", "7654321", "1111111", "2222222"], "1234567, 7654321 and 3333333", 0.5),
    (["ABCDE", "FGHIJ"], "abcde, FGHIJ", 1.0),
    (["ABCDE", "FGHIJ"], "ABCDEF", 0.0),  # a longer name
    (["folovi", "muni", "tetri"], "folovi, muni, zuko", 2 / 3),
])
def test_score_on_hand_made_answers(answers, output, expected):
    assert T.score(_sample(answers), output) == pytest.approx(expected)


def test_zipf_counts_have_a_clear_top_three():
    for n in (50, 500, 3000):
        c = T._zipf_counts(n, 400, 2.0)
        assert c.sum() == n or n < 10
        top = np.sort(c)[::-1]
        assert top[0] > top[1] > top[2] > top[3]


def test_unknown_task_and_too_short_length(tok):
    with pytest.raises(ValueError, match="unknown task"):
        T.make_sample("nope", tok, 2048, 0)
    with pytest.raises(ValueError, match="too short"):
        T.make_sample("passkey", tok, 100, 0)


@pytest.mark.parametrize("spec, describe", [
    ("streaming", "streaming"), ("topk:64", "topk"), ("quest:8", "quest"), ("dipr:8", "dipr"),
    ("dipr-flat:inf", "dipr"), ("dipr-block:4", "dipr"), ("dipr:8:delta=3:cap=0.1", "dipr"), ("streaming:2:8", "streaming"),
])
def test_parse_method(spec, describe):
    m = parse_method(spec)
    assert m.name == spec and describe in m.attention.describe()


def test_parse_method_values():
    m = parse_method("dipr:8:delta=3:cap=0.1")
    assert m.attention.plan.beta == 8 and m.attention.plan.delta == 3
    assert m.attention.capacity_fraction == 0.1 and m.attention.plan.index == "cluster"
    assert parse_method("dipr-flat:inf").attention.plan.beta == float("inf")
    assert parse_method("full").attention.describe() == "full"
    m = parse_method("dipr-cluster:8:per=layer:onepass").attention
    assert m.calibrate_per == "layer" and m.plan.one_pass
    assert parse_method("dipr-cluster:8").attention.calibrate_per == "kv_head"


@pytest.mark.parametrize("spec", ["dipr", "topk", "topk:x", "quest:1:2:3", "bogus:1", "dipr:8:foo=1",
                                  "full:3", "streaming:4", "dipr:", "dipr-cluster:8:per=head",
                                  "dipr:8:onepass=1"])
def test_parse_method_rejects(spec):
    with pytest.raises(MethodSpecError, match=re.escape(repr(spec))):
        parse_method(spec)


def test_cli_method_grammar():
    """`alaya generate --method` takes `alaya eval`'s grammar plus its two shorthands."""
    from alaya_jax.cli import parse_method as cli_parse

    assert cli_parse("full") is None
    assert cli_parse("dipr").plan.beta == 8 and cli_parse("dipr-flat").plan.index == "flat"
    m = cli_parse("dipr-cluster:6:onepass:per=layer")
    assert m.plan.beta == 6 and m.plan.one_pass and m.calibrate_per == "layer"
    assert cli_parse("streaming:256").plan.window == 256
    assert cli_parse("streaming:2:8").plan.sink == 2
    for bad in ("bogus", "streaming:x", "dipr:8:foo=1"):
        with pytest.raises(SystemExit, match="unknown --method"):
            cli_parse(bad)
