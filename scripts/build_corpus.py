"""Build cpt's bundled multilingual text corpus from Debian documentation packages.

The default build makes the small corpus that ships inside the package,
``cpt/corpus/handbook/{en,fr,de,ar,ja}.txt.xz``, from the Debian package
``debian-handbook`` (The Debian Administrator's Handbook: one book translated into
26 languages, GPL-2+ or CC-BY-SA-3.0). The same book in every language makes the
corpus comparable across languages, which is what cpt's language tests want.

Pipeline, per language:

1. download: ``apt-get download <package>`` into ``--workdir`` (kept as a cache: a
   ``.deb`` already there is reused, so a rebuild is offline after the first run);
2. extract: ``dpkg-deb -x`` (nothing is installed on the system);
3. HTML -> text with the stdlib ``html.parser``: one HTML page is one document,
   every block element (div, p, h1-h6, li, dt, dd, td, ...) ends a paragraph;
   ``<head>``, ``<script>``, ``<style>``, navigation (``div#banner``, ``ul.docnav``,
   the tables of contents) and ``<pre>`` listings (English shell code, not the
   language) are skipped;
4. filter: the translations are partial, and an untranslated paragraph is left in
   English. For Arabic and Japanese a paragraph is kept when at least 30% of its
   letters are in the target script; for French and German it is dropped when
   common English stop words make up 8% or more of its words. English is kept as is.
   Paragraphs without any letter (bare section numbers, punctuation) are dropped;
5. de-duplicate: a paragraph already seen in the same language is dropped. About a
   quarter of the handbook's lines are repeated navigation (Prev/Next/Home, headers,
   tables of contents); step 3 skips those elements, and this step catches what
   repeats in the text itself (sidebar titles, man-page section names, credits).
   A document left with fewer than 200 characters is dropped;
6. write: UTF-8 text, paragraphs of a document separated by one newline, documents
   separated by one blank line (cpt's ``.txt`` reader treats a blank line as the
   document separator, so no blank line may appear inside a document), compressed
   with ``lzma`` preset 9. Pages are read in sorted file-name order, so the output
   is byte-for-byte reproducible from the same package version.

With ``--more`` the same pipeline builds a larger corpus for bigger local runs, from
the handbook plus ``debian-reference-<l>`` (its chapter HTML, one document per
section, tables of package lists skipped), ``manpages-<l>`` and ``manpages-<l>-dev``
(roff rendered by ``groff``, one document per manual page) and
``libreoffice-help-<l>`` (HTML, one document per help page). That corpus is not
bundled, so ``--more`` requires an explicit ``--out`` outside the cpt package.

Needs a Debian or Ubuntu system with ``apt-get`` and ``dpkg-deb`` (and ``groff`` for
the man pages of ``--more``). Run as root, a failed download is retried once after
``apt-get update``.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "cpt"
DEFAULT_OUT = PACKAGE_DIR / "corpus" / "handbook"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "cpt-corpus-build"

HANDBOOK_PACKAGE = "debian-handbook"
HANDBOOK_HTML = Path("usr/share/doc/debian-handbook/html")
HANDBOOK_COPYRIGHT = Path("usr/share/doc/debian-handbook/copyright")

# A document shorter than this after filtering is a stub (a part title page, a page
# whose every paragraph was untranslated): too little text to be worth a document.
MIN_DOC_CHARS = 200
# Japanese/Arabic paragraph: kept when at least this share of its letters is in the
# target script. Commands and package names are Latin even in a translated paragraph,
# so the bar is well under one half.
MIN_SCRIPT_SHARE = 0.30
# French/German paragraph: dropped when English stop words make up this share of its
# words. Translated text scores ~0 (a quoted English term at most), English ~30%.
MAX_ENGLISH_SHARE = 0.08

# Common English function words. Some are also frequent French or German words (German
# "in", "an", "was", "will"; French "on", "or"): the per-language exclusions below take
# those out, so that a translated paragraph scores ~0 (the kept fr and de text: 0.1%)
# and an English one ~30% (the en text: 34%).
ENGLISH_STOPWORDS = frozenset(
    {
        "the", "and", "of", "to", "is", "in", "that", "for", "with", "this", "are",
        "be", "it", "by", "from", "which", "can", "not", "or", "you", "your", "these",
        "those", "they", "have", "has", "was", "will", "an", "on", "as", "at", "if",
        "its", "their", "there", "when", "such", "should", "would", "may", "been",
        "than", "into", "only", "more", "other", "each", "any", "all", "but", "then",
        "we", "our", "how", "what", "some", "does", "do", "about", "must", "where",
        "while",
    }
)  # fmt: skip
STOPWORD_EXCLUSIONS: dict[str, frozenset[str]] = {
    "fr": frozenset({"on", "or", "as", "an", "but", "do"}),
    "de": frozenset({"in", "an", "was", "will", "so", "also", "man", "am", "all"}),
}

# Unicode ranges of the target scripts, as (first, last) code points.
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "arabic": (
        (0x0600, 0x06FF),  # Arabic
        (0x0750, 0x077F),  # Arabic Supplement
        (0x08A0, 0x08FF),  # Arabic Extended-A
        (0xFB50, 0xFDFF),  # Arabic Presentation Forms-A
        (0xFE70, 0xFEFF),  # Arabic Presentation Forms-B
    ),
    "japanese": (
        (0x3005, 0x3007),  # iteration mark 々, 〆, 〇
        (0x3040, 0x309F),  # Hiragana
        (0x30A0, 0x30FF),  # Katakana (includes the long-vowel mark ー)
        (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
        (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
        (0x4E00, 0x9FFF),  # CJK Unified Ideographs
        (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
        (0xFF66, 0xFF9F),  # half-width Katakana
    ),
}


@dataclass(frozen=True)
class Lang:
    """One corpus language and the Debian packages that hold it."""

    code: str
    handbook_dir: str  # directory under usr/share/doc/debian-handbook/html/
    script: str | None = None  # key of SCRIPT_RANGES for non-Latin languages
    reference: str | None = None  # debian-reference-<l> (None: not translated)
    manpages: tuple[str, ...] = ()  # manpages-<l>, manpages-<l>-dev
    man_dir: str | None = None  # man root inside those packages, e.g. usr/share/man/fr
    libreoffice: str | None = None  # libreoffice-help-<l>
    # the help root inside that package, e.g. usr/share/libreoffice/help/fr
    libreoffice_dir: str | None = None


LANGS: dict[str, Lang] = {
    "en": Lang(
        "en",
        "en-US",
        reference="debian-reference-en",
        manpages=("manpages", "manpages-dev"),
        man_dir="usr/share/man",
        libreoffice="libreoffice-help-en-us",
        libreoffice_dir="usr/share/libreoffice/help/en-US",
    ),
    "fr": Lang(
        "fr",
        "fr-FR",
        reference="debian-reference-fr",
        manpages=("manpages-fr", "manpages-fr-dev"),
        man_dir="usr/share/man/fr",
        libreoffice="libreoffice-help-fr",
        libreoffice_dir="usr/share/libreoffice/help/fr",
    ),
    "de": Lang(
        "de",
        "de-DE",
        reference="debian-reference-de",
        manpages=("manpages-de", "manpages-de-dev"),
        man_dir="usr/share/man/de",
        libreoffice="libreoffice-help-de",
        libreoffice_dir="usr/share/libreoffice/help/de",
    ),
    # Debian has no Arabic debian-reference, man pages or LibreOffice help:
    # --more can only use the handbook for Arabic.
    "ar": Lang("ar", "ar-MA", script="arabic"),
    "ja": Lang(
        "ja",
        "ja-JP",
        script="japanese",
        reference="debian-reference-ja",
        manpages=("manpages-ja", "manpages-ja-dev"),
        man_dir="usr/share/man/ja",
        libreoffice="libreoffice-help-ja",
        libreoffice_dir="usr/share/libreoffice/help/ja",
    ),
}

MORE_SOURCES = ("handbook", "reference", "manpages", "libreoffice")


class BuildError(Exception):
    """A problem the user can fix (missing tool, package not found); printed in one line."""


# ---------------------------------------------------------------------------------------
# Download and extraction
# ---------------------------------------------------------------------------------------


def require_tool(name: str, why: str) -> str:
    """Return the path of an executable, or explain what is missing and how to get it."""
    path = shutil.which(name)
    if path is None:
        raise BuildError(
            f"`{name}` not found on PATH; it is needed {why}. This script fetches Debian "
            "packages and must run on Debian or Ubuntu (e.g. in a `debian:bookworm` "
            "container)"
        )
    return path


def find_deb(package: str, workdir: Path) -> Path | None:
    """The cached ``<package>_<version>_<arch>.deb`` in workdir (the last by name if several)."""
    debs = sorted(workdir.glob(f"{package}_*.deb"), reverse=True)
    return debs[0] if debs else None


def download(package: str, workdir: Path) -> Path:
    """``apt-get download`` one package into workdir (reusing a cached .deb)."""
    cached = find_deb(package, workdir)
    if cached is not None:
        return cached
    apt_get = require_tool("apt-get", "to download Debian packages")
    workdir.mkdir(parents=True, exist_ok=True)

    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [apt_get, "download", package],
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
        )

    result = attempt()
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # The usual cause is an empty or stale package list (fresh container): refresh it
        # once, which needs root, and try again.
        print(
            f"  apt-get download {package} failed; running apt-get update",
            file=sys.stderr,
        )
        subprocess.run([apt_get, "update"], capture_output=True, text=True, check=False)
        result = attempt()
    deb = find_deb(package, workdir)
    if result.returncode != 0 or deb is None:
        detail = (result.stderr or result.stdout).strip().splitlines()
        hint = detail[-1] if detail else f"exit code {result.returncode}"
        raise BuildError(
            f"`apt-get download {package}` failed ({hint}); run `apt-get update` as root "
            "and check that the package exists in your distribution (`apt-cache policy "
            f"{package}`)"
        )
    return deb


def extract(deb: Path, workdir: Path) -> Path:
    """``dpkg-deb -x`` a package into its own directory under workdir; return that root."""
    root = workdir / "extracted" / deb.stem
    stamp = root / ".extracted"
    if stamp.exists():
        return root
    dpkg_deb = require_tool("dpkg-deb", "to unpack .deb files")
    if root.exists():
        shutil.rmtree(root)  # a half-finished extraction from an interrupted run
    root.mkdir(parents=True)
    subprocess.run([dpkg_deb, "-x", str(deb), str(root)], check=True)
    stamp.touch()
    return root


def fetch(package: str, workdir: Path) -> tuple[Path, Path]:
    """Download and extract a package; return (the .deb, the extraction root)."""
    deb = download(package, workdir)
    return deb, extract(deb, workdir)


def deb_version(deb: Path) -> str:
    """The version part of ``name_version_arch.deb``; apt encodes ':' as '%3a'."""
    parts = deb.stem.split("_")
    version = parts[1] if len(parts) == 3 else deb.stem
    return version.replace("%3a", ":").replace("%3A", ":")


# ---------------------------------------------------------------------------------------
# HTML -> paragraphs
# ---------------------------------------------------------------------------------------

# Elements that start or end a paragraph. Inline elements (a, code, span, em, ...) only
# contribute their text to the paragraph around them.
BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "br", "caption", "dd",
        "details", "div", "dl", "dt", "figcaption", "figure", "footer", "h1", "h2",
        "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p",
        "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
        "ul",
    }
)  # fmt: skip
# HTML elements without an end tag: they must never count as an open element.
VOID_TAGS = frozenset(
    {
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
        "param", "source", "track", "wbr",
    }
)  # fmt: skip


@dataclass(frozen=True)
class HtmlRules:
    """What to skip in one family of HTML pages, and where a new document starts."""

    skip_tags: frozenset[str] = frozenset({"head", "script", "style", "pre", "noscript"})
    skip_classes: frozenset[str] = frozenset()
    skip_ids: frozenset[str] = frozenset()
    skip_hidden: bool = False  # skip elements with the `hidden` attribute
    split_tags: frozenset[str] = frozenset()  # a heading that starts a new document


HANDBOOK_RULES = HtmlRules(
    # banner/title: "Download the ebook" and the logo links; docnav: Prev/Home/Next;
    # toc: a chapter's table of contents (its titles are repeated in the sections);
    # legalnotice: the license blurb of the title page, which the README carries.
    skip_classes=frozenset({"docnav", "toc", "legalnotice"}),
    skip_ids=frozenset({"banner", "title"}),
)
REFERENCE_RULES = HtmlRules(
    # Tables of debian-reference are package lists (name, popcon, size, English
    # description): numbers and English, not prose.
    skip_classes=frozenset({"navheader", "navfooter", "toc", "table", "informaltable"}),
    split_tags=frozenset({"h2"}),  # one document per section, not per 300 KB chapter
)
LIBREOFFICE_RULES = HtmlRules(
    # header/aside/nav: the module menu, search box and index; footer: debug info.
    skip_tags=frozenset({"head", "script", "style", "pre", "noscript", "header", "aside", "footer", "nav"}),
    skip_ids=frozenset({"SearchFrame", "DonationFrame", "DEBUG"}),
    skip_classes=frozenset({"noteicon", "debug"}),
    # A help page holds every platform's wording of a menu path; the macOS variant is
    # `hidden` and would duplicate the visible one.
    skip_hidden=True,
)


class HtmlText(HTMLParser):
    """Collect the visible text of a page as documents, each a list of raw paragraphs."""

    def __init__(self, rules: HtmlRules) -> None:
        super().__init__(convert_charrefs=True)
        self.rules = rules
        self.documents: list[list[str]] = [[]]
        self._buffer: list[str] = []
        self._skip_tag: str | None = None  # tag of the skipped element we are inside
        self._skip_depth = 0  # nesting of that tag inside the skipped element

    def _flush(self) -> None:
        text = "".join(self._buffer)
        self._buffer = []
        if text.strip():
            self.documents[-1].append(text)

    def _skips(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        rules = self.rules
        if tag in rules.skip_tags:
            return True
        values = dict(attrs)
        if rules.skip_hidden and "hidden" in values:
            return True
        if values.get("id") in rules.skip_ids:
            return True
        classes = (values.get("class") or "").split()
        return any(c in rules.skip_classes for c in classes)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag and tag not in VOID_TAGS:
                self._skip_depth += 1
            return
        if tag not in VOID_TAGS and self._skips(tag, attrs):
            self._flush()
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in self.rules.split_tags:
            self._flush()
            if self.documents[-1]:
                self.documents.append([])
        elif tag in BLOCK_TAGS:
            self._flush()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # XHTML's <br/>, <img/>, <a id="x"/>: an element with no content.
        if self._skip_tag is None and tag in BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_documents(path: Path, rules: HtmlRules) -> list[list[str]]:
    """Parse one HTML file into documents of raw (not yet normalized) paragraphs."""
    parser = HtmlText(rules)
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return [doc for doc in parser.documents if doc]


# ---------------------------------------------------------------------------------------
# Normalization and language filter
# ---------------------------------------------------------------------------------------

_JA = "".join(f"\\u{lo:04x}-\\u{hi:04x}" for lo, hi in SCRIPT_RANGES["japanese"])
_JA_CHARS = f"[{_JA}、。「」（）]"
# Japanese does not put spaces between words, so a line break between two Japanese
# characters (HTML source wrapping) is an artifact and must not become a space.
_JA_LINEBREAK = re.compile(f"(?<={_JA_CHARS})[ \t]*\n\\s*(?={_JA_CHARS})")
# groff turns every roff input line break into a space, also inside Japanese text.
_JA_SPACE = re.compile(f"(?<={_JA_CHARS}) (?={_JA_CHARS})")
_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d_]+")


def normalize(text: str, lang: Lang) -> str:
    """Collapse all whitespace (newlines included) into single spaces."""
    if lang.script == "japanese":
        text = _JA_LINEBREAK.sub("", text)
    return _SPACES.sub(" ", text).strip()


def join_japanese(text: str) -> str:
    """Drop the spaces groff put between two Japanese characters."""
    return _JA_SPACE.sub("", text)


def in_script(char: str, script: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in SCRIPT_RANGES[script])


def script_share(text: str, script: str) -> float:
    """Share of the letters of text that belong to script (0 when there is no letter)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(in_script(c, script) for c in letters) / len(letters)


