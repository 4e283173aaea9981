"""One module per kind of stage, each registering its `jbtx.pipeline.registry.Stage`.

The registry imports every module of this package on first use, so a new kind is one
new file here.
"""
