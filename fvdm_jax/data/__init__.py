"""Training data: sources following the data-source contract (demo.py, folder.py, latents.py,
synthetic.py, tfds_source.py) and per-host grain batches (pipeline.py). Importing the package
imports none of them (grain, PyAV and TFDS load only with the modules that use them)."""

# The values of config.data.source (pipeline.make_source builds each).
SOURCES = ("synthetic", "video_folder", "latents", "demo", "tfds", "text_latents")
