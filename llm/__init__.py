"""llm: decoder-only language models in JAX/Flax, from a laptop CPU to a TPU pod.

Notebook use:
    import llm
    run = llm.load("runs/shakespeare")        # config, params, tokenizer, model
    print(run.generate("ROMEO:", max_new_tokens=100))
"""

from llm.api import Loaded, load

__all__ = ["Loaded", "load"]
