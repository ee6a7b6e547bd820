"""An offline English text corpus: sentences from the docstrings of Python standard-library modules.

Used to recover a pruned model's accuracy by distillation and to measure it on held-out text, with no download.
The split is deterministic and independent of module order: sentences are ordered by a hash of their text and the
first ``n_heldout`` form the held-out set, which training never sees.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings
from typing import Iterator, List, NamedTuple, Sequence, Tuple

__all__ = ["MODULES", "Corpus", "sentences", "load"]

# Pure-Python modules with long, prose-like docstrings. Importing them has no side effects worth mentioning.
MODULES: Tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "numbers",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "zipfile",
    "bz2",
    "cmd",
    "code",
    "codecs",
    "doctest",
    "email.utils",
    "filecmp",
    "fileinput",
    "fnmatch",
    "ftplib",
    "getopt",
    "graphlib",
    "gzip",
    "http.server",
    "imaplib",
    "linecache",
    "locale",
    "lzma",
    "multiprocessing.pool",
    "netrc",
    "pdb",
    "plistlib",
    "poplib",
    "pydoc",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "smtplib",
    "socketserver",
    "struct",
    "sysconfig",
    "timeit",
    "trace",
    "traceback",
    "urllib.request",
    "weakref",
    "xmlrpc.client",
    "zoneinfo",
)

_MIN_CHARS, _MAX_CHARS = 40, 200
# A sentence ends at . ! or ? followed by white space and a capital letter (which keeps "e.g. foo" together).
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Lines that are code, doctest, tables or reST markup rather than prose.
_NOT_PROSE = re.compile(r"^\s*(>>>|\.\.\.|\.\. |[-=~*+|]{3,}|:[a-z]+:)")


class Corpus(NamedTuple):
    train: List[str]
    heldout: List[str]


def _docstrings(module_name: str) -> Iterator[str]:
    """The docstrings of a module, its public classes and functions, and their methods (defined there)."""
    module = importlib.import_module(module_name)
    if module.__doc__:
        yield module.__doc__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc:
                yield doc
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_") or not inspect.isfunction(member):
                    continue
                doc = inspect.getdoc(member)
                if doc:
                    yield doc


def _paragraph_sentences(doc: str) -> Iterator[str]:
    """Prose paragraphs of a docstring joined into single lines, then cut into sentences."""
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = para.splitlines()
        # Indented blocks are code examples or argument lists; skip those and any markup.
        if not lines or any(line.startswith((" ", "\t")) or _NOT_PROSE.match(line) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        yield from _SPLIT.split(text)


def _is_sentence(s: str) -> bool:
    if not (_MIN_CHARS <= len(s) <= _MAX_CHARS) or not s[0].isupper() or s[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.85 * len(s)  # mostly words, not signatures or paths


def sentences(modules: Sequence[str] = MODULES) -> List[str]:
    """Unique sentences (40-200 characters of prose) from the docstrings of ``modules``, in a fixed order."""
    seen = set()
    out: List[str] = []
    # Importing and walking some modules warns about deprecated members (typing.io, ...); none matter here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            for doc in _docstrings(name):
                for s in _paragraph_sentences(doc):
                    s = s.strip()
                    if _is_sentence(s) and s not in seen:
                        seen.add(s)
                        out.append(s)
    return out


def load(n_heldout: int = 500, modules: Sequence[str] = MODULES) -> Corpus:
    """Splits :func:`sentences` into training and held-out text; ``n_heldout`` sentences are held out.

    The held-out set is the ``n_heldout`` sentences with the smallest SHA-1 of their text, so it does not depend
    on the order of ``modules`` and never overlaps the training set."""
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or n_heldout < 2:
        raise ValueError(f"n_heldout must be an int >= 2, got {n_heldout!r}")
    text = sentences(modules)
    if len(text) < n_heldout + 1:
        raise ValueError(f"the corpus has {len(text)} sentences, too few to hold out {n_heldout} and train on the rest")
    ordered = sorted(text, key=lambda s: hashlib.sha1(s.encode("utf-8")).hexdigest())
    return Corpus(train=ordered[n_heldout:], heldout=ordered[:n_heldout])
