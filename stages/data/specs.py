"""Dataset specs and corpus loading for calibration and evaluation.

A dataset SPEC is a short string a user types on the command line or in a recipe:

- `wikitext2`, `ptb`, `c4`: the named corpus from the Hugging Face hub (needs internet);
- `wikitext2=PATH`, `ptb=PATH`, `c4=PATH`: the same corpus from a local file (a raw
  `wiki.*.raw` / `ptb.*.txt` text file, or JSON lines / Parquet, `.gz` allowed for JSON);
- `text=PATH`: a plain text file; `jsonl=PATH[:field]`, `parquet=PATH[:field]`
  (field default `text`): any other corpus, rows joined with a blank line;
- `pydoc`: Python's own documentation topics (stdlib `pydoc_data`), no download.

`parse_spec` checks the string (and the file) early; `load_corpus(spec, role)` returns
the rows of one role (`"calibration"` or `"evaluation"`) with the joining rule of the
SparseGPT reference `datautils.py` (recipes in `data/corpora.json`).
"""

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

CORPORA_PACKAGE = "sparsegpt_pipeline_data"
"""The repository's data/ folder, installed under this name (pyproject.toml) so as not to shadow a `data` package."""


@cache
def load_corpora() -> dict[str, dict[str, Any]]:
    """The parsed data/corpora.json (name -> recipe of each role); cached, treat as read-only."""
    return json.loads(files(CORPORA_PACKAGE).joinpath("corpora.json").read_text(encoding="utf-8"))


