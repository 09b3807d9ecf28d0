"""Build the API reference from the docstrings with pdoc.

    pip install ".[docs]" && python docs/build.py            # writes docs/api/ (open docs/api/index.html)
    python docs/build.py --out /tmp/api

The package is imported from this source tree (``docs/..``), so the pages
match the code being edited, not an installed copy. Every public module of
``jaxinf`` is rendered (Google-style docstrings). The build fails (exit status 1)
when a module cannot be imported or rendered, or
when a name of ``jaxinf.__all__`` is missing from the top-level page; pdoc's
other warnings (e.g. an annotation it cannot resolve) are printed as notes.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent  # the reference is built from this source tree, not from an installed copy
sys.path.insert(0, str(SOURCE))


def modules() -> list[str]:
    """``jaxinf`` and every public submodule (pdoc follows only ``__all__``, which lists no modules)."""
    import pkgutil

    import jaxinf

    names = ["jaxinf"]
    for info in pkgutil.walk_packages(jaxinf.__path__, "jaxinf."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def build(out: Path) -> list[Path]:
    import pdoc
    import pdoc.render

    import jaxinf

    if Path(jaxinf.__file__).resolve().parent != SOURCE / "jaxinf":
        raise SystemExit(f"docs/build.py imported jaxinf from {jaxinf.__file__}, not from the source tree {SOURCE}.")
    pdoc.render.configure(docformat="google", show_source=True, footer_text=f"jaxinf {jaxinf.__version__}")
    names = modules()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*names, output_directory=out)
    messages = [str(w.message) for w in caught if "has already been added" not in str(w.message)]
    fatal = [m for m in messages if "import" in m.lower() and "annotation" not in m.lower()]
    notes = sorted(set(messages) - set(fatal))
    for m in notes[:3]:
        print(f"pdoc note: {m}", file=sys.stderr)
    if len(notes) > 3:
        print(f"... and {len(notes) - 3} more pdoc notes (mostly annotations it cannot resolve)", file=sys.stderr)
    page = (out / "jaxinf.html").read_text(encoding="utf-8")
    missing = [name for name in jaxinf.__all__ if name not in page]
    absent = [n for n in names if not (out / (n.replace(".", "/") + ".html")).exists()]
    if fatal or missing or absent:
        for m in fatal:
            print(f"pdoc error: {m}", file=sys.stderr)
        if missing:
            print(f"missing from jaxinf.html: {', '.join(missing)}", file=sys.stderr)
        if absent:
            print(f"modules not rendered: {', '.join(absent)}", file=sys.stderr)
        raise SystemExit(1)
    return sorted(out.rglob("*.html"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "api")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    pages = build(args.out)
    print(f"wrote {len(pages)} pages to {args.out} (start at {args.out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
