"""A report as sections of paragraphs, a table and an image, written as Markdown and as one HTML file."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from aevae.files.atomic import write_text


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    image: str | None = None  # file name in the report folder


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.table is not None:
            out += [s.table.to_markdown(index=False), ""]
        if s.image:
            out += [f"![{s.title}]({s.image})", ""]
    return "\n".join(out)


def to_html(title: str, sections: list[Section], folder: Path) -> str:
    """A single file: images inlined as base64 so it can be mailed or opened anywhere."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        if s.table is not None:
            body.append(s.table.to_html(index=False, border=0, classes="metrics"))
        if s.image:
            data = base64.b64encode((folder / s.image).read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%;image-rendering:pixelated}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(folder: Path, sections: list[Section], title: str) -> None:
    write_text(folder / "report.md", to_markdown(title, sections))
    write_text(folder / "report.html", to_html(title, sections, folder))
