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
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        # ffcv==1.0.2: the backend uses its TraversalOrder/Loader internals (ffcv_loader.py);
        # ffcv itself pulls opencv-python, numba and pytorch_pfn_extras and builds against the
        # system's libturbojpeg/libopencv (apt packages, README). numba>=0.59: first release
        # that supports numpy 2; numba caps numpy itself (0.68: numpy<2.6).
        "ffcv": ["ffcv==1.0.2", "numba>=0.59", "pillow", "torch"],
        "test": ["pytest", "pytest-timeout"],
        "all": ["nvidia-dali-cuda120", "ffcv==1.0.2", "numba>=0.59",
                "pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["fastcls-train=fastcls.train:main"]},
)
