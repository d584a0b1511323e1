from setuptools import find_packages, setup

setup(
    name="acm_d2",
    version="0.1.0",
    description="Attend-and-Compare Module (ACM, ECCV 2020) for Detectron2",
    packages=find_packages(include=["acm_d2", "acm_d2.*"]),
    license="Apache-2.0",
    python_requires=">=3.10",  # as the README says; the code uses 3.10 syntax (parenthesised with)
    # detectron2 is not on PyPI: `make venv` installs it (scripts/install_detectron2.sh) when missing.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5.post20221221",
        "iopath>=0.1.7,<0.1.11",
        "pycocotools>=2.0.2",
        "opencv-python-headless>=4.5",
        "omegaconf>=2.1,<2.4",
        "hydra-core>=1.1",
        "yacs>=0.1.8",
        "termcolor>=1.1",
        "tabulate",
        "cloudpickle",
        "matplotlib",
        "Pillow>=7.1",
        "tqdm>4.29.0",
        "tensorboard",  # DefaultTrainer writes TensorBoard event files
        "numpy",
        "setuptools<81",  # detectron2.model_zoo imports pkg_resources
    ],
    extras_require={
        # ONNX export and its onnxruntime check (tools/export_model.py, tests/test_export.py)
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
        # srun's environment and tools/submit_slurm.py (docs/cluster.md)
        "cluster": ["submitit>=1.5"],
        # ruff pinned to a minor version: `make lint` checks formatting, which changes between versions
        "test": [
            "pytest>=7",
            "ruff>=0.17,<0.18",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.3",
            "submitit>=1.5",  # tests/test_cluster.py
        ],
    },
)
