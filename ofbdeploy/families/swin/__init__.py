"""The Swin family: timm's ``SwinTransformer`` (v1), pruned as in the OFB paper's OFB-Swin.

Searchable groups: per block, heads x per-head qkv channels (the relative-position-bias table keeps the
columns of the kept heads) and the MLP hidden width; per *stage*, the embedding width (the residual stream of
that stage), which slices the patch embedding (stage 0) or the patch-merging reduction's outputs (later
stages), every block of the stage, and the next patch merging's LayerNorm and reduction inputs (4 x E
channels) or, after the last stage, the final norm and the classifier.

The stage's embedding mask multiplies the stage's input (the patch embedding's, or the merging's output)
and folds into that layer at materialisation. PMIM hides patch-embedding tokens (the same unit as a ViT's
token: mask tokens replace them where the first stage starts) and reconstructs the image from the last
stage's tokens at their stride (patch size x 2^(stages - 1), as SimMIM decodes Swin), cropped to the image.

Costs follow timm's forward exactly: windows are clamped to the feature resolution (and then not shifted),
feature maps are padded to a multiple of the window for attention (qkv and the projection run on the padded
tokens), and patch merging pads odd resolutions. The shift mask is an addition: no multiply-accumulates.

Files: ``shape`` (SwinShape and SwinSpace: sizes, checks, MACs and parameters), ``space`` (grids per stage),
``support`` (which timm Swins are prunable; reading a shape), ``build`` (the plain rebuild), ``searchable``
(SearchableSwin), ``family`` (the adapter registered in :mod:`ofbdeploy.families`).
"""
