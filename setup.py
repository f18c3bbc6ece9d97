"""Package metadata. Pinned versions are the ones tested (Python 3.11, CPU); ranges keep 3.12+ installable."""

from setuptools import find_packages, setup

INSTALL = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1.0,<2",
    "sentencepiece>=0.2.1,<0.3",
    "tensorboardX>=2.6.5,<3",
    "absl-py>=2.1",
    "numpy>=2.0",
    "tqdm>=4.66",
    "tokenizers>=0.20",  # GPT-2 BPE and Hugging Face tokenizer.json (llm/data/tokenizers.py)
    "safetensors>=0.4",  # Hugging Face weights (llm/convert)
    "array-record>=0.8",  # prepared datasets (llm/data/prepared.py); grain reads them
    "zstandard>=0.22",  # .jsonl.zst corpora
    "pyarrow>=15",  # .parquet corpora
    "gcsfs>=2024.2",  # gs:// run directories (metrics, config, tokenizer, history) via etils.epath
]

# Exact versions CI and the README's quick start install (see requirements.txt).
setup(
    name="llm",
    version="0.1.0",
    description="A JAX/Flax research codebase for decoder-only language models, laptop to pod.",
    python_requires=">=3.11",
    packages=find_packages(include=["llm", "llm.*", "configs", "launch"]),
    package_data={"llm.data": ["corpora/*.txt", "corpora/*.md", "gpt2/*"]},
    install_requires=INSTALL,
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "matplotlib>=3.8",
            "psutil>=5.9",
            # notebooks: paired .ipynb/.py, executed top to bottom by tests/test_notebooks.py
            "jupytext==1.19.6",
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            "gcp-storage-emulator==2026.7.19",  # tests/test_gcs.py: a gs:// workdir end to end
        ],
        "viz": ["tensorboard>=2.17", "jupyterlab>=4"],  # TensorBoard for <workdir>/tb, notebooks/
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        # Compile-only TPU topologies on any machine (launch/aot_check.py): jax[tpu] brings the
        # libtpu wheel that matches jax (jax 0.10.2 -> libtpu 0.0.42.*).
        "aot": ["jax[tpu]>=0.10.2,<0.13"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.13"],
        "torch": ["torch==2.13.0", "transformers==5.24.0", "psutil>=5.9"],  # HF references (tests), benchmarks
    },
    entry_points={
        "console_scripts": [
            "llm-train=llm.train.__main__:run",
            "llm-sample=llm.sample:run",
            "llm-evaluate=llm.evaluate:run",
            "llm-compare=llm.compare:main",
        ]
    },
)
