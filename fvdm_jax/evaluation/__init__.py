"""FVD: the detector and statistics (fvd.py), the real and generated video sets (videos.py), and
the features of generated and zero-shot videos (features.py)."""
