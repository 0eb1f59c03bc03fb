"""Persistence on a tiny random Llama: store and reopen (lazily, in this process and in a new
one), crash safety (a store killed mid-way), concurrent writers, and the errors of a wrong
model, a newer format and damaged files, which leave the other sessions usable."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import alaya_jax as aj
from alaya_jax.db import DB
from alaya_jax.errors import (CheckpointError, CheckpointFormatError, ModelMismatchError,
                              SessionError, SessionNotFoundError)
from alaya_jax.store import persist
from tests import tiny_llama as tl

CFG = dict(tl.TINY, max_position_embeddings=512)
ATOL = 1e-5
P = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ids(seed, n):
    return [int(i) for i in np.random.default_rng(seed).integers(0, 256, n)]


DOC, OTHER = _ids(1, 29), _ids(2, 26)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tl.write_hf(d, tl.make_weights(CFG), CFG)
    return str(d)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return aj.load_model(tiny_dir, dtype="float32")[0]


def _fresh(model, ids):
    cache = aj.KVCache.zeros(model.cfg, 1, 128, model.dtype)
    logits, cache = aj.prefill(model, np.asarray([ids]), np.asarray([len(ids)]), cache)
    return np.asarray(logits[0]), np.asarray(cache.as_stacked().k[:, 0, :len(ids)])


def _store(model, path, name, ids):
    db = DB(model, path, page_size=P)
    s, rest = db.create_session(ids)
    s.prefill(rest)
    db.store(s, name)
    return db


def _assert_holds(model, db, name, ids):
    s = db.load(name)
    assert s.token_ids == ids
    k = np.asarray(s.kv_cache(stacked=True).k[:, 0, :len(ids)])
    np.testing.assert_allclose(k, _fresh(model, ids)[1], atol=ATOL, rtol=0)


def test_store_reopen_lazily_and_reuse(tiny, tmp_path):
    _store(tiny, tmp_path, "doc", DOC)
    man = json.load(open(tmp_path / "doc.json"))
    assert man["format_version"] == persist.FORMAT_VERSION
    assert man["token_ids"] == DOC and man["page_size"] == P and man["dtype"] == "float32"
    assert man["model_fingerprint"] and man["created"] and man["shape"][1] == 4

    db = DB(tiny, tmp_path, page_size=P)
    assert db.sessions() == ["doc"]
    assert db.info("doc")["loaded"] is False and db.stats()["pages_used"] == 0
    prompt = DOC + _ids(3, 5)
    s, rest = db.create_session(prompt)
    assert s.reused == len(DOC) and db.info("doc")["loaded"] is True
    np.testing.assert_allclose(np.asarray(s.prefill(rest)), _fresh(tiny, prompt)[0], atol=ATOL,
                               rtol=0)
    # Another page size re-pages the stored tokens.
    _assert_holds(tiny, DB(tiny, tmp_path, page_size=5), "doc", DOC)
    with pytest.raises(SessionError, match="invalid session name"):
        db.store(s, "../evil")


def test_delete_and_refresh(tiny, tmp_path):
    db = _store(tiny, tmp_path, "doc", DOC)
    other = DB(tiny, tmp_path, page_size=P)
    assert other.sessions() == ["doc"]
    db.delete("doc")
    assert not (tmp_path / "doc.json").exists()
    assert os.listdir(tmp_path / ".data") == []
    assert other.sessions() == [] and db.sessions() == []
    with pytest.raises(SessionNotFoundError, match="doc"):
        other.load("doc")
    with pytest.raises(SessionNotFoundError):
        db.delete("doc")


@pytest.mark.filterwarnings("ignore:session 'doc' was computed by another model")
def test_wrong_model_is_refused_by_name(tiny, tmp_path):
    _store(tiny, tmp_path, "doc", DOC)
    other_dir = tmp_path / "other-model"
    tl.write_hf(other_dir, tl.make_weights(CFG, seed=5), CFG)
    other, _ = aj.load_model(str(other_dir), dtype="float32")
    with pytest.warns(UserWarning, match="another model"):
        db = DB(other, tmp_path, page_size=P)
    assert db.sessions() == [] and isinstance(db.problems()["doc"], ModelMismatchError)
    with pytest.raises(ModelMismatchError, match="'doc'.*another model"):
        db.load("doc")
    s, rest = db.create_session(DOC + [1])
    assert s.reused == 0  # nothing of the other model's is reused
    _store(other, tmp_path, "mine", OTHER)  # the directory stays usable for this model
    assert db.sessions() == ["mine"]


def test_fingerprint_ignores_weight_layout_not_weights(tiny, tiny_dir, tmp_path):
    """Stacked (CPU) and per-layer (GPU) weights of one checkpoint share a fingerprint, so a
    session stored under one layout loads under the other; other weights do not."""
    _store(tiny, tmp_path, "doc", DOC)
    per_layer, _ = aj.load_model(tiny_dir, dtype="float32", stack_layers=not tiny.stacked)
    assert persist.model_fingerprint(per_layer) == persist.model_fingerprint(tiny)
    _assert_holds(tiny, DB(per_layer, tmp_path, page_size=P), "doc", DOC)
    w = tl.make_weights(CFG)
    w["model.layers.1.mlp.up_proj.weight"] *= 1.001  # a light "fine-tune" of one matrix
    tl.write_hf(tmp_path / "tweaked", w, CFG)
    tweaked, _ = aj.load_model(str(tmp_path / "tweaked"), dtype="float32")
    assert persist.model_fingerprint(tweaked) != persist.model_fingerprint(tiny)


def _largest_data_file(root, name):
    man = json.load(open(os.path.join(root, name + ".json")))
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, man["data"]))
             for f in fs]
    return max(files, key=os.path.getsize)


def _damage(root, how):
    man_path = os.path.join(root, "bad.json")
    if how in ("flip", "truncate"):
        path = _largest_data_file(root, "bad")
        data = bytearray(open(path, "rb").read())
        if how == "flip":
            for i in range(len(data) // 3, len(data) // 3 + 64):
                data[i] ^= 0x5A
        else:
            data = data[:len(data) // 2]
        open(path, "wb").write(bytes(data))
    elif how == "manifest":
        text = open(man_path).read()
        open(man_path, "w").write(text[:len(text) // 2])
    elif how == "missing_data":
        shutil.rmtree(os.path.join(root, json.load(open(man_path))["data"]))
    else:
        man = json.load(open(man_path))
        if how == "newer_format":
            man["format_version"] = persist.FORMAT_VERSION + 1
        elif how == "wrong_shape":
            man["shape"][1] += 1
        open(man_path, "w").write(json.dumps(man))


@pytest.fixture(scope="module")
def good_and_bad(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    _store(tiny, root, "good", OTHER)
    _store(tiny, root, "bad", DOC)
    return str(root)


@pytest.mark.parametrize("how,error,at_open", [
    ("flip", CheckpointError, False),
    ("truncate", CheckpointError, False),
    ("missing_data", CheckpointError, False),
    ("wrong_shape", CheckpointError, False),
    ("manifest", CheckpointError, True),
    ("newer_format", CheckpointFormatError, True),
])
def test_damaged_session_errors_leave_others_usable(tiny, good_and_bad, tmp_path, how, error,
                                                    at_open):
    root = str(tmp_path / "db")
    shutil.copytree(good_and_bad, root)
    _damage(root, how)
    if at_open:  # the manifest itself is unusable: reported when the DB opens
        with pytest.warns(UserWarning, match="'bad'"):
            db = DB(tiny, root, page_size=P)
        assert db.sessions() == ["good"]
    else:  # found when the pages are first needed
        db = DB(tiny, root, page_size=P)
        assert db.sessions() == ["bad", "good"]
        with pytest.warns(UserWarning, match="'bad'"):
            s, rest = db.create_session(DOC + [3])  # falls back: nothing else holds DOC
        assert s.reused == 0 and rest == DOC + [3]
        assert db.sessions() == ["good"]
    assert isinstance(db.problems()["bad"], error)
    with pytest.raises(error, match="session 'bad'"):
        db.load("bad")
    _assert_holds(tiny, db, "good", OTHER)
    db.delete("bad")  # a damaged session can be deleted and stored again
    _store(tiny, root, "bad", DOC)
    _assert_holds(tiny, DB(tiny, root, page_size=P), "bad", DOC)


# ----------------------------------------------------------------------------- processes

KV_FOR = """
def kv_for(ids):  # deterministic stand-in K/V [L, S, K, D] for ids (no model run needed)
    rng = np.random.default_rng(ids[0] * 1000 + len(ids))
    return [rng.normal(size=(2, len(ids), 2, 16)).astype(np.float32) for _ in range(2)]
