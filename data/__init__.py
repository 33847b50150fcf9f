"""Named corpora the pipeline knows, as data rather than code.

`corpora.json` says, for each named corpus (`wikitext2`, `ptb`, `c4`) and each role
(`calibration`, `evaluation`): the `datasets.load_dataset` arguments for the hub copy,
the text field, how rows are joined into one stream, and the C4-only limits (sample
per document; first 1,100 documents and 256 * seqlen tokens for evaluation). These
follow the SparseGPT reference `datautils.py`. `stages.data` reads it through
`load_corpora()`; nothing here imports the rest of the project.
"""

import json
from functools import cache
from importlib.resources import files
from typing import Any


@cache
def load_corpora() -> dict[str, dict[str, Any]]:
    """Return the parsed `corpora.json` (name -> recipe); cached, treat as read-only."""
    return json.loads(files(__name__).joinpath("corpora.json").read_text(encoding="utf-8"))