Role = Literal["calibration", "evaluation"]
NAMED = ("wikitext2", "ptb", "c4")
GENERIC = ("text", "jsonl", "parquet")
EMBEDDED = ("pydoc",)
GENERIC_JOIN = "\n\n"
_FIELD_RE = re.compile(r"^(?P<path>.+):(?P<field>[A-Za-z_][A-Za-z0-9_]*)$")
_SPEC_HELP = (
    "Use NAME (hub) or NAME=PATH for NAME in wikitext2, ptb, c4; text=PATH; "
    "jsonl=PATH[:field]; parquet=PATH[:field]; or pydoc (embedded, no download)."
)


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset SPEC string (see the module docstring)."""

    name: str
    """Corpus or format: one of wikitext2, ptb, c4, text, jsonl, parquet, pydoc."""
    path: Path | None = None
    """Local file; None for a hub corpus or `pydoc`."""
    field: str | None = None
    """Column holding the text, for JSON lines and Parquet files; None otherwise."""

    @property
    def label(self) -> str:
        """Short name for metrics keys: the corpus name, or the file stem for generic files."""
        if self.name in GENERIC and self.path is not None:
            return self.path.name.split(".")[0]
        return self.name

    @property
    def format(self) -> str:
        """Where rows come from: hub, embedded, raw (text lines), text, jsonl or parquet."""
        if self.name in EMBEDDED:
            return "embedded"
        if self.path is None:
            return "hub"
        if self.name in GENERIC:
            return self.name
        return _file_format(self.path)

    def __str__(self) -> str:
        if self.path is None:
            return self.name
        field = f":{self.field}" if self.field and self.format in ("jsonl", "parquet") else ""
        return f"{self.name}={self.path}{field}"


@dataclass(frozen=True)
class Corpus:
    """The rows of one role of a corpus and how they become one token stream."""

    label: str
    """Metrics key of the corpus (see `DatasetSpec.label`)."""
    rows: tuple[str, ...]
    """Text rows (lines, sentences or documents) in file order."""
    join: str
    """Separator for `text`: " " or "\\n\\n" as in the reference."""
    documents: bool = False
    """Sample calibration windows per document (C4) instead of from one stream."""
    max_tokens_per_seqlen: int | None = None
    """Evaluation only: keep the first `max_tokens_per_seqlen * seqlen` tokens (C4: 256)."""

    @property
    def text(self) -> str:
        """All rows joined into one string, as the reference tokenizes it."""
        return self.join.join(self.rows)


def parse_spec(spec: str | DatasetSpec) -> DatasetSpec:
    """Parse a SPEC string, checking the name, that the file exists and holds the field."""
    if isinstance(spec, DatasetSpec):
        return spec
    name, sep, rest = spec.strip().partition("=")
    name = name.strip().lower()
    allowed = NAMED + GENERIC + EMBEDDED
    if name not in allowed:
        raise ValueError(f"unknown dataset {name!r} in spec {spec!r}. {_SPEC_HELP}")
    if not sep:
        if name in GENERIC:
            raise ValueError(f"dataset spec {spec!r} needs a file: {name}=PATH. {_SPEC_HELP}")
        return DatasetSpec(name=name)
    if name in EMBEDDED:
        raise ValueError(f"{name!r} is embedded and takes no path; pass just {name!r}.")
    if not rest.strip():
        raise ValueError(f"dataset spec {spec!r} has an empty path. {_SPEC_HELP}")
    path, field = _split_field(rest.strip())
    fmt = name if name in GENERIC else _file_format(path)
    if not path.is_file():
        raise ValueError(
            f"dataset file not found: {str(path)!r} (from spec {spec!r}). Pass an existing "
            f"file as {name}=/path/to/file" + ("" if name in ("text", "wikitext2", "ptb") else "[:field]") + "."
        )
    if fmt in ("jsonl", "parquet"):
        field = field or load_corpora().get(name, {}).get("field", "text")
        _check_field(path, fmt, field, spec)
    elif field is not None:
        raise ValueError(
            f"spec {spec!r}: a field applies only to JSON lines / Parquet files, "
            f"not to {path.name!r}; drop the :{field}."
        )
    elif name == "c4":
        raise ValueError(
            f"spec {spec!r}: c4 needs a JSON lines (.jsonl, .json, .json.gz) or Parquet "
            f"file with a 'text' field, got {path.name!r}."
        )
    return DatasetSpec(name=name, path=path, field=field if fmt in ("jsonl", "parquet") else None)


def load_corpus(spec: str | DatasetSpec, role: Role) -> Corpus:
    """Load the rows of `spec` for `role` ("calibration" or "evaluation")."""
    if role not in ("calibration", "evaluation"):
        raise ValueError(f"role must be 'calibration' or 'evaluation', got {role!r}")
    spec = parse_spec(spec)
    if spec.name in EMBEDDED:
        return Corpus(label=spec.label, rows=(pydoc_text(),), join=GENERIC_JOIN)
    if spec.name in GENERIC:
        return Corpus(label=spec.label, rows=tuple(_read_rows(spec)), join=GENERIC_JOIN)
    recipe = load_corpora()[spec.name][role]
    rows = _hub_rows(spec, recipe) if spec.path is None else _read_rows(spec)
    if recipe.get("max_rows") is not None:
        rows = rows[: recipe["max_rows"]]
    return Corpus(
        label=spec.label,
        rows=tuple(rows),
        join=recipe["join"],
        documents=bool(recipe.get("documents", False)),
        max_tokens_per_seqlen=recipe.get("max_tokens_per_seqlen"),
    )


def pydoc_text() -> str:
    """Python's documentation topics (stdlib `pydoc_data`), values in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def wikitext_rows(path: Path) -> list[str]:
    """Recover the Hugging Face `wikitext-2-raw-v1` rows from a raw `wiki.*.raw` file."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")[:-1]
    return [line + "\n" if line.strip() else "" for line in lines]


def _file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet":
        return "parquet"
    if last in (".jsonl", ".json"):
        return "jsonl"
    return "raw"


def _split_field(rest: str) -> tuple[Path, str | None]:
    match = _FIELD_RE.match(rest)
    if match and not Path(rest).exists():
        return Path(match["path"]).expanduser(), match["field"]
    return Path(rest).expanduser(), None


def _check_field(path: Path, fmt: str, field: str, spec: str) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
    else:
        first = next(_jsonl_records(path), None)
        columns = list(first) if isinstance(first, dict) else []
    if field not in columns:
        raise ValueError(
            f"field {field!r} not found in {str(path)!r} (columns: {columns}); pick one with "
            f"{spec.split('=')[0]}={path}:FIELD."
        )


def _jsonl_records(path: Path) -> Iterator[Any]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {number} is not JSON: {e}") from e


def _read_rows(spec: DatasetSpec) -> list[str]:
    assert spec.path is not None
    fmt = spec.format
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return [str(v) for v in pq.read_table(spec.path, columns=[spec.field]).column(0).to_pylist()]
    if fmt == "jsonl":
        return [str(record[spec.field]) for record in _jsonl_records(spec.path)]
    if fmt == "text":
        return [spec.path.read_text(encoding="utf-8")]
    if spec.name == "wikitext2":
        return wikitext_rows(spec.path)
    # PTB text files: one sentence per line, as `ptb_text_only` yields them (stripped).
    lines = spec.path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _hub_rows(spec: DatasetSpec, recipe: dict[str, Any]) -> list[str]:
    from datasets import load_dataset

    field = load_corpora()[spec.name]["field"]
    try:
        dataset = load_dataset(**recipe["hub"])
        return list(dataset[field])
    except Exception as e:  # offline, hub down, auth: all need the same advice
        raise ValueError(
            f"could not load {spec.name!r} from the Hugging Face hub ({recipe['hub']}): "
            f"{type(e).__name__}: {e}. Without internet, pass a local copy as "
            f"{spec.name}=PATH (see the module docstring of stages.data.specs for formats)."
        ) from e
