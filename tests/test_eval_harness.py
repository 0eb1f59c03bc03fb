"""The evaluation harness and perplexity end to end on a tiny random model (CPU, seconds)."""

import json
import os

import numpy as np
import pytest

import alaya_jax as aj
from alaya_jax.eval import perplexity
from alaya_jax.eval.cli import main
from alaya_jax.eval.harness import expected_batch_s, parse_method
from tests import tiny_llama as tl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_eval"))
    tl.write_hf(d, tl.make_weights(), cfg=dict(tl.TINY, max_position_embeddings=1024))
    return d


def test_eval_cli_writes_reports_and_exact_methods_agree(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "res")
    rc = main(["eval", "--model", tiny_dir, "--tasks", "passkey,freqword", "--lengths", "512",
               "--samples", "2", "--batch", "4", "--methods", "full,dipr-flat:inf",
               "--out", out, "--name", "t"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["t.json", "t.md", "t.png"]
    res = json.load(open(os.path.join(out, "t.json")))
    assert res["incomplete"] == [] and "PARTIAL" not in res["label"]
    recs = res["records"]
    assert len(recs) == 2 * 4  # methods x (tasks x samples)
    by = {m: [(r["task"], r["index"], r["output"]) for r in recs if r["method"] == m]
          for m in ("full", "dipr-flat:inf")}
    assert by["full"] == by["dipr-flat:inf"]  # beta = inf keeps every key: dense attention
    s = res["summary"]
    assert s["dipr-flat:inf"]["attended_fraction"] == pytest.approx(1.0)
    assert s["full"]["accuracy"] == s["dipr-flat:inf"]["accuracy"]
    st = s["dipr-flat:inf"]["by_length"]["512"]
    assert st["read_fraction"] == pytest.approx(1.0) and st["truncated"] == 0
    assert st["decode_ms_per_step"] > 0 and st["batch"] == 4
    assert len(by["full"][0][2]) > 0  # a random model rambles: it did generate
    md = open(os.path.join(out, "t.md")).read()
    assert "| dipr-flat:inf | 512 |" in md
    assert "| full | 512 |" in capsys.readouterr().out


def test_eval_cli_rejects_a_bad_method_before_loading(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "missing"), "--methods", "full,topk:x"])
    assert rc == 1 and "cannot parse method 'topk:x'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return aj.load_model(tiny_dir)


def test_perplexity_exact_methods_equal_full(tiny_model, tmp_path):
    model, tok = tiny_model
    res = perplexity.run_perplexity(model, tok, ["full", "dipr-flat:inf"], prefill_tokens=200,
                                    score_tokens=24, out_dir=str(tmp_path), progress=False)
    rows = res["rows"]
    assert rows["dipr-flat:inf"]["nll"] == pytest.approx(rows["full"]["nll"], abs=1e-4)
    assert rows["dipr-flat:inf"]["attended_fraction"] == pytest.approx(1.0)
    assert rows["full"]["delta_nll_vs_first"] == 0 and 1 < rows["full"]["ppl"] < 1e6
    assert "| dipr-flat:inf |" in open(tmp_path / "eval_ppl.md").read()
    assert json.load(open(tmp_path / "eval_ppl.json"))["score_tokens"] == 24
    assert os.path.exists(tmp_path / "eval_ppl.png")


def test_teacher_forced_full_matches_a_forward_without_cache(tiny_model):
    """The per-step log-probs equal those of one causal forward over the whole sequence (the
    shapes of the test above: prefill 200, score 24, a cache of 256)."""
    model, tok = tiny_model
    cfg = dict(tl.TINY, max_position_embeddings=1024)
    ids = [int(x) for x in np.random.default_rng(1).integers(3, 250, 224)]
    ref = tl.reference_logits(tl.make_weights(), np.array(ids), cfg=cfg)
    ref_lp = ref - ref.max(-1, keepdims=True)
    ref_lp -= np.log(np.exp(ref_lp).sum(-1, keepdims=True))
    P = 200
    logits, cache = aj.prefill(model, np.array([ids[:P]], np.int32), np.array([P], np.int32),
                               aj.KVCache.zeros(model.cfg, 1, 256, model.dtype))
    r = perplexity.score_method(model, cache, logits, np.array([ids[P:]], np.int32),
                                parse_method("full").attention)
    expect = ref_lp[np.arange(P - 1, len(ids) - 1), ids[P:]]
    np.testing.assert_allclose(r["logp"][0], expect, atol=2e-4)


