"""3D from the 2D model: a voxel grid with a differentiable renderer (``voxels``) and score distillation
sampling into it (``sds``)."""
