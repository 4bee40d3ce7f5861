"""mkdocs hook: the README's links work in the site as they do on GitHub.

docs/index.md and docs/benchmarks.md include README.md and BENCHMARKS.md from the repository root, whose
relative links are repository paths. In those two pages each such link is pointed at the site:

* ``docs/X`` -> ``X`` (the docs pages and images are the site's own files);
* a repository markdown file that a page mirrors (``BENCHMARKS.md``) -> that page;
* any other repository file (the accelerate configs in ``examples/``) is copied into the site at its
  repository path, so the link is kept as it is.

A link to a file that does not exist is left alone, so mkdocs' strict link check fails on it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

MIRRORS = {"README.md": "index.md", "BENCHMARKS.md": "benchmarks.md"}
"""Repository markdown file -> the docs page that includes it."""

# An inline link or image target: ](target) or ](target#anchor), no scheme, no leading / or #.
LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|/|#)([^)\s#]+)(#[^)\s]*)?\)")


def _root(config) -> Path:
    return Path(config["config_file_path"]).parent


def _targets(text: str) -> set[str]:
    return {m.group(1) for m in LINK.finditer(text)}


def _site_path(target: str, root: Path) -> str | None:
    """Where a repository-relative link target lives in the site, or None for a file that does not exist."""
    if target.startswith("docs/"):
        return target[len("docs/") :]
    if target in MIRRORS:
        return MIRRORS[target]
    return target if (root / target).is_file() else None


def on_files(files, config):
    """Copy the repository files the mirrored pages link to (outside docs/, not mirrored) into the site."""
    root = _root(config)
    for source in MIRRORS:
        for target in sorted(_targets((root / source).read_text(encoding="utf-8"))):
            if target.startswith("docs/") or target in MIRRORS or not (root / target).is_file():
                continue
            if files.get_file_from_path(target) is None:
                files.append(File(target, str(root), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    """Point a mirrored page's repository-relative links at the site."""
    if page.file.src_uri not in MIRRORS.values():
        return markdown
    root = _root(config)

    def repoint(m: re.Match) -> str:
        site = _site_path(m.group(1), root)
        return m.group(0) if site is None else f"]({site}{m.group(2) or ''})"

    return LINK.sub(repoint, markdown)