def english_share(text: str, lang_code: str) -> float:
    """Share of the words of text that are English stop words (0 when no word)."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    stop = ENGLISH_STOPWORDS - STOPWORD_EXCLUSIONS.get(lang_code, frozenset())
    return sum(w in stop for w in words) / len(words)


def in_language(paragraph: str, lang: Lang) -> bool:
    """Whether a paragraph is (mostly) in the target language rather than English."""
    if lang.code == "en":
        return True
    if lang.script is not None:
        return script_share(paragraph, lang.script) >= MIN_SCRIPT_SHARE
    return english_share(paragraph, lang.code) < MAX_ENGLISH_SHARE


# ---------------------------------------------------------------------------------------
# Corpus assembly
# ---------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Counts for the per-language summary table."""

    pages: int = 0  # source documents read (pages, sections, man pages)
    documents: int = 0  # documents written
    kept: int = 0  # paragraphs written
    dropped_lang: int = 0  # untranslated (English) paragraphs
    dropped_dup: int = 0  # paragraphs already seen in this language
    dropped_other: int = 0  # no letter at all, or in a document under MIN_DOC_CHARS
    text_bytes: int = 0
    xz_bytes: int = 0


@dataclass
class Corpus:
    """The filtered, de-duplicated documents of one language."""

    lang: Lang
    documents: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    stats: Stats = field(default_factory=Stats)

    def add(self, paragraphs: Iterable[str]) -> None:
        """Filter one source document and keep it if enough text survives."""
        self.stats.pages += 1
        kept: list[str] = []
        for raw in paragraphs:
            paragraph = normalize(raw, self.lang)
            if not paragraph:
                continue
            if not any(c.isalpha() for c in paragraph):
                self.stats.dropped_other += 1  # "6.2.", "—", bare numbers
                continue
            if paragraph in self.seen:
                self.stats.dropped_dup += 1
                continue
            self.seen.add(paragraph)
            if not in_language(paragraph, self.lang):
                self.stats.dropped_lang += 1
                continue
            kept.append(paragraph)
        text = "\n".join(kept)
        if len(text) < MIN_DOC_CHARS:
            self.stats.dropped_other += len(kept)
            return
        self.documents.append(text)
        self.stats.documents += 1
        self.stats.kept += len(kept)

    def add_source(self, label: str, documents: Iterable[list[str]]) -> None:
        """Add every document of one source and print what it contributed."""
        docs_before = self.stats.documents
        chars_before = sum(len(d) for d in self.documents)
        for doc in documents:
            self.add(doc)
        docs = self.stats.documents - docs_before
        chars = sum(len(d) for d in self.documents) - chars_before
        print(f"  {self.lang.code} {label}: {docs} documents, {chars / 1e6:.2f} M chars")

    def text(self) -> str:
        return "\n\n".join(self.documents) + "\n"

    def write(self, out_dir: Path) -> Path:
        data = self.text().encode("utf-8")
        packed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.lang.code}.txt.xz"
        path.write_bytes(packed)
        self.stats.text_bytes, self.stats.xz_bytes = len(data), len(packed)
        return path


