"""The README's Python snippets run as written, against a small trained run standing in for
runs/shakespeare (4 layers, like the default model, so layer indices in the snippets exist)."""

import os
import re

import pytest

from llm.train.loop import train
from tests.test_train import tiny_cfg

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", open(README).read(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("readme") / "shakespeare")
    train(
        tiny_cfg(**{"model.n_layers": 4, "train.steps": 3, "train.eval_every": 0, "checkpoint.every": 0}), wd
    )
    return wd


def test_readme_has_python_snippets():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_snippet_runs(index, stand_in, capsys):
    code = python_blocks()[index].replace('"runs/shakespeare"', repr(stand_in))
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})  # noqa: S102


def test_quick_start_figures_come_from_the_results_file():
    """The README's quick-start times and bits/byte are rendered from benchmarks/results/quickstart.json
    (benchmarks/quickstart.py measures and renders); no other timing claim in the section."""
    from benchmarks import quickstart

    text = open(README).read()
    entries = quickstart.load()
    assert entries, "no measured quick start in benchmarks/results/quickstart.json"
    assert quickstart.readme_block(text) == quickstart.render(entries), (
        "run benchmarks/quickstart.py --render"
    )
    # Command (1)'s part of the section (the test suite's own time follows it).
    section = text.split("## Quick start", 1)[1].split("Set up and run the test suite", 1)[0]
    assert not re.search(
        r"\d+ minutes|bits per byte of ~|~\d\.\d+ bits", section.replace(quickstart.render(entries), "")
    )
