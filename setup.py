from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mgpt4",
    version="0.1.0",
    description="Train MiniGPT-4 vision-language models on DeepSpeed, from a CPU smoke run to SLURM clusters.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mgpt4", "mgpt4.*"]),
    install_requires=[
        "torch>=2.4,<2.16",
        "torchvision>=0.19,<0.31",
        "deepspeed>=0.19.3,<0.20",
        "transformers>=5.0,<6",
        "accelerate>=1.1,<2",
        "timm>=1.0.15,<2",
        "webdataset>=1.0,<2",
        "tensorboard>=2.15,<3",
        # 0.2.3's model proto needs protobuf 7, which wandb (an lmms-eval dependency) rules out; transformers
        # then cannot read a tokenizer.model. 0.2.2's proto carries no runtime version check.
        "sentencepiece>=0.2,<0.2.3",
        "tokenizers>=0.22,<1",  # the export's legacy LLaMA tokenizer rules (mgpt4/export/processor.py)
        "jinja2>=3.1",  # tokenizers' chat templates (model.text.template: chat_template)
        "safetensors>=0.4",
        "tokenizers>=0.20",  # the tiny Qwen2 folder's byte-level BPE (tiny_decoder_* recipes)
        "pillow>=10",
        "simplejpeg>=1.7,<2",
        "numpy>=1.24",
        "psutil>=5.9",
        "tqdm>=4.60",
        "braceexpand>=0.1.7",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1,<5"],
        "demo": ["gradio>=6,<7"],
        "lowmem": ["bitsandbytes>=0.43"],
        # COCO caption metrics (python -m mgpt4.eval); METEOR and its tokenizer also need a Java runtime.
        # lmms-eval: the benchmarks (`python -m lmms_eval --model mgpt4`, `python -m mgpt4.eval bench`).
        "eval": ["pycocoevalcap>=1.2,<2", "lmms-eval>=0.7.3,<0.8"],
        # python -m mgpt4.serve (httpx fetches remote images, with --allow-remote-images only).
        "serve": ["fastapi>=0.110", "uvicorn>=0.30", "httpx>=0.27"],
        # LoRA adapters on the LLM in stage 2 (model.lora).
        "lora": ["peft>=0.17"],
        # Hugging Face datasets on disk (parquet, save_to_disk) as a data source (mgpt4.data.formats.hf).
        "data": ["datasets>=3,<6"],
        "dev": [
            "pytest>=8,<10",
            # Two test workers, one file each at a time: the multi-rank runs leave a core idle half the time.
            "pytest-xdist>=3.5,<4",
            "ruff>=0.6",
            "import-linter>=2.1,<3",
            "mpi4py>=3.1,<5",
            "gradio>=6,<7",
            "selenium>=4.20,<5",
            "pycocoevalcap>=1.2,<2",
            "fastapi>=0.110",
            "uvicorn>=0.30",
            "httpx>=0.27",
            # The server's tests talk to it with the official client.
            "openai>=1.40",
            "lmms-eval>=0.7.3,<0.8",
            "datasets>=3,<6",  # Hugging Face sources; the lmms-eval tests write their tasks' data with it
            "peft>=0.17",
        ],
    },
    # lmms-eval 0.7 finds plugin models in this group (lmms_eval/models/registry_v2.py).
    entry_points={"lmms_eval.models": ["mgpt4 = mgpt4.eval.lmms_model:manifest"]},
)