# ---------------------------------------------------------------------------------------
# Sources: each yields the raw paragraphs of one document at a time, in a stable order
# ---------------------------------------------------------------------------------------


def handbook_documents(root: Path, lang: Lang) -> Iterator[list[str]]:
    """One document per handbook HTML page, pages in sorted file-name order."""
    html_dir = root / HANDBOOK_HTML / lang.handbook_dir
    if not html_dir.is_dir():
        available = sorted(p.name for p in (root / HANDBOOK_HTML).iterdir())
        raise BuildError(f"no handbook HTML for {lang.code} at {html_dir}; the package has: " + ", ".join(available))
    for page in sorted(html_dir.glob("*.html")):
        yield from html_documents(page, HANDBOOK_RULES)


def reference_documents(root: Path, lang: Lang) -> Iterator[list[str]]:
    """debian-reference chapters (pr01, ch01..., apa), split into one document per
    section. The index page is skipped: it is the table of contents."""
    ref_dir = root / "usr/share/debian-reference"
    pages = [p for p in sorted(ref_dir.glob("*.html")) if not p.name.startswith("index.")]
    if not pages:
        raise BuildError(f"no debian-reference HTML under {ref_dir}")
    for page in pages:
        yield from html_documents(page, REFERENCE_RULES)


def groff_render(source: bytes, groff: str) -> str:
    """Render one man page to plain UTF-8 text, one paragraph per line."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        text = source.decode("latin-1")  # a few old translations are Latin-1
    # -Kutf-8: we decoded the input ourselves (and -k alone guesses Latin-1 for pages
    # without a coding tag); -rLL=2000n: lines so long that groff never wraps a
    # paragraph; -P-cbou: no SGR colour, bold, or underline overstrike in the output;
    # -t: run tbl, or the tables of the man pages come out as raw tbl source.
    result = subprocess.run(
        [groff, "-Kutf-8", "-t", "-man", "-Tutf8", "-rLL=2000n", "-P-cbou"],
        input=text.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    return result.stdout.decode("utf-8", errors="replace")


def man_paragraphs(rendered: str) -> list[str]:
    """Paragraphs of a rendered man page, without its running header and footer."""
    lines = [line.strip() for line in rendered.splitlines()]
    lines = [line for line in lines if line]
    # First line "LS(1)  User Commands  LS(1)", last "GNU coreutils 9.1  2022-09  LS(1)".
    return lines[1:-1]


def manpage_documents(roots: list[Path], lang: Lang, jobs: int) -> Iterator[list[str]]:
    """One document per man page of manpages-<l> and manpages-<l>-dev."""
    groff = require_tool("groff", "to render man pages (apt-get install groff)")
    assert lang.man_dir is not None
    pages: list[Path] = []
    for root in roots:
        man_root = root / lang.man_dir
        for section in sorted(man_root.glob("man*")):
            # Symlinks and `.so` stubs are aliases of a page that is already listed.
            pages.extend(p for p in sorted(section.glob("*.gz")) if not p.is_symlink())

    def render(page: Path) -> list[str]:
        source = gzip.decompress(page.read_bytes())
        if source.lstrip().startswith(b".so "):
            return []
        paragraphs = man_paragraphs(groff_render(source, groff))
        if lang.script == "japanese":
            paragraphs = [join_japanese(p) for p in paragraphs]
        return paragraphs

    # groff runs in a subprocess, so threads render pages in parallel; map() keeps the
    # sorted order, so the output stays reproducible.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for paragraphs in pool.map(render, pages):
            if paragraphs:
                yield paragraphs


def libreoffice_documents(root: Path, lang: Lang) -> Iterator[list[str]]:
    """One document per LibreOffice help page."""
    assert lang.libreoffice_dir is not None
    help_dir = root / lang.libreoffice_dir / "text"
    for page in sorted(help_dir.rglob("*.html")):
        yield from html_documents(page, LIBREOFFICE_RULES)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def table(corpora: list[Corpus]) -> str:
    """The per-language summary as a Markdown table."""
    rows = [
        "| lang | pages | docs | paragraphs kept | dropped: English | dropped: duplicate | dropped: other | text MB | xz KB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for corpus in corpora:
        s = corpus.stats
        rows.append(
            f"| {corpus.lang.code} | {s.pages} | {s.documents} | {s.kept} | "
            f"{s.dropped_lang} | {s.dropped_dup} | {s.dropped_other} | "
            f"{s.text_bytes / 1e6:.2f} | {s.xz_bytes / 1e3:.0f} |"
        )
    return "\n".join(rows)


def copyright_summary(root: Path) -> str:
    """The header and `Files: *` stanza of the package's copyright file, verbatim."""
    text = (root / HANDBOOK_COPYRIGHT).read_text(encoding="utf-8")
    stanzas = text.split("\n\n")
    keep = [s for s in stanzas if s.startswith(("Format:", "Files:"))]
    return "\n\n".join(s.strip() for s in keep)


