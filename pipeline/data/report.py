"""Human-facing reports on a dataset version: a one-screen summary and a contact sheet."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

_THUMB = 160
_COLUMNS = ("image", "trimap", "alpha", "composite")


def format_summary(manifest: dict[str, Any], path: Path | str | None = None, *, reused: bool = False) -> str:
    """The version's manifest on one screen. `reused`: this run found nothing to do and built no
    version, so the figures of work done (processed, timings) are labelled as the earlier build's."""
    m = manifest
    by, of = ("that build ", " of that build") if reused else ("", "")
    lines = [
        f"dataset {m['version']} ({m['status']})" + (f" at {path}" if path else "")
        + (", reused: this run processed 0 photos; the figures are those of the build that made it" if reused else ""),
        f"  parent {m['parent_version'] or '-'}; inputs {m['inputs']} = accepted {m['accepted']} + rejected {m['rejected']}; "
        f"rows {m['rows']}",
        f"  {by}processed {m['processed']}, unchanged {m['unchanged']}, new {m['new']}, changed {m['changed']}, removed {m['removed']}",
        "",
        f"  {'subject':<20} {'category':<16} {'inputs':>6} {'accepted':>8} {'rejected':>8} {'rows':>5}",
    ]
    for subject_id, s in sorted(m["subjects"].items()):
        lines.append(f"  {subject_id:<20} {s['category'] or '?':<16} {s['inputs']:>6} {s['accepted']:>8} {s['rejected']:>8} {s['rows']:>5}")
    if m["rejects_by_reason"]:
        lines += ["", "  rejects by reason:"]
        lines += [f"  {n:>5}  {reason}" for reason, n in list(m["rejects_by_reason"].items())[:10]]
        if len(m["rejects_by_reason"]) > 10:
            lines.append(f"         ... {len(m['rejects_by_reason']) - 10} more reasons in rejects.parquet")
    if m["stage_seconds"]:
        lines += ["", f"  time per stage{of} (s, summed over workers): " + ", ".join(f"{k} {v:.1f}" for k, v in m["stage_seconds"].items())]
        lines.append(f"  wall time{of}: {m['wall_seconds']:.1f} s")
    for warning in m["warnings"]:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _thumb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((_THUMB, _THUMB))
    canvas = Image.new("RGB", (_THUMB, _THUMB), (32, 32, 32))
    canvas.paste(img, ((_THUMB - img.width) // 2, (_THUMB - img.height) // 2))
    return canvas


def make_contact_sheet(version_dir: str | Path, out_png: str | Path, max_photos: int = 6) -> Path | None:
    """PNG grid: one row per photo (first composite of up to `max_photos` photos, one per
    subject first), columns original / trimap / alpha / composite. None if there are no rows."""
    version_dir = Path(version_dir)
    picked, seen_subjects = [], set()
    for part in sorted((version_dir / "data").glob("*.parquet")):
        table = pq.read_table(part, columns=["subject_id", "source_uri", "composite_index", *_COLUMNS])
        table = table.filter(pc.equal(table["composite_index"], 0))
        for row in table.to_pylist():
            if row["subject_id"] not in seen_subjects:
                seen_subjects.add(row["subject_id"])
                picked.append(row)
            if len(picked) >= max_photos:
                break
        if len(picked) >= max_photos:
            break
    if not picked:
        return None
    label_h = 18
    sheet = Image.new("RGB", (_THUMB * len(_COLUMNS), label_h + len(picked) * (_THUMB + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(_COLUMNS):
        draw.text((c * _THUMB + 4, 3), name, fill="black")
    for r, row in enumerate(picked):
        y = label_h + r * (_THUMB + label_h)
        draw.text((4, y + 3), row["source_uri"], fill="black")
        for c, name in enumerate(_COLUMNS):
            sheet.paste(_thumb(row[name]), (c * _THUMB, y + label_h))
    out_png = Path(out_png)
    sheet.save(out_png)
    return out_png