def test_eval_merge_equals_one_run_over_both_cells(tiny_dir, tmp_path, capsys):
    """Two runs (one method each) merged give the records and accuracies of one run of both
    methods on the same samples; mismatched runs, overlapping cells and a file that is not
    a result are refused by name."""
    out = str(tmp_path / "res")
    common = ["--model", tiny_dir, "--tasks", "passkey,freqword", "--lengths", "512",
              "--samples", "2", "--batch", "4", "--out", out]
    for name, methods in (("a", "full"), ("b", "topk:16"), ("both", "full,topk:16")):
        assert main(["eval", *common, "--methods", methods, "--name", name]) == 0
    load = lambda n: json.load(open(os.path.join(out, n + ".json")))  # noqa: E731
    assert main(["eval-merge", os.path.join(out, "a.json"), os.path.join(out, "b.json"),
                 "--out", out, "--name", "merged", "--label", "merged run"]) == 0
    merged, both = load("merged"), load("both")
    key = lambda r: (r["method"], r["task"], r["length"], r["index"])  # noqa: E731
    assert sorted(map(key, merged["records"])) == sorted(map(key, both["records"]))
    outputs = lambda res: {key(r): r["output"] for r in res["records"]}  # noqa: E731
    assert outputs(merged) == outputs(both)  # the same samples, the same greedy decode
    for m in ("full", "topk:16"):
        assert merged["summary"][m]["accuracy"] == both["summary"][m]["accuracy"]
        assert merged["summary"][m]["by_length"]["512"]["by_task"] == \
            both["summary"][m]["by_length"]["512"]["by_task"]
        assert merged["summary"][m]["by_length"]["512"]["decode_ms_per_step"] == pytest.approx(
            load("a" if m == "full" else "b")["summary"][m]["by_length"]["512"][
                "decode_ms_per_step"])
    assert merged["methods"] == ["full", "topk:16"] and len(merged["sources"]) == 2
    md = open(os.path.join(out, "merged.md")).read()
    assert md.startswith("**merged run**") and "Merged (`alaya eval-merge`) from 2 runs" in md
    assert sorted(f for f in os.listdir(out) if f.startswith("merged")) == [
        "merged.json", "merged.md", "merged.png"]
    capsys.readouterr()

    assert main(["eval-merge", os.path.join(out, "a.json"), os.path.join(out, "both.json")]) == 1
    assert "method 'full' at length 512 is in results 0 and 1" in capsys.readouterr().err
    other = dict(load("b"), seed=1)
    json.dump(other, open(os.path.join(out, "seed1.json"), "w"))
    assert main(["eval-merge", os.path.join(out, "a.json"), os.path.join(out, "seed1.json")]) == 1
    assert "differs from result 0 in seed" in capsys.readouterr().err
    open(os.path.join(out, "junk.json"), "w").write("{\"x\": 1}")
    assert main(["eval-merge", os.path.join(out, "junk.json")]) == 1
    assert "is not an `alaya eval` result" in capsys.readouterr().err


def test_eval_cli_names_a_length_too_short_for_a_task(tiny_dir, tmp_path, capsys):
    rc = main(["eval", "--model", tiny_dir, "--tasks", "multikey", "--lengths", "512",
               "--samples", "1", "--methods", "full"])
    assert rc == 1 and "multikey at length 512" in capsys.readouterr().err


def test_eval_resume_runs_only_what_the_earlier_run_did_not(tiny_dir, tmp_path, capsys):
    """--resume keeps an earlier run's records and timing and decodes only the (method, batch)
    pairs it lacks: one method added gives the outputs of a fresh run of both; resuming a
    finished run decodes nothing; a run on other samples is refused by name."""
    out = str(tmp_path / "res")
    common = ["--model", tiny_dir, "--tasks", "passkey,freqword", "--lengths", "512",
              "--samples", "2", "--batch", "2", "--out", out]
    path = lambda n: os.path.join(out, n + ".json")  # noqa: E731
    assert main(["eval", *common, "--methods", "full", "--name", "a"]) == 0
    assert main(["eval", *common, "--methods", "full,topk:16", "--name", "both"]) == 0
    assert main(["eval", *common, "--methods", "topk:16", "--name", "r",
                 "--resume", path("a")]) == 0
    a, both, r = (json.load(open(path(n))) for n in ("a", "both", "r"))
    key = lambda x: (x["method"], x["task"], x["length"], x["index"])  # noqa: E731
    outputs = lambda res: {key(x): x["output"] for x in res["records"]}  # noqa: E731
    assert outputs(r) == outputs(both) and len(r["records"]) == len(both["records"])
    assert r["methods"] == ["topk:16", "full"] and r["incomplete"] == []
    timing = lambda res: {(t["method"], t["length"]): t for t in res["timing"]}  # noqa: E731
    assert timing(r)[("full", 512)] == timing(a)[("full", 512)]  # full was not run again
    assert timing(r)[("topk:16", 512)]["batches"] == 2
    capsys.readouterr()

    assert main(["eval", *common, "--methods", "full,topk:16", "--name", "r2",
                 "--resume", path("r")]) == 0
    r2 = json.load(open(path("r2")))
    assert outputs(r2) == outputs(r) and timing(r2) == timing(r)  # nothing decoded
    assert [x["command"] for x in r2["resumed"]] == [a["command"], r["command"]]
    assert "Resumed (`--resume`) from 2 earlier run(s)" in open(os.path.join(out, "r2.md")).read()
    assert main(["eval", *common[:6], "--samples", "3", *common[8:], "--methods", "full",
                 "--name", "bad", "--resume", path("a")]) == 1
    assert "cannot resume: the earlier run's samples_per_task is 2" in capsys.readouterr().err


def test_expected_batch_s_by_length_and_compile_state():
    """The longest batch at the same length and compile state; a length not yet run in that
    state takes the longest of any length (a first batch, which compiles, is expected to take
    as long as the slowest first batch so far); nothing run yet: 0."""
    assert expected_batch_s({}, 1024, True) == 0.0
    d = {(1024, True): [400.0], (1024, False): [20.0, 25.0]}
    assert expected_batch_s(d, 1024, False) == 25.0
    assert expected_batch_s(d, 2048, True) == 400.0   # 2K's first batch: as long as 1K's
    assert expected_batch_s(d, 2048, False) == 25.0
    d[(2048, True)] = [300.0]
    assert expected_batch_s(d, 2048, True) == 300.0   # its own length once run
    assert expected_batch_s(d, 4096, True) == 400.0
