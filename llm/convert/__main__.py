"""`python -m llm.convert`: Hugging Face checkpoints into run directories and back (see llm/convert)."""

from __future__ import annotations

import sys

from absl import flags

from llm import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("from_hf", None, "a Hugging Face model directory (config.json + *.safetensors) to import")
flags.DEFINE_string("to_hf", None, "write the run in --workdir as a Hugging Face model directory here")
flags.DEFINE_string("workdir", None, "the run directory (written by an import, read by an export)")
flags.DEFINE_string(
    "tokenizer", None, "import: gpt2 | byte | a tokenizer.json / tokenizer.model (default: the HF dir's)"
)
flags.DEFINE_string(
    "merge_lora", None, "write the LoRA run in --workdir, adapters merged, as a new run directory here"
)
flags.DEFINE_integer("step", None, "export / merge: the checkpoint step (default: the newest)")
flags.DEFINE_float("shard_gb", 2.0, "export: the largest safetensors shard in GiB")


def main(argv) -> int:
    if len(argv) > 1:
        print(f"llm.convert: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    if not FLAGS.workdir or sum(bool(x) for x in (FLAGS.from_hf, FLAGS.to_hf, FLAGS.merge_lora)) != 1:
        print("llm.convert: give --workdir and exactly one of --from_hf=<HF dir> (import), --to_hf=<dir> (export) "
              "or --merge_lora=<new run dir>", file=sys.stderr)  # fmt: skip
        return 2
    from llm import convert  # noqa: PLC0415

    if FLAGS.from_hf:
        convert.import_hf(FLAGS.from_hf, FLAGS.workdir, FLAGS.tokenizer)
        print(
            f"imported {FLAGS.from_hf} -> {FLAGS.workdir} (try: python -m llm.sample --workdir={FLAGS.workdir})"
        )
    elif FLAGS.merge_lora:
        convert.merge_lora(FLAGS.workdir, FLAGS.merge_lora, FLAGS.step)
        print(f"merged the adapters of {FLAGS.workdir} -> {FLAGS.merge_lora}")
    else:
        files = convert.export_hf(FLAGS.workdir, FLAGS.to_hf, FLAGS.step, FLAGS.shard_gb)
        print(f"exported {FLAGS.workdir} -> {FLAGS.to_hf} ({len(files)} safetensors file(s))")
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
