"""Sphinx configuration for torsion's documentation."""

import os
from pathlib import Path

import torsion

project = "torsion"
author = "the torsion developers"
copyright = "2026, the torsion developers"
release = version = torsion.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "**.zip"]
myst_enable_extensions = ["dollarmath"]

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shapes"]
napoleon_use_ivar = True

# Intersphinx fetches inventories over the network, which CI does not have.
intersphinx_mapping = (
    {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
        "geoopt": ("https://geoopt.readthedocs.io/en/latest", None),
        "e3nn": ("https://docs.e3nn.org/en/stable", None),
        "torch_geometric": ("https://pytorch-geometric.readthedocs.io/en/latest", None),
    }
    if os.environ.get("TORSION_DOCS_INTERSPHINX") == "1"
    else {}
)
# Without inventories, cross-references to other projects cannot resolve; keep -W for ours.
nitpicky = False

# Executing the gallery (TORSION_DOCS_GALLERY=True) runs the examples in this process; their
# own PNGs go to TORSION_OUT, which must not default to the examples/ folder they run in.
os.environ.setdefault("TORSION_OUT", str(Path(__file__).parent / "_build" / "gallery-out"))

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "plot_gallery": os.environ.get("TORSION_DOCS_GALLERY", "False"),
    "download_all_examples": False,
}

html_theme = "alabaster"
html_title = f"torsion {release}"
