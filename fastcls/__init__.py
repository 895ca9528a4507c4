"""fastcls: a data-pipeline-centric PyTorch trainer for image classification.

`fastcls.kernels` is the top-level kernels/ folder, reached through the committed symlink
fastcls/kernels -> ../kernels: one path for installed and uninstalled checkouts alike
(PYTHONPATH=$PWD, as on the lent GPU machines).
"""
__version__ = "0.1.0"
