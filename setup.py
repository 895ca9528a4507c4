from setuptools import setup

setup(
    name="fastcls",
    version="0.1.0",
    description="Data-pipeline-centric PyTorch trainer for image classification",
    python_requires=">=3.10",
    packages=["fastcls", "fastcls.data", "fastcls.kernels"],
    package_dir={"fastcls": "fastcls", "fastcls.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",          # fused SGD on CPU and CUDA, torch.amp.GradScaler(device)
        "torchvision>=0.19",
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "matplotlib",
        "timm>=0.9",           # models: ResNet-D (ResNet50_vd), timm:<name>; optimizers: LARS, LAMB
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "ffcv": ["ffcv", "numba", "opencv-python-headless"],
        "test": ["pytest", "pytest-timeout"],
        "all": ["nvidia-dali-cuda120", "ffcv", "numba", "opencv-python-headless",
                "pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["fastcls-train=fastcls.train:main"]},
)