def handbook_readme(version: str, deb_name: str, root: Path, corpora: list[Corpus]) -> str:
    langs = ", ".join(f"`{c.lang.code}` ({c.lang.handbook_dir})" for c in corpora)
    return f"""# Bundled corpus: The Debian Administrator's Handbook

Small, real, multilingual text for cpt's tests, examples and quick local runs:
the same book in {len(corpora)} languages, {langs}.
Generated by `scripts/build_corpus.py`; do not edit by hand.

## Source

Debian package `{HANDBOOK_PACKAGE}`, version **{version}** (`{deb_name}`),
"The Debian Administrator's Handbook" by Raphaël Hertzog and Roland Mas, and its
translators. Text taken from the package's HTML,
`{HANDBOOK_HTML}/<ll-CC>/*.html`.

## License

The book is licensed under the GNU GPL version 2 or later, **or** the Creative Commons
Attribution-ShareAlike 3.0 Unported license (CC BY-SA 3.0), at your option. These
text files are an adaptation of the book and are distributed under the same terms.
From `/usr/share/doc/debian-handbook/copyright` in the package:

```
{copyright_summary(root)}
```

(The book's own title page, `index.html`, gives copyright years up to the edition's
release.) Full license texts: the package's copyright file (it carries CC BY-SA 3.0 in
full), `/usr/share/common-licenses/GPL-2` on Debian systems, and
<https://creativecommons.org/licenses/by-sa/3.0/legalcode>.

Changes made to the original work (CC BY-SA 3.0 section 3(b)): the HTML was converted
to plain text; navigation, tables of contents, the legal notice and program listings
(`<pre>`) were removed; paragraphs left untranslated (in English) in the fr, de, ar
and ja translations were removed; repeated paragraphs were removed; pages with
less than {MIN_DOC_CHARS} characters left were removed.

## Format

`<lang>.txt.xz`: xz-compressed UTF-8 text. One handbook page is one document;
paragraphs of a document are separated by a single newline, documents by one blank
line (cpt's `.txt` reader splits documents on blank lines).

Filters: Arabic and Japanese paragraphs are kept when at least
{MIN_SCRIPT_SHARE:.0%} of their letters are in the Arabic script, or in Hiragana,
Katakana or CJK ideographs; French and German paragraphs are dropped when common
English stop words make up {MAX_ENGLISH_SHARE:.0%} or more of their words. English is
kept as is. Paragraphs seen earlier in the same language are dropped.

`tokenizer.json`: an 8,192-token byte-level BPE trained on the training splits (never the
held-out documents) of all five files; rebuild it with `python scripts/train_corpus_tokenizer.py`
after rebuilding the text.

## Rebuild

```
python scripts/build_corpus.py            # needs Debian/Ubuntu with apt-get, dpkg-deb
```

The build is reproducible: the same package version gives byte-identical files.

## Sizes

"pages": HTML pages read; "docs": documents written; "dropped: English": paragraphs
left untranslated (the translations are partial); "dropped: other": paragraphs with no
letter, or in a page left under {MIN_DOC_CHARS} characters; "text MB": UTF-8 bytes / 10^6.

{table(corpora)}
"""


