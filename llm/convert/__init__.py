"""Weights in and out of this project: Hugging Face checkpoints (llm/convert/hf.py).

    python -m llm.convert --from_hf=<HF model dir> --workdir=<run dir> [--tokenizer=gpt2|byte|<file>]
    python -m llm.convert --workdir=<run dir> --to_hf=<dir> [--step=N] [--shard_gb=2]
    python -m llm.convert --workdir=<LoRA run dir> --merge_lora=<new run dir> [--step=N]

`import_hf` writes a normal run directory (config + a parameters-only Orbax checkpoint at step 0 +
the tokenizer), so `llm.load`, `llm.sample`, `llm.evaluate` and `train.init_from` work on it.
`export_hf` writes `config.json`, `model.safetensors` (sharded with an index past `shard_gb`) and
the tokenizer files, which `transformers.AutoModelForCausalLM.from_pretrained` loads (a LoRA
run is merged on the way). `merge_lora` writes a LoRA run's merged model as a new run directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tqdm.auto import tqdm

from llm.convert import hf as hf_lib
from llm.convert.safetensors_io import Reader, ShardedWriter
from llm.registry import ConfigError
from llm.trees import at, put


def import_tokenizer(hf_dir: str, choice: str | None):
    """The tokenizer an imported model encodes with: `choice` (gpt2 | byte | a tokenizer.json or
    tokenizer.model file) or what the HF directory holds (tokenizer.json, tokenizer.model,
    vocab.json + merges.txt)."""
    from llm.config import TokenizerConfig  # noqa: PLC0415
    from llm.data import tokenizers as T  # noqa: PLC0415

    if choice in ("gpt2", "byte"):
        return T.TOKENIZERS.get(choice)()
    path = choice
    if path is None:
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(hf_dir, name)):
                path = os.path.join(hf_dir, name)
                break
    if path is None and os.path.exists(os.path.join(hf_dir, "vocab.json")):
        return T.HFTokenizer(T.bpe_tokenizer_json(os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")),
                             T.hf_special_tokens(hf_dir) or {"eos": "<|endoftext|>"})  # fmt: skip
    if path is None:
        raise FileNotFoundError(f"no tokenizer in {hf_dir} (tokenizer.json, tokenizer.model or vocab.json + "
                                "merges.txt); pass --tokenizer=gpt2|byte|<file>")  # fmt: skip
    if path.endswith(".model"):
        return T.SentencePieceTokenizer.build(TokenizerConfig(kind="sentencepiece", path=path), [])
    return T.HFTokenizer.build(TokenizerConfig(kind="hf", path=path), [])


def import_hf(hf_dir: str, workdir: str, tokenizer: str | None = None, progress: bool = True) -> str:
    """Convert a HF model directory into a run directory; returns the workdir."""
    import jax  # noqa: PLC0415

    from llm.checkpoint import Checkpointer  # noqa: PLC0415
    from llm.config import RunConfig, from_dict  # noqa: PLC0415

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    arch = hf_cfg.get("model_type")
    overrides = hf_lib.model_overrides(hf_cfg)
    tok = import_tokenizer(hf_dir, tokenizer)
    if tok.vocab_size > overrides["vocab_size"]:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but the model only {overrides['vocab_size']}; "
                          "pass the model's own tokenizer (--tokenizer=<file>)")  # fmt: skip
    seq = min(RunConfig().data.seq_len, overrides["max_seq_len"])  # a fine-tune's default window
    cfg = from_dict(
        RunConfig, {"model": overrides, "data": {"seq_len": seq, "tokenizer": {"kind": tok.kind}}}
    )
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
        os.path.join(workdir, "checkpoints")
    ):
        raise ConfigError(f"{workdir} already holds checkpoints; convert into a new --workdir")
    reader = Reader(hf_dir)
    rules = hf_lib.rules_for(cfg.model, arch)
    used = {n for r in rules for n in r.hf}
    unused = sorted(set(reader.names()) - used - {"lm_head.weight"})  # GPT-2 files may hold the tied head
    if unused:
        raise ConfigError(f"{hf_dir} holds tensors this converter has no place for: {unused[:8]}"
                          f"{' ...' if len(unused) > 8 else ''}")  # fmt: skip
    params: dict = {}
    dtype = np.dtype(cfg.model.param_dtype)
    for rule in tqdm(rules, desc="import", unit="tensor", disable=not progress):
        ours = rule.to_ours([reader.get(n) for n in rule.hf])
        for path, value in zip(rule.ours, ours, strict=True):
            # A real copy (not a view of the memory-mapped file), placed as a jax array at once
            # so the tree is held once; the file's pages are released tensor by tensor.
            put(params, path, jax.device_put(np.array(value, dtype=dtype, copy=True)))
    _check_shapes(cfg, params)
    os.makedirs(workdir, exist_ok=True)
    tok.save(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json())
    with open(os.path.join(workdir, "provenance.json"), "w") as f:
        json.dump(
            {"imported_from": os.path.abspath(hf_dir), "model_type": arch, "hf_config": hf_cfg}, f, indent=1
        )
    if cfg.model.scan_layers:
        from llm.model import layout  # noqa: PLC0415

        params = layout.to_layout(params, cfg.model)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, compress=False)
    ckpt.save_params(0, params, cfg.to_json())
    ckpt.close()
    return workdir


def _check_shapes(cfg, params) -> None:
    """Every parameter the model builds is filled with its shape, and nothing else is."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from llm.model import Transformer  # noqa: PLC0415

    want = jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg.model.replace(scan_layers=False)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]))  # fmt: skip
    flat = lambda t: {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    w, g = flat(want), flat(params)
    bad = sorted(k for k in w.keys() | g.keys() if w.get(k) != g.get(k))
    if bad:
        raise ConfigError("converted parameters do not match the model: " + "; ".join(
            f"{k}: model {w.get(k)}, converted {g.get(k)}" for k in bad[:6]))  # fmt: skip


def export_hf(workdir: str, out_dir: str, step: int | None = None, shard_gb: float = 2.0,
              progress: bool = True) -> list[str]:  # fmt: skip
    """Write a run's parameters as a HF model directory; returns the safetensors files written."""
    import jax  # noqa: PLC0415

    from llm.api import load  # noqa: PLC0415
    from llm.model import layout  # noqa: PLC0415

    run = load(workdir, step, host=True)  # numpy, read array by array: peak ~ one copy
    cfg = run.config.model
    params = run.params
    if cfg.lora.rank:  # adapters folded into the kernels: HF has no place for them
        from llm.model import lora  # noqa: PLC0415

        params, cfg = lora.merge(params, cfg.lora, cfg.param_dtype), cfg.replace(lora=type(cfg.lora)())
    arch = hf_lib.architecture_of(cfg)
    params = jax.tree.map(np.asarray, params)
    if cfg.scan_layers:
        params = layout.to_unrolled(params, cfg)
    writer = ShardedWriter(out_dir, int(shard_gb * (1 << 30)))
    for rule in tqdm(hf_lib.rules_for(cfg.replace(scan_layers=False), arch), desc="export", unit="tensor",
                     disable=not progress):  # fmt: skip
        for name, value in zip(rule.hf, rule.to_hf([at(params, p) for p in rule.ours]), strict=True):
            writer.add(name, np.ascontiguousarray(value))
    files = writer.close()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**hf_lib.hf_config(cfg, arch), "torch_dtype": str(np.dtype(cfg.param_dtype))}, f, indent=1)
    _export_tokenizer(run.tokenizer, out_dir)
    return files


