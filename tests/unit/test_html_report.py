"""report.html: the eval report's markdown as one page MLflow renders inline, the grid embedded."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from PIL import Image

from segldm.evaluation.html_report import markdown_to_html, write_html_report

REPORT = """# Evaluation of `outputs/run/checkpoints/last.ckpt`

step 3, 3 validation masks, ddim 5 steps, eta 1.0, guidance 1.0, EMA True, seeds 0..2

| metric | generated [95 % bootstrap interval, 200 draws] | reference points at this N |
|---|---|---|
| FID | 312.4 [290.1, 330.7] | two real halves: 97.0 |
| mIoU | 0.41 | real images: 0.93 |

## Protocol card

Protocol **sdm** on ade20k (NOT comparable).
- deviation: N 3 < 2000 <images> & more
- inception: `{"weights": "pt_inception-2015-12-05.pth", "resize": "none"}`

![rows: mask | generated | real](grid.png)

| id | class | IoU generated | IoU real | mask pixels |
|---|---|---|---|---|
| 0 | sky | 0.5 | 0.9 | 12.5% |
"""


def test_the_report_becomes_one_page_with_tables_lists_and_the_grid_inside(tmp_path: Path):
    grid = np.zeros((4, 6, 3), dtype=np.uint8)
    grid[:, :3, 0] = 255
    Image.fromarray(grid).save(tmp_path / "grid.png")
    (tmp_path / "report.md").write_text(REPORT)
    path = write_html_report(tmp_path / "report.md")
    page = path.read_text()
    assert path == tmp_path / "report.html" and page.startswith("<!DOCTYPE html>")
    assert "<h1>Evaluation of <code>outputs/run/checkpoints/last.ckpt</code></h1>" in page
    assert "<h2>Protocol card</h2>" in page and "<strong>sdm</strong>" in page
    assert page.count("<table>") == 2 and "<th>mIoU</th>" not in page  # the header row is the first line
    assert "<td>312.4 [290.1, 330.7]</td>" in page and "<td>sky</td>" in page
    assert "<li>deviation: N 3 &lt; 2000 &lt;images&gt; &amp; more</li>" in page  # escaped, not markup
    assert "<code>{&quot;weights&quot;: &quot;pt_inception-2015-12-05.pth&quot;" in page
    encoded = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(encoded) == (tmp_path / "grid.png").read_bytes()  # no file beside the page needed
    assert 'alt="rows: mask | generated | real"' in page


def test_an_image_that_is_not_a_local_file_keeps_its_address():
    page = markdown_to_html(
        "![x](https://example.org/a.png) and [a link](https://example.org)", Path("/nowhere")
    )
    assert '<img alt="x" src="https://example.org/a.png">' in page
    assert '<a href="https://example.org">a link</a>' in page
