"""report.md as one self-contained report.html, which MLflow's artifact viewer renders inline.

MLflow shows a ``.md`` artifact as plain text and an ``.html`` one as a page (in a sandboxed
frame that cannot fetch the run's other files), so the HTML carries its images inline as base64
``data:`` URIs and its style in the page. The converter covers the markdown the eval reports
write — ``#`` headings, paragraphs, ``-`` lists, pipe tables, images, ``**bold**``, ```code```
and links — without a markdown package; anything else is shown as escaped text.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em; color: #1a1a1a; max-width: 70em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; font-size: 90%; word-break: break-all; }
img { max-width: 100%; image-rendering: pixelated; }
"""

TOKEN = re.compile(r"`(?P<code>[^`]+)`|!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")  # code span | image
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
BOLD = re.compile(r"\*\*(.+?)\*\*")
BULLET = re.compile(r"^\s*[-*]\s+")


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI (its type from the suffix)."""
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def inline(text: str, base_dir: Path | None) -> str:
    """One line's inline markdown as HTML: code spans verbatim, images embedded, bold, links."""
    out, position = [], 0
    for match in TOKEN.finditer(text):
        out.append(plain(text[position : match.start()]))
        position = match.end()
        if match.group("code") is not None:
            out.append(f"<code>{html.escape(match.group('code'))}</code>")
        else:
            out.append(image(match.group("alt"), match.group("src"), base_dir))
    out.append(plain(text[position:]))
    return "".join(out)


def plain(text: str) -> str:
    escaped = BOLD.sub(r"<strong>\1</strong>", html.escape(text, quote=False))
    return LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', escaped)


def image(alt: str, src: str, base_dir: Path | None) -> str:
    """An image; a local file beside the report goes into the page itself."""
    local = base_dir / src if base_dir is not None and "://" not in src else None
    url = data_uri(local) if local is not None and local.is_file() else src
    return f'<img alt="{html.escape(alt)}" src="{html.escape(url)}">'


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def is_separator(line: str) -> bool:
    return bool(re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", line.strip()))


def markdown_to_html(text: str, base_dir: Path | None = None, title: str = "report") -> str:
    """A complete HTML page of the markdown ``text``; images relative to ``base_dir`` are embedded."""
    lines = text.splitlines()
    body: list[str] = []
    paragraph: list[str] = []
    i = 0

    def flush() -> None:
        if paragraph:
            body.append(f"<p>{' '.join(inline(p, base_dir) for p in paragraph)}</p>")
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        heading = re.match(r"(#{1,6})\s+(.*)", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = len(heading.group(1))
            body.append(f"<h{level}>{inline(heading.group(2), base_dir)}</h{level}>")
        elif stripped.startswith("|") and i + 1 < len(lines) and is_separator(lines[i + 1]):
            flush()
            head = "".join(f"<th>{inline(c, base_dir)}</th>" for c in table_cells(stripped))
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(
                    "<tr>"
                    + "".join(f"<td>{inline(c, base_dir)}</td>" for c in table_cells(lines[i]))
                    + "</tr>"
                )
                i += 1
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
            continue
        elif BULLET.match(stripped):
            flush()
            items = []
            while i < len(lines) and BULLET.match(lines[i]):
                items.append(f"<li>{inline(BULLET.sub('', lines[i]), base_dir)}</li>")
                i += 1
            body.append(f"<ul>{''.join(items)}</ul>")
            continue
        else:
            paragraph.append(stripped)
        i += 1
    flush()
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_html_report(markdown_path: Path) -> Path:
    """``report.md`` -> ``report.html`` beside it (images embedded); returns the HTML's path."""
    markdown_path = Path(markdown_path)
    page = markdown_to_html(markdown_path.read_text(), markdown_path.parent, title=markdown_path.parent.name)
    path = markdown_path.with_suffix(".html")
    path.write_text(page)
    return path
