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
