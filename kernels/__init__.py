"""fastcls.kernels: Triton kernels, each file holding `<op>_reference()` (plain torch),
`<op>_triton()` and the dispatching `<op>()` (Triton on CUDA, the reference elsewhere).

Installed as `fastcls.kernels` (setup.py `package_dir`) so nothing named plain `kernels`
lands in site-packages.

- `resized_crop.py`: `resized_crop_normalize()`: crop -> bilinear resize (antialias option)
  -> flip -> normalize -> cast -> channels_last for a whole ragged batch in one launch; the
  native backend's batched path (fastcls/data/batched.py) runs it on every batch.
"""
