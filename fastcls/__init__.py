"""fastcls: a data-pipeline-centric PyTorch trainer for image classification."""
__version__ = "0.1.0"
