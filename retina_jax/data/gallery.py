"""Render a PNG contact sheet of synthetic fundus samples with their labels and reports.

    python -m retina_jax.data.gallery --out gallery.png [--n 12] [--seed 0] [--image_size 256]
        [--modalities CFP,FFA,OCT [--row_per_modality]] [--expert_fraction 1.0]

With --row_per_modality each listed modality gets a row showing the same --n eyes (an example's
modality is drawn apart from its findings, so one index is one eye in every modality).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import textwrap

from PIL import Image, ImageDraw, ImageFont

from retina_jax import commands
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus

_CJK_PATTERNS = ('*NotoSansCJK*', '*NotoSerifCJK*', '*NotoSansSC*', '*NotoSansTC*', '*wqy*', '*WenQuanYi*', '*SimHei*',
                 '*simsun*', '*msyh*', '*DroidSansFallback*', '*SourceHanSans*', '*PingFang*', '*Hiragino*', '*ukai*', '*uming*')
_FONT_DIRS = ('/usr/share/fonts', '/usr/local/share/fonts', os.path.expanduser('~/.fonts'),
              os.path.expanduser('~/.local/share/fonts'), '/Library/Fonts', '/System/Library/Fonts', 'C:/Windows/Fonts')


def find_cjk_font() -> str | None:
    for d in _FONT_DIRS:
        if not os.path.isdir(d):
            continue
        for pat in _CJK_PATTERNS:
            hits = sorted(glob.glob(os.path.join(d, '**', pat), recursive=True))
            hits = [h for h in hits if h.lower().endswith(('.ttf', '.otf', '.ttc'))]
            if hits:
                return hits[0]
    return None


def _font(size: int, path: str | None = None):
    if path:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # pillow without FreeType
        return ImageFont.load_default()


def _text_height(font, lines, spacing):
    h = font.getbbox('Ag')[3] + spacing
    return h * len(lines)


def make_gallery(n: int = 12, seed: int = 0, image_size: int = 256, cols: int | None = None,
                 modality_rows: tuple[str, ...] | None = None, **spec_kwargs) -> Image.Image:
    """`modality_rows`: one row per modality, each showing examples 0..n-1 rendered in it."""
    if modality_rows:
        examples = [SyntheticFundus(CorpusSpec(seed=seed, size=max(n, 1), image_size=image_size, modalities=(m,),
                                               **spec_kwargs))[i] for m in modality_rows for i in range(n)]
        cols = n
    else:
        ds = SyntheticFundus(CorpusSpec(seed=seed, size=max(n, 1), image_size=image_size, **spec_kwargs))
        examples = [ds[i] for i in range(n)]
        cols = cols or min(n, 4)
    rows = math.ceil(len(examples) / cols)
    multimodal = any(ex['modality'] != 'CFP' for ex in examples)
    tile_w = max(image_size, 256)
    fsize = 12
    font = _font(fsize)
    cjk_path = find_cjk_font()
    cjk = _font(fsize, cjk_path) if cjk_path else None
    chars = max(20, int(tile_w / (fsize * 0.55)))
    tiles = []
    for ex in examples:
        i = ex['index']
        lines = [f"#{i} {ex['eye']} eye{' | ' + ex['modality'] if multimodal else ''} | DR grade {ex['dr_grade']}"
                 f" | C/D {ex['cup_to_disc']:.2f}"]
        lines += textwrap.wrap('categories: ' + ', '.join(ex['categories']), chars)
        lines += textwrap.wrap('attributes: ' + (', '.join(ex['atributes']) or '-'), chars)
        lines += textwrap.wrap('EN: ' + ex['report_en'], chars)
        if ex['caption']:
            lines += textwrap.wrap('expert: ' + ex['caption'], chars)
        zh_lines = [ex['report_zh'][j:j + chars // 2] for j in range(0, len(ex['report_zh']), chars // 2)] if cjk else []
        tiles.append((ex['image'], lines, zh_lines))
    spacing = 2
    text_h = max(_text_height(font, t[1], spacing) + (_text_height(cjk, t[2], spacing) if cjk else 0) for t in tiles) + 8
    tile_h = image_size + text_h
    sheet = Image.new('RGB', (cols * (tile_w + 8) + 8, rows * (tile_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    lh = font.getbbox('Ag')[3] + spacing
    for k, (img, lines, zh_lines) in enumerate(tiles):
        x0 = 8 + (k % cols) * (tile_w + 8)
        y0 = 8 + (k // cols) * (tile_h + 8)
        sheet.paste(Image.fromarray(img), (x0 + (tile_w - image_size) // 2, y0))
        y = y0 + image_size + 4
        for line in lines:
            draw.text((x0, y), line, fill=(0, 0, 0), font=font)
            y += lh
        if cjk:
            clh = cjk.getbbox('Ag')[3] + spacing
            for line in zh_lines:
                draw.text((x0, y), line, fill=(0, 0, 120), font=cjk)
                y += clh
    if not cjk:
        print('gallery: Chinese reports omitted (no CJK-capable font found)')
    return sheet


def main(argv=None):
    ap = commands.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', required=True, help='output PNG path')
    ap.add_argument('--n', type=int, default=12)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--image_size', type=int, default=256)
    ap.add_argument('--cols', type=int, default=None)
    ap.add_argument('--difficulty', type=float, default=0.0)
    ap.add_argument('--conditions', default=None, help='comma-separated subset of conditions')
    ap.add_argument('--single_condition', action='store_true')
    ap.add_argument('--modalities', default=None, help='comma-separated subset of CFP,FFA,OCT (drawn uniformly per example)')
    ap.add_argument('--row_per_modality', action='store_true', help='one row per --modalities entry, the same --n eyes in each')
    ap.add_argument('--expert_fraction', type=float, default=None, help='share of examples with an expert caption')
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error('--n must be >= 1')
    kw = {'difficulty': args.difficulty, 'single_condition': args.single_condition}
    if args.conditions:
        kw['conditions'] = tuple(c.strip() for c in args.conditions.split(','))
    if args.expert_fraction is not None:
        kw['expert_fraction'] = args.expert_fraction
    modalities = tuple(m.strip() for m in args.modalities.split(',')) if args.modalities else None
    if args.row_per_modality and not modalities:
        ap.error('--row_per_modality needs --modalities')
    if modalities and not args.row_per_modality:
        kw['modalities'] = modalities
    sheet = make_gallery(args.n, args.seed, args.image_size, args.cols,
                         modality_rows=modalities if args.row_per_modality else None, **kw)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f'gallery: wrote {args.out} ({args.n} samples, {args.image_size}px)')


if __name__ == '__main__':
    main()
