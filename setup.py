from setuptools import setup

setup(
    name="fastcls",
    version="0.1.0",
    description="Data-pipeline-centric PyTorch trainer for image classification",
    python_requires=">=3.10",
    # fastcls.kernels is kernels/ through the symlink fastcls/kernels (copied into a wheel)
    packages=["fastcls", "fastcls.data", "fastcls.tools", "fastcls.augment", "fastcls.kernels"],
    install_requires=[
        "torch>=2.4",          # fused SGD on CPU and CUDA, torch.amp.GradScaler(device)
        "torchvision>=0.19",
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "matplotlib",
        "timm>=0.9",           # models: ResNet-D (ResNet50_vd), timm:<name>; optimizers: LARS, LAMB
        "webdataset>=1.0",     # tar shards: pipe:/URL opening, TarWriter (pulls braceexpand)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        # ffcv==1.0.2: the backend uses its TraversalOrder/Loader internals (ffcv_loader.py);
        # ffcv itself pulls opencv-python, numba and pytorch_pfn_extras and builds against the
        # system's libturbojpeg/libopencv (apt packages: .ci/system-packages.sh, docs/development.md). numba>=0.59: first release
        # that supports numpy 2; numba caps numpy itself (0.68: numpy<2.6).
        "ffcv": ["ffcv==1.0.2", "numba>=0.59", "pillow", "torch"],
        # nvImageCodec: GPU batch decode on the hardware JPEG engines (torch built for CUDA 12 / 13);
        # >= 0.9: one output per input, None for a failure (older releases dropped failures)
        "nvimgcodec": ["nvidia-nvimgcodec-cu12>=0.9", "nvidia-nvjpeg-cu12"],
        "nvimgcodec-cu13": ["nvidia-nvimgcodec-cu13>=0.9", "nvidia-nvjpeg"],
        # python -m fastcls.export --format onnx: torch's torch.export-based ONNX exporter needs
        # onnxscript; onnxruntime verifies the export against eager PyTorch
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        # Parquet / Arrow image datasets (Hugging Face layout): pyarrow reads them; `datasets`
        # is not needed at run time
        "parquet": ["pyarrow"],
        # train.tensorboard: true (torch.utils.tensorboard writes the event files)
        "tensorboard": ["tensorboard"],
        # pytest-xdist: `make test` runs two workers; timm: reference for the mixup/cutmix
        # tests; nvidia-nvimgcodec-cu12 (32 MB, no CUDA needed) so CI tests its CPU-only
        # decode path; tensorboard (its EventAccumulator reads
        # the event files back) and the onnx extra so CI tests both; scikit-image: real
        # photographs (skimage.data) for the loader tests; scikit-learn: its handwritten digits
        # for the fit-diagnosis runs; psutil: benchmarks/table_memory.py; datasets (pulls
        # pyarrow) writes the Parquet / save_to_disk test data as the Hub's files are written
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "ruff", "timm", "nvidia-nvimgcodec-cu12>=0.9", "tensorboard",
                 "onnx", "onnxruntime", "onnxscript", "scikit-image", "scikit-learn", "psutil",
                 "datasets"],
        "all": ["nvidia-dali-cuda120", "ffcv==1.0.2", "numba>=0.59",
                "pytest", "pytest-timeout", "pytest-xdist", "timm", "nvidia-nvimgcodec-cu12>=0.9", "nvidia-nvjpeg-cu12",
                "tensorboard", "onnx", "onnxruntime", "onnxscript", "pyarrow", "datasets"],
    },
    entry_points={"console_scripts": ["fastcls-train=fastcls.train:main",
                                      "fastcls-eval=fastcls.eval:main",
                                      "fastcls-predict=fastcls.predict:main",
                                      "fastcls-export=fastcls.export:main"]},
)