def _export_tokenizer(tok, out_dir: str) -> None:
    """tokenizer.json (gpt2 / hf kinds) or tokenizer.model (sentencepiece) + tokenizer_config.json."""
    if tok.kind in ("gpt2", "hf"):
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok.json)
        piece = lambda i: tok.tok.id_to_token(i)  # noqa: E731
    elif tok.kind == "sentencepiece":
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(tok.proto)
        piece = lambda i: tok.sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    else:
        return  # byte: no HF equivalent file; the model's ids are the UTF-8 bytes
    tc = {
        f"{n}_token": piece(tok.special[n])
        for n in ("bos", "eos", "pad")
        if n in tok.special and tok.special[n] >= 0
    }
    tc["tokenizer_class"] = "PreTrainedTokenizerFast" if tok.kind != "sentencepiece" else "LlamaTokenizer"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=1)


def merge_lora(workdir: str, out: str, step: int | None = None) -> str:
    """A LoRA run's adapters folded into its base, written as a parameters-only run directory
    (model.lora off, no init_from) that samples, evaluates, exports and fine-tunes like any run."""
    import dataclasses  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from llm.api import load  # noqa: PLC0415
    from llm.checkpoint import Checkpointer  # noqa: PLC0415
    from llm.model import lora  # noqa: PLC0415

    run = load(workdir, step)
    if not run.config.model.lora.rank:
        raise ConfigError(f"{workdir} is not a LoRA run (model.lora.rank is 0); nothing to merge")
    if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise ConfigError(f"{out} already holds checkpoints; merge into a new directory")
    m = run.config.model
    cfg = dataclasses.replace(run.config, model=m.replace(lora=type(m.lora)()),
                              train=dataclasses.replace(run.config.train, init_from=None))  # fmt: skip
    params = jax.tree.map(np.asarray, lora.merge(run.params, m.lora, m.param_dtype))
    os.makedirs(out, exist_ok=True)
    run.tokenizer.save(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(cfg.to_json())
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), async_save=False, compress=False)
    ckpt.save_params(run.step, params, cfg.to_json())
    ckpt.close()
    return out