def more_readme(sources: dict[str, list[str]], corpora: list[Corpus]) -> str:
    lines = [
        "# cpt --more corpus (local, not redistributed with cpt)",
        "",
        "Built by `scripts/build_corpus.py --more`. Each source keeps its own license",
        "(see `/usr/share/doc/<package>/copyright` in each package):",
        "",
    ]
    for code, packages in sources.items():
        lines.append(f"- {code}: " + ", ".join(f"`{p}`" for p in packages))
    lines += ["", table(corpora), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_langs(value: str) -> list[Lang]:
    codes = [c.strip() for c in value.split(",") if c.strip()]
    unknown = [c for c in codes if c not in LANGS]
    if unknown or not codes:
        raise argparse.ArgumentTypeError(f"unknown language(s) {', '.join(unknown) or '(none)'}; choose from " + ",".join(LANGS))
    return [LANGS[c] for c in codes]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build cpt's multilingual text corpus from Debian documentation packages (downloaded with apt-get, never installed).",
        epilog=(
            "Default: the bundled corpus cpt/corpus/handbook/<lang>.txt.xz from "
            "debian-handbook. --more: a larger local corpus from the handbook plus "
            "debian-reference, man pages and LibreOffice help, into --out."
        ),
    )
    parser.add_argument(
        "--langs",
        type=parse_langs,
        default=parse_langs(",".join(LANGS)),
        help=f"comma-separated languages (default: {','.join(LANGS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}; required with --more, outside the cpt package)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"download and extraction cache; .deb files already there are reused (default: {DEFAULT_WORKDIR})",
    )
    parser.add_argument(
        "--more",
        action="store_true",
        help="build the larger corpus (handbook + debian-reference + man pages + LibreOffice help)",
    )
    parser.add_argument(
        "--sources",
        default=",".join(MORE_SOURCES),
        help=f"with --more: which sources to use (default: {','.join(MORE_SOURCES)})",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel groff processes for man pages (default: CPU count)",
    )
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    bad = [s for s in sources if s not in MORE_SOURCES]
    if bad:
        parser.error(f"unknown source(s) {', '.join(bad)}; choose from {','.join(MORE_SOURCES)}")
    args.sources = sources
    if args.more:
        if args.out is None:
            parser.error("--more needs an explicit --out (its corpus is not bundled)")
        if args.out.resolve().is_relative_to(PACKAGE_DIR.resolve()):
            parser.error(f"--more must write outside the cpt package ({PACKAGE_DIR})")
    elif args.out is None:
        args.out = DEFAULT_OUT
    return args


