"""fastcls.kernels: Triton kernels, each file holding `<op>_reference()` (plain torch),
`<op>_triton()` and the dispatching `<op>()` (Triton on CUDA, the reference elsewhere).

Installed as `fastcls.kernels` (setup.py `package_dir`) so nothing named plain `kernels`
lands in site-packages. The fused crop/resize/normalize kernel arrives with the native
GPU pipeline.
"""
