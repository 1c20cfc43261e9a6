"""`dvc plots show` that renders offline and fails loudly.

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline it stays blank; after a partial run it
exits 0 and leaves out what is missing. Here the three scripts come bundled from the vl-convert package,
inlined in an HTML template that the project's DVC config points at (`.dvc/config.local`, so a plain
`dvc plots show` renders offline afterwards too), and every plot input is checked first.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from medssl.errors import PlotsError

TEMPLATE = Path(".dvc/tmp/medssl-vega-offline.html")  # DVC resolves plots.html_template against .dvc/


def template(path: Path = TEMPLATE) -> Path:
    """Write the offline template once per vl-convert version: its scripts inline, then DVC's plot divs."""
    import vl_convert

    if path.is_file() and f"vl-convert {vl_convert.__version__}" in path.read_text()[:200]:
        return path
    bundle = vl_convert.javascript_bundle("window.vegaEmbed = vegaEmbed; window.vega = vega; window.vegaLite = vegaLite;")
    bundle = bundle.replace("</script", "<\\/script")  # inline: no early end of the script element
    html = (f"<!DOCTYPE html>\n<!-- vl-convert {vl_convert.__version__}: Vega, Vega-Lite, Vega-Embed inline -->\n"
            f"<html><head><meta charset='utf-8'><title>medssl: DVC plots</title>{{refresh_tag}}\n"
            f"<script>{bundle}</script>\n"
            "<style>body{font-family:sans-serif}table{border-spacing:15px}</style></head>\n"
            "<body>\n{plot_divs}\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(html)
    tmp.replace(path)
    return path


def dvc_bin() -> str:
    """The dvc beside this interpreter (a venv that is not activated), else the one on PATH."""
    here = Path(sys.executable).with_name("dvc")
    return str(here) if here.is_file() else (shutil.which("dvc") or "dvc")


def missing_inputs(dvc: str) -> list[str]:
    """`dvc plots show --json` lists what it could not load; one line each (plot name, file, reason)."""
    r = subprocess.run([dvc, "plots", "show", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise PlotsError(f"dvc plots show failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    errors = json.loads(r.stdout or "{}").get("errors", [])
    return [f"{e.get('source') or e.get('name')} ({e.get('type')}; plot {e.get('name')!r})" for e in errors]


def show(out: Path = Path("dvc_plots"), dvc: str | None = None) -> Path:
    """Check every plot input, then render every plot to `out`/index.html with the offline template.
    Returns the page. Raises PlotsError naming each missing input."""
    dvc = dvc or dvc_bin()
    missing = missing_inputs(dvc)
    if missing:
        raise PlotsError(f"{len(missing)} plot input(s) missing: " + "; ".join(missing)
                         + ". Run `dvc repro` (or `medssl pipeline`) first")
    tpl = template()
    subprocess.run([dvc, "config", "--local", "plots.html_template", str(tpl.resolve())], check=True)
    r = subprocess.run([dvc, "plots", "show", "--html-template", str(tpl), "-o", str(out)], capture_output=True, text=True)
    page = out / "index.html"
    if r.returncode != 0 or not page.is_file():
        raise PlotsError(f"dvc plots show wrote no {page} (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return page
