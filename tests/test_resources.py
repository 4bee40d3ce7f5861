"""The packaged movie-review prefixes: counts, uniqueness, neutral sentiment, and that they ship."""

import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from prefalign.errors import UserError
from prefalign.resources import movie_prefixes, resource_path

FILES = {"train": "movie_prefixes_train.txt", "heldout": "movie_prefixes_heldout.txt"}
REPO = Path(__file__).resolve().parents[1]


def test_counts_and_shape():
    train, heldout = movie_prefixes("train"), movie_prefixes("heldout")
    assert 300 <= len(train) <= 340 and 90 <= len(heldout) <= 110
    for split, name in FILES.items():
        raw = resource_path(name).read_text(encoding="utf-8")
        assert raw.endswith("\n") and "\r" not in raw
        lines = raw.splitlines()
        assert lines == movie_prefixes(split)  # no blank lines hidden by the accessor
        for line in lines:
            assert line == line.strip(), f"{name}: leading/trailing space in {line!r}"
            assert 4 <= len(line.split()) <= 12, f"{name}: {line!r} is not 4-12 words"


def test_no_duplicates_within_or_across_files():
    train, heldout = movie_prefixes("train"), movie_prefixes("heldout")
    for lines in (train, heldout):
        assert len({x.lower() for x in lines}) == len(lines)
    assert not {x.lower() for x in train} & {x.lower() for x in heldout}


def test_prefixes_are_sentiment_neutral_for_the_gold_judge():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for split in FILES:
        scores = {p: vader.polarity_scores(p)["compound"] for p in movie_prefixes(split)}
        loud = {p: s for p, s in scores.items() if abs(s) > 0.3}
        assert not loud, f"{split}: prefixes that already carry sentiment: {loud}"


def test_files_are_package_resources():
    root = resources.files("prefalign.resources")
    for name in FILES.values():
        assert (root / name).is_file()
        assert resource_path(name) == Path(str(root / name))


def test_wheel_contains_the_resources(tmp_path):
    """The package-data rule in pyproject.toml really puts the files into a built wheel."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "prefalign", src / "prefalign", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "out"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("prefalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in [*FILES.values(), "README.md", "__init__.py"]:
        assert f"prefalign/resources/{name}" in names


def test_bad_names_are_user_errors():
    with pytest.raises(UserError, match="train, heldout"):
        movie_prefixes("test")
    with pytest.raises(UserError, match=r"movie_prefixes_train\.txt"):
        resource_path("nope.txt")
