"""The README's examples run as written."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        namespaces = []
        for block in blocks:  # as a user runs them: default promotion settings
            namespaces.append({})
            exec(compile(block, str(README), "exec"), namespaces[-1])
    history = next(ns["history"] for ns in namespaces if "history" in ns)
    assert history[-1]["test_accuracy"] > 0.95
