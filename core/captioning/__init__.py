"""Writing captions: the captioning job and its captioners (BLIP, a WD14 tagger, Florence-2).
"""
