"""The ViT family: timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` with their variants.

Variants are options of one adapter, recorded in :class:`ViTShape`: class, register and distillation
tokens; position embeddings with or without a class slot (or none); CLIP's pre-norm and a norm after the
patch embedding; LayerScale; GELU, tanh GELU and QuickGELU; any LayerNorm eps; fc-norm; token, average and
max pooling; the distilled DeiT's two heads; res-post blocks; and SigLIP's attention-pool head ('map').

The attention pool is kept dense, and so is the embedding width of a model that has one: timm's
``AttentionPoolLatent`` reshapes its attention output to its *input* width, so its input cannot be sliced
while it stays dense, and slicing its internals with the residual channels would regroup its heads (a
different function, not one the search scored). Heads, head widths and MLP widths are searched as usual.

Files: ``shape`` (ViTShape: options, checks, MACs and parameters), ``space`` (grids), ``support`` (which timm
ViTs are prunable; reading a shape), ``build`` (the plain rebuild), ``searchable`` (SearchableViT), ``family``
(the adapter registered in :mod:`ofbdeploy.families`).
"""
