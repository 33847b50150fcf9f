"""A report as a list of parts, rendered to Markdown (PNGs beside it) and self-contained HTML.

A part is ``("h1"|"h2"|"p", text)``, ``("table", headers, rows)`` or ``("img", file name, alt)``;
`write_parts` writes the PNGs the parts show, STEM.md and STEM.html (PNGs as base64).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from stages.run.rundir import atomic_write_bytes, atomic_write_text

Part = tuple  # ("h1"|"h2"|"p", text) | ("table", headers, rows) | ("img", file name, alt text)


def render_markdown(parts: list[Part]) -> str:
    def cell(s: object) -> str:
        return str(s).replace("|", "\\|")

    lines: list[str] = []
    for part in parts:
        kind = part[0]
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + part[1], ""]
        elif kind == "p" and part[1]:
            lines += [part[1], ""]
        elif kind == "table":
            _, headers, rows = part
            lines += ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{part[2]}]({part[1]})", ""]
    return "\n".join(lines)


def render_html(parts: list[Part], images: dict[str, bytes], title: str) -> str:
    body: list[str] = []
    for part in parts:
        kind = part[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(part[1])}</{kind}>")
        elif kind == "p" and part[1]:
            body.append(f"<p>{html.escape(part[1])}</p>")
        elif kind == "table":
            _, headers, rows = part
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[part[1]]).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(part[2])}" src="data:image/png;base64,{data}"></figure>')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_parts(out: Path, stem: str, parts: list[Part], images: dict[str, bytes], title: str) -> list[Path]:
    """Write the PNGs the parts show, ``stem``.md and ``stem``.html into ``out``; returns the paths."""
    parts = [p for p in parts if p[0] != "img" or p[1] in images]
    written = []
    for name in dict.fromkeys(p[1] for p in parts if p[0] == "img"):
        atomic_write_bytes(out / name, images[name])
        written.append(out / name)
    atomic_write_text(out / f"{stem}.md", render_markdown(parts))
    atomic_write_text(out / f"{stem}.html", render_html(parts, images, title))
    return [*written, out / f"{stem}.md", out / f"{stem}.html"]
