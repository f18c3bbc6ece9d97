"""`python -m llm.sample --workdir=<dir> --prompt="ROMEO:" --max_new_tokens=200 ...`

Prints a continuation of the prompt from the run's latest checkpoint, streaming to the console
(KV-cached engine: one prefill, then one cached decode step per token). `--quantize=int8` stores
the weights as int8 with per-output-channel scales.
"""

from __future__ import annotations

import sys

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to sample.")
_TEMP = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "CTRL repetition penalty (1 = off).")
_QUANT = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "Weight-only quantization.")
_PAUSE = flags.DEFINE_integer(
    "pause_tokens", None, "<pause> tokens appended to the prompt (default: the run's data.pause.k)."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from llm import runtime  # noqa: PLC0415

    runtime.setup()
    import llm  # noqa: PLC0415
    from llm.infer.generation import generate_stream  # noqa: PLC0415

    try:
        run = llm.load(_WORKDIR.value, _STEP.value)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # (on stderr: stdout stays the sample alone, for pipes)
    print(f"sampling {_WORKDIR.value} at step {run.step} ({run.model.cfg.n_layers} layers, d_model "
          f"{run.model.cfg.d_model})", file=sys.stderr, flush=True)  # fmt: skip
    sys.stdout.write(_PROMPT.value)
    for piece in generate_stream(
        run.model, run.params, run.tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
        repetition_penalty=_REP.value, quantize=_QUANT.value,
        pause_tokens=run.config.data.pause.k if _PAUSE.value is None else _PAUSE.value,
    ):  # fmt: skip
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def run():
    from llm import cli  # noqa: PLC0415

    cli.run(main)  # --help exits 0; flag errors and a missing run are one line, exit 2


if __name__ == "__main__":
    run()