"""
exec(KV_FOR)

CHILD = r"""
import json, os, sys, time
import numpy as np
import alaya_jax as aj
from alaya_jax.db import DB
from alaya_jax.store import persist
""" + KV_FOR + r"""
mode, model_dir, db_dir, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model, _ = aj.load_model(model_dir, dtype="float32")
db = DB(model, db_dir, page_size=8)
if mode == "reuse":
    s, rest = db.create_session(ids)
    np.save(sys.argv[5], np.asarray(s.prefill(rest)))
    print(json.dumps({"reused": s.reused, "sessions": db.sessions()}), flush=True)
else:  # store under a name, holding at a hook point until killed or until a file appears
    name, point, go = sys.argv[5], sys.argv[6], sys.argv[7]
    s = db.import_kv(ids, kv_for(ids))
    def hold():
        print("READY", flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)
    persist.HOOKS[point] = hold
    db.store(s, name)
    print("STORED", flush=True)
"""


def _spawn(*args):
    # On a GPU, children must not each preallocate most of its memory.
    env = dict(os.environ, PYTHONPATH=REPO, JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, word, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"child never printed {word}: {proc.stderr.read()[-3000:]}")


def test_reopen_in_a_new_process(tiny, tiny_dir, tmp_path):
    _store(tiny, tmp_path / "db", "doc", DOC)
    prompt = DOC + _ids(4, 6)
    p = _spawn("reuse", tiny_dir, tmp_path / "db", json.dumps(prompt), tmp_path / "logits.npy")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    info = json.loads(out.strip().splitlines()[-1])
    assert info == {"reused": len(DOC), "sessions": ["doc"]}
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), _fresh(tiny, prompt)[0],
                               atol=ATOL, rtol=0)


def test_store_killed_midway_leaves_the_old_version(tiny, tiny_dir, tmp_path):
    """SIGKILL after the new data is written but before its manifest: version 1 stays. A
    store that dies after writing the new manifest under its temporary name (simulated
    here by an exception at that point) leaves version 1 too."""
    root = tmp_path / "killed"
    _store(tiny, root, "doc", DOC)  # version 1
    p = _spawn("store", tiny_dir, root, json.dumps(OTHER), "doc", "after_data", tmp_path / "never")
    _wait_for(p, "READY")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)

    root2 = tmp_path / "interrupted"
    db = _store(tiny, root2, "doc", DOC)

    def die():
        raise KeyboardInterrupt

    persist.HOOKS["before_commit"] = die
    try:
        with pytest.raises(KeyboardInterrupt):
            db.store(db.import_kv(OTHER, kv_for(OTHER)), "doc")
    finally:
        del persist.HOOKS["before_commit"]
    for root in (str(root), str(root2)):
        db = DB(tiny, root, page_size=P)
        assert db.sessions() == ["doc"]
        _assert_holds(tiny, db, "doc", DOC)
        assert len(os.listdir(os.path.join(root, ".data"))) == 2  # v1 + the orphan
        assert db.collect_garbage(min_age_s=0)  # the orphan (and a temp manifest) go
        assert len(os.listdir(os.path.join(root, ".data"))) == 1
        assert not [f for f in os.listdir(root) if f.startswith(".tmp")]
        _assert_holds(tiny, DB(tiny, root, page_size=P), "doc", DOC)


def test_two_processes_storing_one_name_leave_one_complete_version(tiny, tiny_dir, tmp_path):
    root = tmp_path / "db"
    _store(tiny, root, "doc", _ids(9, 12))  # an older version both replace
    go = tmp_path / "go"
    versions = [DOC, OTHER]
    children = [_spawn("store", tiny_dir, root, json.dumps(ids), "doc", "before_commit", go)
                for ids in versions]
    for p in children:
        _wait_for(p, "READY")  # both have written their data: commit at once
    go.write_text("go")
    for p in children:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "STORED" in out, err[-3000:]
    db = DB(tiny, str(root), page_size=P)
    assert db.sessions() == ["doc"]
    s = db.load("doc")
    assert s.token_ids in versions
    k, v = kv_for(s.token_ids)
    cache = s.kv_cache(stacked=True)
    np.testing.assert_array_equal(np.asarray(cache.k[:, 0, :s.length]), k)
    np.testing.assert_array_equal(np.asarray(cache.v[:, 0, :s.length]), v)
    db.collect_garbage(min_age_s=0)
    assert len(os.listdir(root / ".data")) == 1