def build_handbook(args: argparse.Namespace) -> list[Corpus]:
    deb, root = fetch(HANDBOOK_PACKAGE, args.workdir)
    print(f"{HANDBOOK_PACKAGE} {deb_version(deb)} ({deb.name})")
    corpora = []
    for lang in args.langs:
        corpus = Corpus(lang)
        for doc in handbook_documents(root, lang):
            corpus.add(doc)
        corpus.write(args.out)
        corpora.append(corpus)
    (args.out / "README.md").write_text(handbook_readme(deb_version(deb), deb.name, root, corpora), encoding="utf-8")
    if len(corpora) < len(LANGS):
        # The README is regenerated from this run only; build every language together
        # before committing so that its table stays complete.
        print("note: README.md lists only the languages built in this run", file=sys.stderr)
    return corpora


def build_more(args: argparse.Namespace) -> list[Corpus]:
    corpora = []
    used: dict[str, list[str]] = {}
    handbook_root = None
    if "handbook" in args.sources:
        _, handbook_root = fetch(HANDBOOK_PACKAGE, args.workdir)
    for lang in args.langs:
        corpus = Corpus(lang)
        packages: list[str] = []

        # Order matters for de-duplication: the first source to hold a paragraph keeps it.
        if handbook_root is not None:
            packages.append(HANDBOOK_PACKAGE)
            corpus.add_source(HANDBOOK_PACKAGE, handbook_documents(handbook_root, lang))
        if "reference" in args.sources and lang.reference:
            packages.append(lang.reference)
            _, root = fetch(lang.reference, args.workdir)
            corpus.add_source(lang.reference, reference_documents(root, lang))
        if "manpages" in args.sources and lang.manpages:
            packages.extend(lang.manpages)
            roots = [fetch(p, args.workdir)[1] for p in lang.manpages]
            corpus.add_source("+".join(lang.manpages), manpage_documents(roots, lang, args.jobs))
        if "libreoffice" in args.sources and lang.libreoffice:
            packages.append(lang.libreoffice)
            _, root = fetch(lang.libreoffice, args.workdir)
            corpus.add_source(lang.libreoffice, libreoffice_documents(root, lang))
        if not packages:
            print(f"  {lang.code}: no source selected has this language", file=sys.stderr)
        corpus.write(args.out)
        corpora.append(corpus)
        used[lang.code] = packages
    (args.out / "README.md").write_text(more_readme(used, corpora), encoding="utf-8")
    return corpora


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        corpora = build_more(args) if args.more else build_handbook(args)
    except (BuildError, subprocess.CalledProcessError) as err:
        print(f"build_corpus: error: {err}", file=sys.stderr)
        return 2
    print(table(corpora))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
