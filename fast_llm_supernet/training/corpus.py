"""`fast_llm_supernet.training.corpus`: a small English corpus that ships with every CPython: the docstrings of the standard library.

Used to train the tiny teacher's tokenizer and to pre-train the tiny teacher, so tests and
examples need no download. The text is read from the stdlib's `.py` sources with `ast` (nothing
is imported), in a fixed order, so a given Python version always yields the same corpus.
"""

from __future__ import annotations

import ast
import codecs
import sysconfig
from pathlib import Path

# Pure-Python stdlib modules with plenty of prose in their docstrings, in a fixed order.
# Files missing from a trimmed Python install are skipped (the order of the rest is kept).
STDLIB_FILES: tuple[str, ...] = (
    "this.py",
    "textwrap.py",
    "string.py",
    "functools.py",
    "heapq.py",
    "bisect.py",
    "colorsys.py",
    "fractions.py",
    "statistics.py",
    "random.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "argparse.py",
    "collections/__init__.py",
    "contextlib.py",
    "dataclasses.py",
    "enum.py",
    "inspect.py",
    "pathlib.py",
    "shutil.py",
    "tempfile.py",
    "typing.py",
    "unittest/case.py",
    "logging/__init__.py",
    "difflib.py",
    "pprint.py",
    "calendar.py",
    "datetime.py",
    "csv.py",
    "zipfile.py",
    "tarfile.py",
    "gzip.py",
    "base64.py",
    "hashlib.py",
    "secrets.py",
    "threading.py",
    "queue.py",
    "sched.py",
    "subprocess.py",
    "copy.py",
    "doctest.py",
    "fnmatch.py",
    "glob.py",
    "pickle.py",
    "shlex.py",
    "timeit.py",
    "traceback.py",
    "uuid.py",
    "warnings.py",
    "weakref.py",
    "configparser.py",
    "getopt.py",
    "gettext.py",
    "mailbox.py",
    "mimetypes.py",
    "numbers.py",
    "optparse.py",
    "pdb.py",
    "platform.py",
    "pydoc.py",
    "smtplib.py",
    "tokenize.py",
    "trace.py",
    "ipaddress.py",
    "graphlib.py",
    "selectors.py",
    "sysconfig.py",
)


def _docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    tree = ast.parse(source)
    nodes = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))
    texts = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) > 40:  # one-liners like "Return self." teach little
            texts.append(doc)
    return texts


def _zen_of_python(source: str) -> str:
    """`this.py` holds the Zen of Python as a rot13 string constant `s`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "s" for t in node.targets):
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    return ""


def stdlib_documents(max_files: int | None = None) -> list[str]:
    """The corpus as a list of documents (one per docstring), deterministic for a Python version."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    for relative in STDLIB_FILES[:max_files]:
        path = stdlib / relative
        if not path.is_file():
            continue
        source = path.read_text(encoding="utf-8")
        if relative == "this.py":
            documents.append(_zen_of_python(source))
        else:
            documents.extend(_docstrings(source))
    if not documents:
        raise RuntimeError(f"no stdlib source files found under {stdlib}; cannot build the corpus")
    return documents


def pydoc_topics() -> list[tuple[str, str]]:
    """Python's language reference as CPython ships it for `help()` (`pydoc_data.topics`, ~465k characters of
    English prose with code): (topic, text) pairs in sorted topic order, deterministic for a Python version."""
    from pydoc_data.topics import topics

    return sorted((name, text.strip()) for name, text in topics.items() if len(text.strip()) > 200)
