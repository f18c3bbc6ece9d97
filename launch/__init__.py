"""Launchers: local multi-process, Cloud TPU pods, SLURM GPU clusters, and the AOT compile check."""


def split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """`[launcher flags] -- [llm.train flags]` -> (launcher flags, llm.train flags)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]
