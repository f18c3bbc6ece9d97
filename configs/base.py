"""Base config: every section and field with its default. Other config files derive from it.

Not meant to be run directly; see configs/shakespeare.py (the default), configs/tiny.py and
configs/pretrain.py:<preset>. Every field is a flag: `--config.model.positional=rope`.
"""

from ml_collections import config_dict

from llm.sharding import DEFAULT_RULES


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    p = config_dict.placeholder

    c.model = config_dict.ConfigDict()
    m = c.model
    m.vocab_size = p(int)  # unset = tokenizer size rounded up to a multiple of 64
    m.d_model = 128
    m.n_layers = 2
    m.d_ff = p(int)  # unset = 4*d_model (gelu) or ~8/3*d_model (swiglu)
    m.max_seq_len = 256
    m.positional = "learned"  # learned | sinusoidal | rope | alibi | none
    m.rope_theta = 10000.0
    m.norm = "layernorm"  # layernorm | rmsnorm
    m.norm_eps = 1e-5
    m.norm_position = "pre"  # pre | post
    m.mlp = "gelu"  # gelu | swiglu
    m.use_bias = True
    m.dropout = 0.0
    m.tie_embeddings = True
    m.dtype = "float32"  # compute dtype: float32 | bfloat16
    m.param_dtype = "float32"
    # bfloat16 with dtype=float32: autocast-style mixed precision (only matmul inputs in bf16)
    m.matmul_dtype = p(str)
    m.init_std = 0.02
    m.scan_layers = False
    m.remat = "none"  # none | full | dots | dots_no_batch | attention_out
    m.attention = config_dict.ConfigDict()
    m.attention.kind = "causal"
    m.attention.n_heads = 4
    m.attention.n_kv_heads = p(int)  # unset = n_heads (MHA); 1 = MQA
    m.attention.head_dim = p(int)
    m.attention.dropout = 0.0
    m.attention.impl = "fused"  # fused | einsum (autodiff reference) | jax (jax.nn.dot_product_attention)

    c.data = config_dict.ConfigDict()
    d = c.data
    d.corpus = "builtin:tinyshakespeare.txt"
    d.eval_corpus = p(str)
    d.eval_fraction = 0.1
    d.text_field = "text"
    d.seq_len = 256
    d.shift_windows = True  # each epoch starts its windows at a new seeded offset (augmentation)
    d.seed = 0
    d.worker_threads = 2
    d.tokenizer = config_dict.ConfigDict()
    d.tokenizer.kind = "sentencepiece"  # sentencepiece | byte
    d.tokenizer.vocab_size = 2048
    d.tokenizer.model_type = "bpe"  # bpe | unigram
    d.tokenizer.byte_fallback = True
    d.tokenizer.path = p(str)

    c.optim = config_dict.ConfigDict()
    o = c.optim
    o.lr = 1e-3
    o.warmup_steps = 100
    o.min_lr_ratio = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.clip_norm = 1.0
    o.decay_embeddings = False
    o.decay_norms_and_biases = False

    c.train = config_dict.ConfigDict()
    t = c.train
    t.steps = 1000
    t.batch_size = 32
    t.grad_accum = 1
    t.seed = 0
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = 0
    t.eval_batch_size = 0
    t.nan_policy = "stop"  # stop | skip
    t.progress = True
    t.distributed = False
    t.peak_tflops = p(float)  # per-device peak for MFU; unset = llm/flops.py table by chip
    t.profile_steps = 0  # >0: trace this many steps (after the compiling one) to <workdir>/profile

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every = 200
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.mesh = config_dict.ConfigDict()
    for ax, size in (("data", -1), ("fsdp", 1), ("tensor", 1)):
        c.mesh[ax] = size
        c.mesh["dcn_" + ax] = 1
    c.mesh.rules = config_dict.ConfigDict(dict(DEFAULT_RULES))
    return c


def apply_model_preset(c: config_dict.ConfigDict, preset: dict) -> None:
    """Overwrite c.model fields with a preset (nested dicts merge into sub-sections)."""
    for k, v in preset.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                c.model[k][kk] = vv
        else:
            c.model[k] = v
