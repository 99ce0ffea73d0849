"""The report page's style sheet (hapvr_jax.report), inline in the page so that it needs no other file."""

import string

_CSS = string.Template("""
body { font: 13px/1.4 "DejaVu Sans", "Liberation Sans", Arial, sans-serif; color: #1d2330; background: #eef0f4;
       margin: 0 auto; padding: 12px 14px 40px; max-width: 1180px; }
h1 { font-size: 20px; margin: 4px 0 2px; }
h2 { font-size: 16px; margin: 0 0 2px; }
.muted { color: #6b7280; }
.nav { margin: 6px 0 14px; padding: 0; list-style: none; display: flex; flex-wrap: wrap; gap: 4px 16px; }
.nav a { color: #1f4fbf; text-decoration: none; font-weight: 600; }
.query { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12); padding: 12px 14px;
         margin: 0 0 18px; }
.qid, .rid { font-family: "DejaVu Sans Mono", monospace; word-break: break-all; }
.path { color: #4b5563; font-size: 12px; word-break: break-all; margin: 0 0 6px; }
.row { display: flex; align-items: flex-start; }
.lab { width: ${label_text}px; flex: none; padding: 22px 8px 0 0; text-align: right; color: #4b5563;
       font-weight: 600; }
img.strip { display: block; border-radius: 3px; }
.times { display: flex; }
.times span { width: ${cell}px; text-align: center; font-size: 11px; color: #4b5563; }
.ph { display: flex; align-items: center; justify-content: center; background: repeating-linear-gradient(
      45deg, #f3f4f6, #f3f4f6 8px, #e5e7eb 8px, #e5e7eb 16px); border: 1px dashed #9ca3af; border-radius: 3px;
      color: #4b5563; font-size: 12px; text-align: center; overflow: hidden; }
.ph span { padding: 0 8px; word-break: break-all; }
.none { font-style: italic; color: #6b7280; margin: 10px 0 0 ${label}px; }
.result { border-top: 1px solid #e5e7eb; margin-top: 12px; padding-top: 10px; }
.head { display: flex; align-items: baseline; gap: 14px; flex-wrap: wrap; }
.rank { font-weight: 700; font-size: 15px; color: #111827; }
.rid { font-weight: 700; }
.score b { font-size: 14px; }
.coarse, .nseg { color: #4b5563; }
.body { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.left { flex: none; }
.right { flex: none; }
svg text { font: 10.5px "DejaVu Sans", "Liberation Sans", Arial, sans-serif; fill: #374151; }
svg text.axlab { font-size: 11.5px; font-weight: 600; fill: #4b5563; }
svg text.boxlab { font-weight: 700; font-size: 11px; paint-order: stroke; stroke: #fff; stroke-width: 2.5px; }
.bar { fill: #e5e7eb; }
.tick { stroke: #9ca3af; stroke-width: 1; }
.seg { fill-opacity: .85; }
.band { fill-opacity: .22; }
.frame { fill: none; stroke: #6b7280; stroke-width: 1; }
.map { image-rendering: pixelated; }
.halo { fill: none; stroke: #fff; stroke-width: 4; stroke-opacity: .85; }
.box { fill: none; stroke-width: 2; }
.segs { border-collapse: collapse; margin: 6px 0 0 ${label}px; font-size: 12px; }
.segs td { padding: 1px 14px 1px 0; white-space: nowrap; }
.sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
      vertical-align: -1px; }
""")


def css(label_w: int, cell: int) -> str:
  """The sheet for a label column of `label_w` px (text and an 8 px gap) and thumbnail cells of `cell` px."""
  return _CSS.substitute(label=label_w, label_text=label_w - 8, cell=cell)
